"""The ``Mapper`` base class, the kind registry, and what a mapper is fitted from.

A mapper is an ``nn.Module`` taking source-model activations ``[..., d_src]`` to
target-model activations ``[..., d_tgt]``. Each kind (``affine``, ``orthogonal``,
``autoencoder``, ...) is one class registered under its name with a config dataclass;
callers only see :class:`Mapper`, :func:`fit_mapper` and :func:`load_mapper`, so a new
kind needs no change anywhere else.
"""

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from einops import rearrange, reduce
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import split_hook
from xferlens.errors import ModelMismatchError, XferlensError
from xferlens.identity import ModelId, check

logger = logging.getLogger(__name__)


class MapperMismatchError(ModelMismatchError):
    """A mapper (or its input) does not belong to the models or data it is used with."""


class NonFiniteError(XferlensError, ValueError):
    """NaN or inf found in activations."""


@runtime_checkable
class PairSource(Protocol):
    """Anything that streams paired rows: :class:`~xferlens.activations.Pairs` in memory,
    :class:`~xferlens.activations.PairShards` on disk."""

    meta: dict

    @property
    def d_src(self) -> int: ...

    @property
    def d_tgt(self) -> int: ...

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]: ...

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["PairSource", "PairSource"]: ...


@dataclass
class MapperConfig:
    """Base of every kind's config: plain fields, round-trips through JSON."""

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MapperConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)


MAPPERS: dict[str, type["Mapper"]] = {}


def register(cls: type["Mapper"]) -> type["Mapper"]:
    """Class decorator: make a mapper kind available to ``fit_mapper`` and ``load_mapper``."""
    if not cls.kind or cls.kind in MAPPERS:
        raise ValueError(f"mapper kind {cls.kind!r} missing or registered twice")
    MAPPERS[cls.kind] = cls
    return cls


def mapper_class(kind: str) -> type["Mapper"]:
    if kind not in MAPPERS:
        raise ValueError(f"unknown mapper kind {kind!r}; registered kinds: {', '.join(sorted(MAPPERS))}")
    return MAPPERS[kind]


