"""Shareable artifacts: one ``<stem>.safetensors`` (tensors) + one ``<stem>.json`` (the rest).

Mappers and steering vectors are saved this way. The JSON names the format, carries the
sha256 of the tensor file (``weights_sha256``), the tensors' shapes, library versions and,
as its last field, a ``seal``. No pickle anywhere: artifacts are safe to load from someone
else in the sense that loading one runs no code.

What the seal promises. ``seal`` is ``"sha256:" + sha256(canonical JSON of every other
field)``, canonical meaning ``json.dumps(..., sort_keys=True, separators=(",", ":"))``.
The other fields include ``weights_sha256``, so one digest covers the tensors *and* every
header value that drives computation (hooks, model identities, recorded activation
scales such as a mapper's ``meta.training.tgt_norm``). The JSON file must also be, byte
for byte, the form the writer produced (``json.dumps(header, indent=1)`` and a newline),
so even an edit that parses to the same values is refused. Reading checks, in order: the
format, the seal, the tensor file's sha256, the tensors' names and shapes against the
header, and that no tensor holds NaN or inf; callers then range-check the values they
use (:func:`check_scale`, :func:`check_hook_name`). A failure names the file and says to
get the artifact again.

This is **integrity, not authenticity**: the seal catches truncation, bit rot, careless
hand edits, and an edit of either file that recomputes the other's hash; it has no key, so
someone who rewrites the header *and* recomputes the seal is not caught. Take artifacts
from sources you trust for their numbers.

Artifacts written before seals existed (no ``seal``, header ending in ``weights_sha256``,
``tensors``, ``versions``) still load, with a logged warning that they are unsealed; the
range checks apply to them as to any other. Save them again to seal them.
"""

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from xferlens.errors import XferlensError

logger = logging.getLogger(__name__)

SEAL_PREFIX = "sha256:"
#: the fields the pre-seal writer appended, in this order, at the end of every header
_LEGACY_TAIL = ["weights_sha256", "tensors", "versions"]
#: TransformerLens hook names: ``hook_embed``, ``blocks.3.hook_resid_post``,
#: ``blocks.3.attn.hook_z``, ``blocks.3.ln1.hook_scale``, ``ln_final.hook_normalized``, ...
HOOK_NAME = re.compile(
    r"^(?:(?!blocks\.)(?:[a-z][a-z0-9_]*\.)?hook_\w+|blocks\.(\d+)\.(?:[a-z][a-z0-9_]*\.)?hook_\w+)$"
)


class ArtifactError(XferlensError, ValueError):
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


def _written_form(header: dict) -> str:
    """The exact text of a header file."""
    return json.dumps(header, indent=1) + "\n"


def seal_of(header: dict) -> str:
    """The seal of a header: sha256 of the canonical JSON of its fields other than ``seal``."""
    body = {k: v for k, v in header.items() if k != "seal"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return SEAL_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def write_artifact(
    folder: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor], header: dict
) -> Path:
    """Write ``tensors`` and ``header`` (plus format bookkeeping and the seal) to ``folder``.

    The tensor file is written under a temporary name and renamed, and the header (which
    holds the seal) is written last the same way, so an interrupted save never leaves a
    complete-looking artifact.
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
    # normalise to plain JSON values (tuples -> lists, numpy/tensor scalars -> float) so the
    # seal is computed over exactly what a reader will parse
    header = json.loads(json.dumps(header, default=float))
    header.pop("seal", None)
    header["seal"] = seal_of(header)
    os.replace(tmp, folder / f"{stem}.safetensors")
    htmp = folder / f"{stem}.json.partial"
    htmp.write_text(_written_form(header))
    os.replace(htmp, folder / f"{stem}.json")
    return folder


def read_artifact(
    folder: str | os.PathLike, stem: str, fmt: str, error: type[ArtifactError] = ArtifactError
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify an artifact written by :func:`write_artifact`: ``(header, tensors)``."""
    folder = Path(folder)
    hpath, wpath = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not hpath.is_file() or not wpath.is_file():
        raise error(f"{folder} is not a {stem} folder: it needs {hpath.name} and {wpath.name}")
    again = "; get the artifact again"
    try:
        text = hpath.read_bytes().decode("utf-8")
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{hpath} is not valid JSON ({e}); the artifact is corrupted{again}") from e
    if not isinstance(header, dict) or header.get("format") != fmt:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise error(f"{hpath}: format {got!r}, expected {fmt!r}")
    _check_seal(header, text, hpath, error)
    raw = wpath.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    if sha != header.get("weights_sha256"):
        raise error(
            f"{wpath}: sha256 {sha[:12]}… does not match {hpath.name} "
            f"({str(header.get('weights_sha256'))[:12]}…): "
            f"the tensors were truncated or altered{again}"
        )
    try:
        tensors = load_bytes(raw)
    except Exception as e:  # safetensors raises its own error types
        raise error(f"{wpath} cannot be parsed as safetensors ({e}){again}") from e
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if header.get("tensors") != shapes:
        raise error(
            f"{wpath} holds tensors {shapes}, but {hpath.name} lists {header.get('tensors')}; "
            f"the artifact is inconsistent{again}"
        )
    for k, v in tensors.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise error(f"{wpath}: tensor {k!r} has NaN or inf entries{again}")
    return header, tensors


