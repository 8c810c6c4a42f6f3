"""Mappers between two models' residual streams: kinds, fitting, artifacts.

>>> from xferlens.mappers import fit_mapper, load_mapper, MAPPERS  # doctest: +SKIP
>>> sorted(MAPPERS)  # doctest: +SKIP
['affine', 'autoencoder', 'lowrank', 'orthogonal']
"""

from xferlens.mappers.affine import AffineConfig, AffineMapper
from xferlens.mappers.autoencoder import AutoencoderConfig, AutoencoderMapper
from xferlens.mappers.base import (
    MAPPERS,
    Mapper,
    MapperConfig,
    MapperMismatchError,
    NonFiniteError,
    PairSource,
    register,
)
from xferlens.mappers.controls import RandomMapper, random_direction_like, random_map_like
from xferlens.mappers.fit import fit_mapper
from xferlens.mappers.io import MapperFileError, load_mapper, save_mapper
from xferlens.mappers.lowrank import LowRankConfig, LowRankMapper
from xferlens.mappers.orthogonal import OrthogonalConfig, OrthogonalMapper

__all__ = [
    "MAPPERS",
    "AffineConfig",
    "AffineMapper",
    "AutoencoderConfig",
    "AutoencoderMapper",
    "LowRankConfig",
    "LowRankMapper",
    "Mapper",
    "MapperConfig",
    "MapperFileError",
    "MapperMismatchError",
    "NonFiniteError",
    "OrthogonalConfig",
    "OrthogonalMapper",
    "PairSource",
    "RandomMapper",
    "fit_mapper",
    "load_mapper",
    "random_direction_like",
    "random_map_like",
    "register",
    "save_mapper",
]
