"""llama.cpp control vectors (GGUF): export a ``SteeringVector`` to llama.cpp and read one back.

The format (what llama.cpp writes and reads): a GGUF with ``general.architecture =
"controlvector"``, ``controlvector.model_hint`` (a string), ``controlvector.layer_count``
(the number of direction tensors) and one 1-D F32 tensor ``direction.<n>`` of ``n_embd``
entries per steered layer. llama.cpp's loader reads only the tensors; the two keys are hints.

Where ``direction.<n>`` is added, from llama.cpp's source (checked against the llama.cpp
vendored in llama-cpp-python 0.3.36, and ggml-org/llama.cpp master, 2026):

* ``common/common.cpp``, ``common_control_vector_load_one``: a tensor name must be
  ``direction.<n>`` with ``n >= 1`` (``n == 0``, an unparsable name, a non-F32 or non-1-D
  tensor, or widths that differ make it skip the whole file); it adds ``strength * data``
  into a flat buffer at offset ``n_embd * (n - 1)`` ("layer 1 at [0]"), summing tensors and
  files that name the same layer. ``strength`` is 1 for ``--control-vector FILE`` and
  ``SCALE`` for ``--control-vector-scaled FILE SCALE``.
* ``include/llama.h``, ``llama_set_adapter_cvec(ctx, data, len, n_embd, il_start, il_end)``
  (formerly ``llama_control_vector_apply``): "data should point to an n_embd x n_layers
  buffer starting from layer 1"; ``il_start``/``il_end`` inclusive.
* ``src/llama-adapter.cpp``, ``llama_adapter_cvec::init``/``apply``: ``tensors[0]`` is
  always null ("there's never a tensor for layer 0"); for ``il = 1 .. n_layer - 1``,
  ``tensors[il]`` is filled from buffer offset ``n_embd * (il - 1)``. The two ``- 1``\\ s cancel:
  ``tensors[il]`` holds ``direction.<il>``. ``tensor_for(il)`` returns it when
  ``layer_start <= il <= layer_end``; ``apply_to(ctx, cur, il)`` is ``cur + tensors[il]``, a
  ``[n_embd]`` vector broadcast over every token of the batch (prompt and generated alike).
* ``common/common.cpp``, context setup: ``--control-vector-layer-range`` defaults to
  ``layer_start = 1``, ``layer_end = n_layer`` (all layers a file names).
* ``src/llama-graph.cpp``, ``llm_graph_context::build_cvec(cur, il)`` calls ``apply_to``; the
  per-architecture graphs (``src/models/llama.cpp``, ``qwen2.cpp``, ``gemma3.cpp``) call
  ``cur = build_cvec(cur, il); cb(cur, "l_out", il)`` at the end of the loop over 0-based
  layer ``il``, after the FFN residual add (for Gemma 3 after ``ffn_post_norm`` + residual),
  and ``l_out`` is the next layer's input.

So ``direction.<n>`` is added to the **output of 0-based block n**, at every position:
TransformerLens ``blocks.{n}.hook_resid_post`` (not ``n - 1``), the same tensor as Hugging
Face's ``hidden_states[n + 1]``. ``blocks.0.hook_resid_post`` cannot be expressed
(llama.cpp rejects ``direction.0``), nor can a layer ``>= n_layers`` (llama.cpp would
silently ignore it), nor any hook other than a ``resid_post``; ``to_gguf`` refuses those.
Steering a vector at ``alpha`` with ``steer(model, vector, alpha, positions="all")`` is what
llama.cpp does with the exported file at ``--control-vector-scaled FILE alpha`` (or with
``to_gguf(..., alpha=alpha)`` and plain ``--control-vector FILE``: the alpha is then folded
into the stored tensors and recorded in the metadata as ``recipe.scaled_by``).

Checked against llama.cpp itself (llama-cpp-python 0.3.36): on a tiny float32 GGUF,
``direction.2`` gives the HookedTransformer's next-token log-probabilities under
``blocks.2.hook_resid_post`` to 3e-3 and misses blocks 1 and 3 by > 1
(``tests/unit/test_interop.py``, run when llama-cpp-python is installed); on the zoo's
Qwen2.5-Coder-1.5B, a transferred refusal vector moves the refusal score of 50 prompts the
same way in both runtimes (Pearson r 0.998 on the Q4_K GGUF, 1.000 on a float32 copy, which
also matches value for value; ``benchmarks/scripts/bench_llamacpp.py``).

Other writers: llama.cpp's ``cvector-generator`` writes ``direction.1 ..
direction.<n_layer - 1>`` with ``model_hint`` = the model's ``general.architecture`` (older
versions wrote ``"llama"`` for every model). Note that it *measures* ``direction.<n>`` on
``l_out`` of block ``n - 1`` (``mean.hpp``/``pca.hpp`` name layer ``il``'s result
``direction.{il + 1}``) while llama.cpp *adds* it to block ``n``'s output; ``from_gguf`` maps
each tensor to where llama.cpp adds it, so a steer here equals the steer there. repeng writes
``model_hint = config.model_type`` and ``direction.<its layer index>`` (see
``xferlens.interop.libraries``). Both are read here; the hint is checked against the model's
llama.cpp architecture or Hugging Face ``model_type`` (``force=True`` to override).

What xferlens adds: ``model_hint`` is the llama.cpp architecture (``llama``, ``qwen2``,
``gemma3``), ``general.name`` the model name, and ``xferlens.header`` a JSON string with the
vector's model identity, Hugging Face architecture, recipe, ``act_norm`` and the hook of each
tensor, so that ``from_gguf`` refuses a file made for another model.
"""

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from transformer_lens import HookedTransformer

