"""What the interop formats share: which hook a layer number means, and model architectures.

All three outside formats (llama.cpp control vectors, ``steering_vectors.SteeringVector``,
``repeng.ControlVector``) key a vector by one integer per layer and add it to the *output of
that decoder block*, at every position. In TransformerLens that point is
``blocks.{layer}.hook_resid_post`` (0-based, the block's output after both residual adds),
the same tensor as Hugging Face's ``model.model.layers[layer]`` output and
``hidden_states[layer + 1]``. The per-format evidence is in the docstrings of
``xferlens.interop.gguf_cvec`` and ``xferlens.interop.libraries``.
"""

import re

from transformer_lens import HookedTransformer

from xferlens.activations.hooks import resid_post
from xferlens.errors import XferlensError
from xferlens.steering.vector import SteeringVector

#: Hugging Face architecture (TransformerLens ``cfg.original_architecture``) -> llama.cpp
#: architecture name (``general.architecture`` of the model's GGUF). Only architectures whose
#: llama.cpp graph was read and found to call ``build_cvec(cur, il)`` on each layer's output
#: (``l_out``) are listed; add one only after checking its ``src/models/<arch>.cpp``.
#: Mistral converts to llama.cpp's ``llama`` graph (``convert_hf_to_gguf.py``).
LLAMA_CPP_ARCH: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}

#: Hugging Face architecture -> ``config.model_type`` (what repeng records as ``model_type``).
HF_MODEL_TYPE: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma2ForCausalLM": "gemma2",
    "GemmaForCausalLM": "gemma",
    "GPT2LMHeadModel": "gpt2",
}

_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


class InteropError(XferlensError, ValueError):
    """A vector that cannot be expressed in (or read from) another library's format."""


def block_output_layer(hook: str, target: str) -> int:
    """The layer whose output ``hook`` is; refuses any other point of the residual stream.

    ``target`` names the format for the message (``"llama.cpp"``, ``"repeng"``...).
    """
    m = _RESID_POST.match(hook)
    if m:
        return int(m.group(1))
    pre = _RESID_PRE.match(hook)
    if pre and int(pre.group(1)) > 0:
        layer = int(pre.group(1))
        fix = (
            f"it is the same point as {resid_post(layer - 1)!r}: rebuild the vector there, or rename the "
            f"direction (SteeringVector({{{resid_post(layer - 1)!r}: v}}, ...))"
        )
    else:
        fix = "build the vector at a blocks.{l}.hook_resid_post hook"
    raise InteropError(
        f"{target} adds vectors only at a decoder block's output (TransformerLens "
        f"blocks.{{l}}.hook_resid_post); {hook!r} is another point: {fix}"
    )


def architecture(vector: SteeringVector, model: HookedTransformer | None) -> str | None:
    """The Hugging Face architecture of the vector's model: from ``model`` when given, else
    from the vector's recorded identity (``vector.model["architecture"]``), else ``None``."""
    if model is not None:
        return getattr(model.cfg, "original_architecture", None)
    arch = vector.model.get("architecture")
    return str(arch) if arch is not None else None


def model_architecture(model: HookedTransformer) -> str | None:
    arch = getattr(model.cfg, "original_architecture", None)
    return str(arch) if arch is not None else None


def check_width(width: int, model: HookedTransformer, what: str) -> None:
    if width != model.cfg.d_model:
        raise InteropError(
            f"{what} has {width} entries, but {model.cfg.model_name} has d_model={model.cfg.d_model}: "
            f"it was made for a model of width {width}; load it with that model"
        )


def check_layer(layer: int, model: HookedTransformer, what: str) -> int:
    """``layer`` (negative counts from the end, as Python and steering-vectors do) in range."""
    n = model.cfg.n_layers
    resolved = layer + n if layer < 0 else layer
    if not 0 <= resolved < n:
        raise InteropError(
            f"{what} targets layer {layer}, but {model.cfg.model_name} has {n} layers (0..{n - 1}); "
            "it was made for a deeper model: load it with that model"
        )
    return resolved