class Mapper(nn.Module):
    """Base class: shape checks, dtype handling, provenance, model checks, save.

    Subclasses set ``kind`` and ``config_class``, build their layers in ``__init__`` and
    implement ``_map`` (on float32 inputs) and the classmethod ``fit``.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[MapperConfig]] = MapperConfig
    #: ``M(x + v) - M(x)`` is the same for every ``x`` (affine maps): vectors transfer exactly
    is_linear: ClassVar[bool] = False

    def __init__(self, d_src: int, d_tgt: int, config: MapperConfig | None = None):
        super().__init__()
        if d_src < 1 or d_tgt < 1:
            raise ValueError(f"d_src and d_tgt must be positive, got {d_src} and {d_tgt}")
        self.d_src, self.d_tgt = int(d_src), int(d_tgt)
        self.config = config if config is not None else self.config_class()
        #: provenance: ``src``/``tgt`` (model identity + hook), ``training``, ``report``
        self.meta: dict[str, Any] = {}

    def forward(self, x: Float[Tensor, "*batch d_src"]) -> Float[Tensor, "*batch d_tgt"]:
        if x.shape[-1] != self.d_src:
            raise MapperMismatchError(
                f"input has last dimension {x.shape[-1]} but this {self.kind} mapper expects d_src="
                f"{self.d_src} ({self._side('src')}); pass activations of the source model's hook"
            )
        p = next(iter([*self.parameters(), *self.buffers()]))
        y = self._map(x.to(device=p.device, dtype=p.dtype))
        return y.to(device=x.device, dtype=x.dtype)  # outputs live where the inputs do

    def _map(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def map_direction(
        self,
        v: Float[Tensor, " d_src"],
        source_rows: Float[Tensor, "n d_src"] | None = None,
        method: str = "auto",
        *,
        step: float = 1.0,
        max_rows: int | None = None,
    ) -> Float[Tensor, " d_tgt"]:
        """A source-space direction (a difference of activations) carried into the target space.

        ``"linear"`` (``auto`` for affine maps): ``M(v) - M(0)``, exact when ``M(x + v) - M(x)``
        does not depend on ``x``. ``"mean_difference"`` (``auto`` otherwise): the mean over
        ``source_rows`` (real source activations at the map's source hook) of
        ``(M(h + step * v) - M(h)) / step``. Returned in float32 on the mapper's device.

        Args:
            step: how far along ``v`` the rows are pushed (``"mean_difference"`` only; the
                result stays in units of ``v``). The default pushes by ``v`` itself, right
                for a steering vector; a unit direction (an SAE feature) wants a push of
                the size of a feature, e.g. a quarter of the rows' mean norm.
            max_rows: use only the first ``max_rows`` of ``source_rows`` (``None``: all).
        """
        if v.ndim != 1 or v.shape[0] != self.d_src:
            raise MapperMismatchError(
                f"direction has shape {tuple(v.shape)} but this {self.kind} mapper expects "
                f"({self.d_src},) ({self._side('src')})"
            )
        if method == "auto":
            method = "linear" if self.is_linear else "mean_difference"
        p = next(iter([*self.parameters(), *self.buffers()]))
        v = v.to(device=p.device, dtype=torch.float32)
        if method == "linear":
            one_row = rearrange(v, "d -> 1 d")
            return rearrange(self(one_row) - self(torch.zeros_like(one_row)), "1 d -> d")
        if method != "mean_difference":
            raise ValueError(f"method must be 'auto', 'linear' or 'mean_difference', not {method!r}")
        if not step > 0 or not math.isfinite(step):
            raise ValueError(f"step must be a positive finite number, got {step}")
        if max_rows is not None:
            if max_rows < 1:
                raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
            source_rows = source_rows[:max_rows] if source_rows is not None else None
        if source_rows is None or source_rows.ndim != 2 or len(source_rows) == 0:
            raise ValueError(
                f"method='mean_difference' (the default for a {self.kind} mapper) needs source_rows: "
                "[n, d_src] real activations of the source model at the mapper's source hook, "
                "e.g. pairs.src"
            )
        if not torch.isfinite(source_rows).all():
            raise ValueError("source_rows has NaN or inf entries")
        total = torch.zeros(self.d_tgt, dtype=torch.float64, device=p.device)
        push = v if step == 1.0 else step * v
        for chunk in source_rows.split(4096):
            h = chunk.to(device=p.device, dtype=torch.float32)
            total += reduce((self(h + push) - self(h)).double(), "row d -> d", "sum")
        return (total / (len(source_rows) * step)).float()

    @torch.no_grad()
    def shrinkage(
        self,
        direction: Float[Tensor, " d_tgt"],
        source_rows: Float[Tensor, "n d_src"],
        target_rows: Float[Tensor, "n d_tgt"],
    ) -> float:
        """std(target rows along ``direction``) / std(mapped source rows along it), row i of
        both the same token: how much the map squeezes that direction. A least-squares map
        predicts ``E[y | x]``, whose spread along a direction it predicts poorly is smaller
        than the target's own, so a vector it carries comes out short by about this factor
        (the assumption: the vector is shortened as the rows are)."""
        if len(source_rows) != len(target_rows) or len(source_rows) < 3:
            raise ValueError(
                f"source_rows ({len(source_rows)}) and target_rows ({len(target_rows)}) must be paired "
                "rows of the same tokens, at least 3"
            )
        u = direction.double().cpu()
        u = u / u.norm()
        mapped = torch.cat([self(b.float()) for b in source_rows.split(4096)]).double().cpu() @ u
        spread = float(mapped.std())
        if not spread > 0:
            raise ValueError("the mapped rows do not vary along the direction; give varied rows")
        return float((target_rows.double().cpu() @ u).std()) / spread

    @classmethod
    def fit(cls, train: PairSource, val: PairSource | None, config: MapperConfig, *, progress: bool = True):
        raise NotImplementedError

    # ---------------------------------------------------------------- provenance

    def _side(self, role: str) -> str:
        m = self.meta.get(role) or {}
        return f"{m.get('name', '?')} {m.get('hook', '')}".strip()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters()) + sum(b.numel() for b in self.buffers())

    @property
    def src_hook(self) -> str | None:
        return (self.meta.get("src") or {}).get("hook")

    @property
    def tgt_hook(self) -> str | None:
        return (self.meta.get("tgt") or {}).get("hook")

    def check_models(
        self, src: HookedTransformer | None, tgt: HookedTransformer | None, *, force: bool = False
    ) -> None:
        """Refuse models other than the ones this mapper was fitted between.

        Compares names, widths, weights fingerprints and tokenizers; ``force=True`` turns
        the refusal into a loud warning.
        """
        sides, widths = [], []
        for role, model, label in (("src", src, "source"), ("tgt", tgt, "target")):
            if model is None:
                continue
            sides.append((label, ModelId.read(self.meta, role), model))
            d = self.d_src if role == "src" else self.d_tgt
            hook = self.src_hook if role == "src" else self.tgt_hook
            hooks = len(split_hook(hook)) if hook else 1
            if model.cfg.d_model * hooks != d:  # a multi-layer side (a joined hook) is several wide
                widths.append(
                    f"{label} d_model: mapper expects {d // hooks}"
                    + (f" at each of {hooks} hooks" if hooks > 1 else "")
                    + f", {model.cfg.model_name} has {model.cfg.d_model}"
                )
        check(
            f"this {self.kind} mapper was fitted for {self._side('src')} -> {self._side('tgt')}, "
            "and the models given differ",
            sides,
            extra=widths,
            force=force,
            error=MapperMismatchError,
            shout="APPLYING A MAPPER TO MODELS IT WAS NOT FITTED FOR",
            stacklevel=2,
        )

    def save(self, folder) -> None:
        from xferlens.mappers.io import save_mapper

        save_mapper(self, folder)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, d_src={self.d_src}, d_tgt={self.d_tgt}, params={self.n_params:,}"
