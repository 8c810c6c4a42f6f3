"""What identifies a model for artifacts: name, weights fingerprint, tokenizer, shape.

Mappers and steering vectors record the identity of the models they were made with and
refuse to be applied to others. The weights fingerprint comes from ``load_model`` (the
zoo's sha256 or a hash of the local folder); for a model built another way it is a hash
of its parameters. The tokenizer fingerprint hashes the vocabulary and the BOS rule.
"""

import hashlib
import json

import torch
from transformer_lens import HookedTransformer


def weights_fingerprint(model: HookedTransformer) -> str:
    src = getattr(model, "xferlens_source", None) or {}
    if src.get("fingerprint"):
        return str(src["fingerprint"])
    cached = getattr(model, "_xferlens_params_sha", None)
    if cached is None:
        h = hashlib.sha256()
        with torch.no_grad():
            for name, p in sorted(model.state_dict().items()):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        cached = "params:" + h.hexdigest()[:32]
        model._xferlens_params_sha = cached
    return cached


def tokenizer_fingerprint(model: HookedTransformer) -> str | None:
    tok = model.tokenizer
    if tok is None:
        return None
    cached = getattr(tok, "_xferlens_sha", None)
    if cached is None:
        payload = json.dumps(
            {
                "vocab": sorted(tok.get_vocab().items()),
                "bos": tok.bos_token_id,
                "prepend_bos": bool(model.cfg.default_prepend_bos),
            }
        )
        cached = "vocab:" + hashlib.sha256(payload.encode()).hexdigest()[:32]
        tok._xferlens_sha = cached
    return cached


def model_identity(model: HookedTransformer) -> dict:
    """``{"name", "weights", "tokenizer", "d_model", "n_layers"}`` of a model."""
    return {
        "name": model.cfg.model_name,
        "weights": weights_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(model),
        "d_model": model.cfg.d_model,
        "n_layers": model.cfg.n_layers,
    }


def identity_differences(recorded: dict, actual: dict, role: str) -> list[str]:
    """Human-readable list of the fields where ``actual`` differs from ``recorded``."""
    out = []
    for key in ("name", "d_model", "n_layers", "weights", "tokenizer"):
        if key in recorded and recorded[key] != actual.get(key):
            out.append(f"{role} {key}: recorded {recorded[key]!r}, given {actual.get(key)!r}")
    return out
