"""Mapper artifacts: ``mapper.safetensors`` (weights) + ``mapper.json`` (everything else).

The JSON holds the format version, kind, widths, config, both models' identities and
hooks, a training-data summary, report-card figures, library versions and the sha256 of
the weights file. Loading checks the hash before reading a byte of tensor data, so a
truncated or altered weights file is refused with the folder named; no pickle anywhere.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from transformer_lens import HookedTransformer

from xferlens.mappers.base import Mapper, mapper_class

FORMAT = "xferlens.mapper/1"
WEIGHTS = "mapper.safetensors"
HEADER = "mapper.json"


class MapperFileError(ValueError):
    pass


def _versions() -> dict:
    from importlib.metadata import version

    return {k: version(k) for k in ("xferlens", "torch", "transformer-lens")}


def save_mapper(mapper: Mapper, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in mapper.state_dict().items()}
    tmp = folder / (WEIGHTS + ".partial")
    save_file(tensors, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    header = {
        "format": FORMAT,
        "kind": mapper.kind,
        "d_src": mapper.d_src,
        "d_tgt": mapper.d_tgt,
        "config": mapper.config.to_dict(),
        "meta": mapper.meta,
        "weights_sha256": sha,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "versions": _versions(),
    }
    os.replace(tmp, folder / WEIGHTS)
    (folder / HEADER).write_text(json.dumps(header, indent=1, default=float))
    return folder


def load_mapper(
    folder: str | os.PathLike,
    src: HookedTransformer | None = None,
    tgt: HookedTransformer | None = None,
    *,
    force: bool = False,
    device: str | torch.device = "cpu",
) -> Mapper:
    """Load a mapper saved with ``mapper.save(folder)``.

    When ``src``/``tgt`` are given, refuse them unless they are the models the mapper was
    fitted between (``force=True``: warn loudly instead).
    """
    folder = Path(folder)
    hpath, wpath = folder / HEADER, folder / WEIGHTS
    if not hpath.is_file() or not wpath.is_file():
        raise MapperFileError(f"{folder} is not a mapper folder: it needs {HEADER} and {WEIGHTS}")
    try:
        header = json.loads(hpath.read_text())
    except json.JSONDecodeError as e:
        raise MapperFileError(f"{hpath} is not valid JSON ({e}); the artifact is corrupted") from e
    if header.get("format") != FORMAT:
        raise MapperFileError(f"{hpath}: format {header.get('format')!r}, expected {FORMAT!r}")
    raw = wpath.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    if sha != header.get("weights_sha256"):
        raise MapperFileError(
            f"{wpath}: sha256 {sha[:12]}… does not match {HEADER} "
            f"({str(header.get('weights_sha256'))[:12]}…): "
            "the weights were truncated or altered; get the artifact again"
        )
    cls = mapper_class(header["kind"])
    config = cls.config_class.from_dict(header["config"])
    mapper = cls(header["d_src"], header["d_tgt"], config)
    tensors = load_bytes(raw)
    try:
        mapper.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise MapperFileError(f"{wpath}: tensors do not fit a {header['kind']} mapper: {e}") from e
    mapper.meta = header.get("meta", {})
    mapper.to(device)
    mapper.check_models(src, tgt, force=force)
    return mapper
