"""Mapper artifacts: ``mapper.safetensors`` (weights) + ``mapper.json`` (everything else).

The JSON holds the format version, kind, widths, config, both models' identities and
hooks, a training-data summary, report-card figures, library versions, the sha256 of
the weights file and a seal over all of it (:mod:`xferlens.artifacts`). Loading checks the
seal and the hash before reading a byte of tensor data, so a truncated or altered file is
refused with the folder named, then range-checks the values that drive computation (the
recorded hooks, widths and activation scales); no pickle anywhere.
"""

import os
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import split_hook
from xferlens.artifacts import (
    ArtifactError,
    check_count,
    check_hook_name,
    check_scale,
    read_artifact,
    write_artifact,
)
from xferlens.mappers.base import Mapper, mapper_class

FORMAT = "xferlens.mapper/1"
STEM = "mapper"
WEIGHTS = "mapper.safetensors"
HEADER = "mapper.json"


class MapperFileError(ArtifactError):
    pass


def save_mapper(mapper: Mapper, folder: str | os.PathLike) -> Path:
    header = {
        "format": FORMAT,
        "kind": mapper.kind,
        "d_src": mapper.d_src,
        "d_tgt": mapper.d_tgt,
        "config": mapper.config.to_dict(),
        "meta": mapper.meta,
    }
    return write_artifact(folder, STEM, mapper.state_dict(), header)


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
    header, tensors = read_artifact(folder, STEM, FORMAT, MapperFileError)
    check_header(header, Path(folder) / HEADER)
    try:
        cls = mapper_class(header["kind"])
        config = cls.config_class.from_dict(header["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise MapperFileError(f"{Path(folder) / HEADER}: {e}; get the artifact again") from e
    mapper = cls(header["d_src"], header["d_tgt"], config)
    try:
        mapper.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise MapperFileError(
            f"{Path(folder) / WEIGHTS}: tensors do not fit a {header['kind']} mapper: {e}"
        ) from e
    mapper.meta = header.get("meta", {})
    mapper.to(device)
    mapper.check_models(src, tgt, force=force)
    return mapper


#: activation scales ``transfer(..., recalibrate=...)`` computes with, and whether 0 may be
#: recorded (a spread is 0 when every training row is the same; ``transfer`` refuses it)
_SCALES = {"src_norm": False, "tgt_norm": False, "src_spread": True, "tgt_spread": True}


def check_header(header: dict, where: Path) -> None:
    """Range-check the header values a loaded mapper computes with; raise :class:`MapperFileError`."""
    err, at = MapperFileError, str(where)
    widths = {"src": check_count(header.get("d_src"), "d_src", at, err)}
    widths["tgt"] = check_count(header.get("d_tgt"), "d_tgt", at, err)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise err(f"{at}: meta is {meta!r}, expected a dict; get the artifact again")
    for role in ("src", "tgt"):
        side = meta.get(role)
        if side is None:
            continue
        if not isinstance(side, dict):
            raise err(f"{at}: meta.{role} is {side!r}, expected a model identity; get the artifact again")
        n_layers = side.get("n_layers")
        if n_layers is not None:
            check_count(n_layers, f"meta.{role}.n_layers", at, err)
        hooks = [side["hook"]] if not isinstance(side.get("hook"), str) else split_hook(side["hook"])
        if side.get("d_model") is not None and side["d_model"] * len(hooks) != widths[role]:
            raise err(
                f"{at}: meta.{role}.d_model is {side['d_model']!r}"
                + (f" at each of {len(hooks)} hooks" if len(hooks) > 1 else "")
                + f", but the mapper is {header['d_src']} -> {header['d_tgt']}; get the artifact again"
            )
        if side.get("hook") is not None:
            for h in hooks:  # a multi-layer source names several, joined by "+"
                check_hook_name(h, f"{at} (meta.{role}.hook)", err, n_layers=n_layers)
        for key in ("name", "weights", "tokenizer"):
            if side.get(key) is not None and not isinstance(side[key], str):
                raise err(
                    f"{at}: meta.{role}.{key} is {side[key]!r}, expected a string; get the artifact again"
                )
    training = meta.get("training") or {}
    if not isinstance(training, dict):
        raise err(f"{at}: meta.training is {training!r}, expected a dict; get the artifact again")
    for key, allow_zero in _SCALES.items():
        if training.get(key) is not None:
            check_scale(training[key], f"meta.training.{key}", at, err, allow_zero=allow_zero)