from xferlens.identity import model_identity
from xferlens.interop.common import (
    HF_MODEL_TYPE,
    LLAMA_CPP_ARCH,
    InteropError,
    architecture,
    block_output_layer,
    check_layer,
    check_width,
    model_architecture,
    resid_post,
)
from xferlens.steering.vector import SteeringMismatchError, SteeringVector

FORMAT = "xferlens.controlvector/1"
ARCH = "controlvector"
HEADER_KEY = "xferlens.header"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


class ControlVectorError(InteropError):
    """A control-vector GGUF that cannot be written or read as asked."""


def llama_cpp_architecture(arch: str | None, who: str) -> str:
    """llama.cpp's name for Hugging Face architecture ``arch``; refuses one without a mapping."""
    known = ", ".join(f"{k} -> {v}" for k, v in LLAMA_CPP_ARCH.items())
    if arch is None:
        raise ControlVectorError(
            f"the architecture of {who} is unknown (no cfg.original_architecture, nothing recorded in "
            "the vector): pass the model the vector belongs to, to_gguf(vector, path, model)"
        )
    if arch not in LLAMA_CPP_ARCH:
        raise ControlVectorError(
            f"{who} is a {arch}, which has no llama.cpp control-vector mapping here (known: {known}); "
            "add it to xferlens.interop.common.LLAMA_CPP_ARCH once its llama.cpp graph is checked to "
            "call build_cvec on each layer's output"
        )
    return LLAMA_CPP_ARCH[arch]


def to_gguf(
    vector: SteeringVector,
    path: str | os.PathLike,
    model: HookedTransformer | None = None,
    *,
    alpha: float = 1.0,
) -> Path:
    """Write ``vector`` as a llama.cpp control vector (``--control-vector path``).

    Args:
        vector: directions at ``blocks.{l}.hook_resid_post`` hooks, ``1 <= l < n_layers``;
            ``direction.{l}`` of the file is added by llama.cpp to the output of block ``l``
            at every position (see the module docstring for the source references).
        path: the ``.gguf`` file to write (replaced atomically).
        model: the model the vector belongs to (checked); needed unless the vector's
            identity records its ``architecture``.
        alpha: folded into the stored tensors (``alpha * direction``, recorded as
            ``recipe.scaled_by``). Keep 1.0 and pass the scale to llama.cpp instead with
            ``--control-vector-scaled path ALPHA``; the two are the same addition.

    Returns:
        The path written.

    Example:
        >>> to_gguf(vec, "refusal.gguf", model)  # doctest: +SKIP
        >>> # llama-cli -m model.gguf --control-vector-scaled refusal.gguf 4.0
    """
    if model is not None:
        vector.check_model(model)
    name = vector.model.get("name") or "the vector's model"
    hf_arch = architecture(vector, model)
    arch = llama_cpp_architecture(hf_arch, name)
    if not math.isfinite(alpha):
        raise ControlVectorError(f"alpha must be finite, got {alpha}")
    n_layers = model.cfg.n_layers if model is not None else vector.model.get("n_layers")
    out = vector.scaled(alpha) if alpha != 1.0 else vector
    tensors: dict[int, np.ndarray] = {}
    hooks: dict[str, str] = {}
    for hook in out.hooks:
        layer = block_output_layer(hook, "llama.cpp")
        if layer == 0:
            raise ControlVectorError(
                f"{hook!r}: llama.cpp never steers the output of block 0 (it rejects direction.0 and "
                "keeps no tensor for layer 0); drop it (vector.at(other_hook)) or build it at layer >= 1"
            )
        if n_layers is not None and layer >= n_layers:
            raise ControlVectorError(f"{hook!r} is past the model's last layer ({n_layers - 1})")
        tensors[layer] = out.directions[hook].detach().to("cpu", torch.float32).contiguous().numpy()
        hooks[f"direction.{layer}"] = hook
    header = {
        "format": FORMAT,
        "model": out.model,
        "architecture": hf_arch,
        "llama_cpp_architecture": arch,
        "recipe": out.recipe,
        "act_norm": out.act_norm,
        "hooks": hooks,
    }
    _write(Path(path), arch, str(name), tensors, header)
    return Path(path)


