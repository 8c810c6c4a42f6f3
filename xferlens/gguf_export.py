"""De-quantize a GGUF file into an ordinary Hugging Face folder.

transformers reads GGUF files (de-quantizing to float32), but the model it returns is
marked as quantized and refuses ``save_pretrained``. We rebuild a plain model from the
same config on the ``meta`` device (no memory), hand it the de-quantized tensors, and save
that: safetensors weights, ``config.json`` with ``architectures`` set, the tokenizer with
its chat template. Later loads read this folder and skip the slow GGUF step.
"""

import importlib.metadata
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def gguf_to_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict:
    """Write the model in ``gguf_path`` as a Hugging Face folder at ``out_dir``.

    Returns a summary (architecture, parameter count, seconds, library versions) that
    callers store as provenance.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype
        )
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(quantized.state_dict(), assign=True, strict=False)
    missing = [k for k in result.missing_keys if not _is_tied(plain, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"de-quantized {gguf_path.name} does not fit its own config: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    del quantized
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in plain.parameters())
    return {
        "from_gguf": gguf_path.name,
        "architecture": config.architectures[0],
        "model_type": config.model_type,
        "n_params": n_params,
        "dtype": str(dtype).removeprefix("torch."),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "seconds": round(time.perf_counter() - t0, 1),
        "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "torch": torch.__version__,
    }


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, dict):
        tied = list(tied)
    return key in tied or (
        key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)
    )