def _check_seal(header: dict, text: str, hpath: Path, error: type[ArtifactError]) -> None:
    again = "; get the artifact again"
    if "seal" not in header:
        if list(header)[-len(_LEGACY_TAIL) :] != _LEGACY_TAIL:
            raise error(
                f"{hpath} has no seal, and it is not an artifact from before seals existed "
                f"(its fields end in {list(header)[-3:]}): it was altered{again}"
            )
        logger.warning(
            "%s is unsealed (written before artifacts were sealed): its tensors are checked against "
            "weights_sha256, but edits to the JSON would go unnoticed; save it again to seal it",
            hpath,
        )
        return
    seal = header["seal"]
    if list(header)[-1] != "seal" or not isinstance(seal, str) or not seal.startswith(SEAL_PREFIX):
        raise error(f"{hpath}: malformed seal {seal!r}; the artifact was altered{again}")
    if text.replace("\r\n", "\n") != _written_form(header):
        raise error(f"{hpath} is not in the form it was written in: it was edited{again}")
    want = seal_of(header)
    if seal != want:
        raise error(
            f"{hpath}: seal {seal[:19]}… does not match its contents ({want[:19]}…): the header or "
            f"the recorded tensor hash was edited after saving{again}"
        )


# ---------------------------------------------------------------- range checks on load


def check_scale(
    value: Any, name: str, where: str, error: type[Exception] = ArtifactError, *, allow_zero: bool = False
) -> float:
    """``value`` as a float, refused unless it is a finite number > 0 (``>= 0`` with ``allow_zero``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise error(f"{where}: {name} is {value!r}, expected a finite number {bound}; get the artifact again")
    return float(value)


def check_count(value: Any, name: str, where: str, error: type[Exception] = ArtifactError) -> int:
    """``value`` refused unless it is a positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{where}: {name} is {value!r}, expected a positive integer; get the artifact again")
    return value


def check_hook_name(
    name: Any, where: str, error: type[Exception] = ArtifactError, *, n_layers: int | None = None
) -> int | None:
    """Refuse anything but a TransformerLens hook name (in range when ``n_layers`` is known);
    return its block number (``None`` for hooks outside the blocks)."""
    m = HOOK_NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise error(
            f"{where}: {name!r} is not a TransformerLens hook name (such as 'blocks.3.hook_resid_post'); "
            "get the artifact again"
        )
    layer = int(m.group(1)) if m.group(1) is not None else None
    if layer is not None and n_layers is not None and layer >= n_layers:
        raise error(
            f"{where}: hook {name!r} is at layer {layer}, but the model recorded has {n_layers} layers "
            f"(0..{n_layers - 1}); get the artifact again"
        )
    return layer