def _write(path: Path, hint: str, name: str, tensors: dict[int, np.ndarray], header: dict) -> None:
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    writer.add_name(name)
    writer.add_string(f"{ARCH}.model_hint", hint)
    writer.add_int32(f"{ARCH}.layer_count", len(tensors))
    writer.add_string(HEADER_KEY, json.dumps(header, sort_keys=True))
    for layer in sorted(tensors):
        writer.add_tensor(f"direction.{layer}", tensors[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)


def read_control_vector(path: str | os.PathLike) -> tuple[dict, dict[int, np.ndarray]]:
    """The metadata (``{key: value}``) and ``{n: direction.<n>}`` of a control-vector GGUF,
    validated the way llama.cpp's loader validates it: what it would skip is refused, and so
    is a name its ``std::stoi`` parses loosely (``direction.1x``); tensors naming one layer
    twice (``direction.1``, ``direction.01``) are summed, as llama.cpp sums them."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ControlVectorError(f"{path}: not a readable GGUF file ({e})") from e
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, TypeError):
            meta[key] = None
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ControlVectorError(
            f"{path}: general.architecture is {arch!r}, not {ARCH!r}: this is not a control vector "
            "(a model file?)"
        )
    directions: dict[int, np.ndarray] = {}
    width = None
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        if not m or int(m.group(1)) == 0:
            raise ControlVectorError(
                f"{path}: tensor {t.name!r} is not direction.<n> with n >= 1; llama.cpp would skip this file"
            )
        layer = int(m.group(1))
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ControlVectorError(
                f"{path}: {t.name} is {t.tensor_type.name} with shape {list(t.shape)}; llama.cpp needs "
                "1-D F32"
            )
        arr = np.array(t.data, dtype=np.float32, copy=True).reshape(-1)
        if width is not None and arr.shape[0] != width:
            raise ControlVectorError(f"{path}: {t.name} has {arr.shape[0]} entries, the others {width}")
        width = arr.shape[0]
        # two names for one layer (direction.1, direction.01): llama.cpp adds them up
        directions[layer] = directions[layer] + arr if layer in directions else arr
    if not directions:
        raise ControlVectorError(f"{path}: no direction.<n> tensors")
    return meta, directions


def from_gguf(path: str | os.PathLike, model: HookedTransformer, *, force: bool = False) -> SteeringVector:
    """Read a llama.cpp control vector as a ``SteeringVector`` of ``model``.

    ``direction.<n>`` becomes ``blocks.{n}.hook_resid_post`` (the module docstring says why).
    A file written by ``to_gguf`` carries its model's identity and must match ``model``
    (name, weights, tokenizer, width, depth) and its architecture; a file from elsewhere
    (llama.cpp's cvector-generator, repeng) must match the width, depth and, through
    ``controlvector.model_hint``, the architecture. ``force=True`` turns the identity and
    architecture checks into a warning; width and depth are never forced.
    """
    meta, dirs = read_control_vector(path)
    where = str(path)
    for n, arr in dirs.items():
        check_width(arr.shape[0], model, f"{where}: direction.{n}")
        check_layer(n, model, f"{where}: direction.{n}")
    header = meta.get(HEADER_KEY)
    if header is not None:
        try:
            header = json.loads(header)
        except (TypeError, ValueError) as e:
            raise ControlVectorError(f"{where}: {HEADER_KEY} is not JSON ({e})") from e
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ControlVectorError(f"{where}: {HEADER_KEY} is not a {FORMAT} header")
    _check_architecture(meta.get(f"{ARCH}.model_hint"), header, model, where, force)
    directions = {resid_post(n): torch.from_numpy(dirs[n]) for n in sorted(dirs)}
    if header is not None:
        vec = SteeringVector(
            directions, header["model"], header.get("recipe", {}), header.get("act_norm", {})
        )
    else:
        recipe = {
            "method": "llama.cpp control vector",
            "source": Path(path).name,
            "model_hint": meta.get(f"{ARCH}.model_hint"),
        }
        vec = SteeringVector(directions, model_identity(model), recipe)
    try:
        vec.check_model(model, force=force)
    except SteeringMismatchError as e:
        raise SteeringMismatchError(f"{where}: {e}") from None
    return vec.to(model.cfg.device)


def _check_architecture(
    hint: object, header: dict | None, model: HookedTransformer, where: str, force: bool
) -> None:
    arch = model_architecture(model)
    if header is not None and header.get("architecture") is not None:
        recorded = header["architecture"]
        if recorded == arch:
            return
        msg = f"{where} was made for a {recorded}, but {model.cfg.model_name} is a {arch}"
    else:
        accepted = {LLAMA_CPP_ARCH.get(arch or ""), HF_MODEL_TYPE.get(arch or "")} - {None}
        if not hint or not accepted or hint in accepted:
            return
        msg = (
            f"{where}: controlvector.model_hint is {hint!r}, but {model.cfg.model_name} is a {arch} "
            f"(llama.cpp/HF name {' or '.join(sorted(accepted))}). llama.cpp's own cvector-generator "
            "writes 'llama' for every model"
        )
    if force:
        warnings.warn("LOADING A CONTROL VECTOR MADE FOR ANOTHER ARCHITECTURE: " + msg, stacklevel=3)
        return
    raise ControlVectorError(msg + "; pass force=True if you are sure it fits")
