"""Hugging Face folder -> HookedTransformer config and weights.

TransformerLens 3.x builds configs from official names only, and its name-based dispatch
sniffs substrings ("llama", "gemma-3") of whatever string it is given. We read the
folder's ``config.json`` ourselves, pick the architecture from ``architectures[0]`` and
hand TransformerLens's own config and weight converters a folder whose name carries no
such hints. Gemma 3, which TransformerLens only configures by hub name, gets its config
built here from the checkpoint's own fields.
"""

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xferlens.errors import XferlensError

logger = logging.getLogger(__name__)


class UnsupportedArchitectureError(XferlensError, ValueError):
    pass


@dataclass(frozen=True)
class ArchSupport:
    key: str  # short name used in the zoo table and the docs
    hf_architecture: str
    config: Callable[[Path, Any], dict[str, Any]]
    weights: Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]


def _tl_config_from_folder(folder: Path, hf_config: Any) -> dict[str, Any]:
    """TransformerLens's own config conversion, run on a neutrally named copy of config.json."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == "gpt2" and "n_ctx" not in raw:
        raw["n_ctx"] = raw.get("n_positions", 1024)  # TL reads n_ctx; newer configs omit it
    with tempfile.TemporaryDirectory(prefix="xferlens-cfg-") as tmp:
        neutral = Path(tmp) / "model"
        neutral.mkdir()
        (neutral / "config.json").write_text(json.dumps(raw))
        cfg = convert_hf_model_config(str(neutral))
    return cfg


def _gemma3_config(folder: Path, hf_config: Any) -> dict[str, Any]:
    """Gemma 3 text models, from the checkpoint's config (TL 3.x only knows hub names)."""
    c = getattr(hf_config, "text_config", hf_config)
    rope = getattr(c, "rope_parameters", None) or {}
    full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    rope_theta = full.get("rope_theta", getattr(c, "rope_theta", 1_000_000.0))
    rope_local = local.get("rope_theta", getattr(c, "rope_local_base_freq", 10_000.0))
    layer_types = list(getattr(c, "layer_types", None) or [])
    if not layer_types:
        pattern = getattr(c, "sliding_window_pattern", 6)
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(c.num_hidden_layers)
        ]
    cfg = {
        "d_model": c.hidden_size,
        "d_head": c.head_dim,
        "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers,
        "n_ctx": c.max_position_embeddings,
        "eps": c.rms_norm_eps,
        "d_vocab": c.vocab_size,
        "act_fn": getattr(c, "hidden_activation", None) or "gelu_pytorch_tanh",
        "initializer_range": getattr(c, "initializer_range", 0.02),
        "normalization_type": "RMS",
        "rotary_base": int(rope_theta),
        "rotary_base_local": int(rope_local),
        "positional_embedding_type": "rotary",
        "rotary_dim": c.head_dim,
        "rotary_adjacent_pairs": False,
        "use_attn_scale": True,
        "attn_scale": float(getattr(c, "query_pre_attn_scalar", c.head_dim)) ** 0.5,
        "n_key_value_heads": c.num_key_value_heads,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "use_qk_norm": True,
        "window_size": c.sliding_window,
        "use_local_attn": True,
        "attn_types": ["global" if t == "full_attention" else "local" for t in layer_types],
        "original_architecture": "Gemma3ForCausalLM",
    }
    if getattr(c, "attn_logit_softcapping", None):
        cfg["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
    if getattr(c, "final_logit_softcapping", None):
        cfg["output_logits_soft_cap"] = float(c.final_logit_softcapping)
    scaling = full.get("rope_type", "default")
    if scaling not in (None, "default"):
        raise UnsupportedArchitectureError(
            f"gemma3 checkpoint uses rope scaling {scaling!r}, which xferlens does not convert"
        )
    return cfg


def _weights(name: str) -> Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]:
    def convert(hf_model: torch.nn.Module, cfg: Any) -> dict[str, torch.Tensor]:
        from transformer_lens.pretrained import weight_conversions as wc

        return getattr(wc, name)(hf_model, cfg)

    convert.__name__ = name
    return convert


SUPPORTED: dict[str, ArchSupport] = {
    a.hf_architecture: a
    for a in [
        ArchSupport("llama", "LlamaForCausalLM", _tl_config_from_folder, _weights("convert_llama_weights")),
        ArchSupport("qwen2", "Qwen2ForCausalLM", _tl_config_from_folder, _weights("convert_qwen2_weights")),
        ArchSupport("gemma3", "Gemma3ForCausalLM", _gemma3_config, _weights("convert_gemma_weights")),
        ArchSupport("gpt2", "GPT2LMHeadModel", _tl_config_from_folder, _weights("convert_gpt2_weights")),
    ]
}


def supported_architectures() -> list[str]:
    return [f"{a.key} ({a.hf_architecture})" for a in SUPPORTED.values()]


def read_hf_config(folder: Path) -> Any:
    """The folder's transformers config; errors name the folder and the fix."""
    from transformers import AutoConfig

    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no config.json: a local model must be a Hugging Face folder "
            "(config.json, weights, tokenizer files). For a single GGUF file, pass the path "
            "of the .gguf file itself."
        )
    return AutoConfig.from_pretrained(folder)


def arch_for(hf_config: Any, folder: Path) -> ArchSupport:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED:
            return SUPPORTED[arch]
    got = archs[0] if archs else f"model_type={getattr(hf_config, 'model_type', '?')!r}"
    raise UnsupportedArchitectureError(
        f"architecture {got} of {str(folder)!r} is not supported by xferlens's local loader; "
        f"supported: {', '.join(supported_architectures())}. Models that TransformerLens "
        "lists by official name can still be loaded by that name."
    )
