"""Mapper artifacts: ``mapper.safetensors`` (weights) + ``mapper.json`` (everything else).

The JSON holds the format version, kind, widths, config, both models' identities and
hooks, a training-data summary, report-card figures, library versions and the sha256 of
the weights file. Loading checks the hash before reading a byte of tensor data, so a
truncated or altered weights file is refused with the folder named; no pickle anywhere.
"""

import os
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from xferlens.artifacts import ArtifactError, read_artifact, write_artifact
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
    cls = mapper_class(header["kind"])
    config = cls.config_class.from_dict(header["config"])
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
