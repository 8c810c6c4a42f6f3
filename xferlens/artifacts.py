"""Shareable artifacts: one ``<stem>.safetensors`` (tensors) + one ``<stem>.json`` (the rest).

Mappers and steering vectors are saved this way. The JSON names the format, carries the
sha256 of the tensor file and library versions; reading checks the hash before a byte of
tensor data is parsed, so a truncated or altered file is refused with the folder named.
No pickle anywhere: artifacts are safe to load from someone else.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file


class ArtifactError(ValueError):
    """An artifact folder is missing a file, corrupted, tampered with, or of another format."""


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for k in ("xferlens", "torch", "transformer-lens"):
        try:
            out[k] = version(k)
        except PackageNotFoundError:
            out[k] = None
    return out


def write_artifact(
    folder: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor], header: dict
) -> Path:
    """Write ``tensors`` and ``header`` (plus format bookkeeping) to ``folder``; return it.

    The tensor file is written under a temporary name and renamed, so an interrupted save
    never leaves a complete-looking artifact.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = folder / f"{stem}.safetensors.partial"
    save_file(tensors, tmp)
    header = {
        **header,
        "weights_sha256": hashlib.sha256(tmp.read_bytes()).hexdigest(),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "versions": library_versions(),
    }
    os.replace(tmp, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(header, indent=1, default=float))
    return folder


def read_artifact(
    folder: str | os.PathLike, stem: str, fmt: str, error: type[ArtifactError] = ArtifactError
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify an artifact written by :func:`write_artifact`: ``(header, tensors)``."""
    folder = Path(folder)
    hpath, wpath = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not hpath.is_file() or not wpath.is_file():
        raise error(f"{folder} is not a {stem} folder: it needs {hpath.name} and {wpath.name}")
    try:
        header = json.loads(hpath.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{hpath} is not valid JSON ({e}); the artifact is corrupted") from e
    if not isinstance(header, dict) or header.get("format") != fmt:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise error(f"{hpath}: format {got!r}, expected {fmt!r}")
    raw = wpath.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    if sha != header.get("weights_sha256"):
        raise error(
            f"{wpath}: sha256 {sha[:12]}… does not match {hpath.name} "
            f"({str(header.get('weights_sha256'))[:12]}…): "
            "the tensors were truncated or altered; get the artifact again"
        )
    return header, load_bytes(raw)
