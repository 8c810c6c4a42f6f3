"""Chance baselines that sit beside a mapper in every report: "a random map like this one"
and "a random direction like this one".

Both are seeded, so a report's control is the same on every run. The report card's
``random_map`` patch, the feature-matching ``random map`` column and the steering
evaluation's ``random`` vector all come from here.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from xferlens.mappers.base import Mapper


class RandomMapper(Mapper):
    """A seeded Gaussian matrix ``W`` (``d_src x d_tgt``, entries ``N(0, 1 / d_src)``), applied
    as ``x @ W``: a linear map that knows nothing of either model. Not a registered kind
    (nothing fits or loads it); make one with :func:`random_map_like`."""

    kind = "random"
    is_linear = True

    def __init__(self, d_src: int, d_tgt: int, seed: int = 0):
        super().__init__(d_src, d_tgt)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(d_src, d_tgt, generator=g) / d_src**0.5)

    def _map(self, x: Tensor) -> Tensor:
        return x @ self.W


def random_map_like(mapper: Mapper, seed: int = 0) -> RandomMapper:
    """A :class:`RandomMapper` with ``mapper``'s shape, between the same models and hooks.

    Example:
        >>> control = random_map_like(mapper, seed=0)  # doctest: +SKIP
        >>> control(pairs.src).shape == mapper(pairs.src).shape  # doctest: +SKIP
        True
    """
    out = RandomMapper(mapper.d_src, mapper.d_tgt, seed)
    out.meta = {role: dict(mapper.meta[role]) for role in ("src", "tgt") if mapper.meta.get(role)}
    out.meta["control"] = {"random_like": mapper.kind, "seed": seed}
    return out


def random_direction_like(
    direction: Float[Tensor, " d"], seed: int | torch.Generator = 0
) -> Float[Tensor, " d"]:
    """A Gaussian direction with ``direction``'s norm (float32, on the CPU).

    ``seed`` may be a ``torch.Generator`` to draw several directions from one stream (one
    per hook of a steering vector, in order).
    """
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    r = torch.randn(direction.shape[0], generator=g)
    return r / r.norm() * direction.float().norm()
