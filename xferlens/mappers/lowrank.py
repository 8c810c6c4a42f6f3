"""``lowrank``: reduced-rank ridge regression ``y = x A B + b`` with ``A B`` of rank ``r``.

The rank-``r`` matrix closest to the ridge solution in the fit's own loss (Mukherjee & Zhu's
reduced-rank ridge): with ``W`` the ridge solution and ``V_r`` the top ``r`` eigenvectors of
``W^T (C_xx + lambda I) W`` (the covariance of the fitted values of the ridge-augmented
problem), ``W_r = W V_r V_r^T``. Everything comes from the streamed moments
(:class:`~xferlens.mappers.moments.Moments`), so it is one pass over the data like
``affine``; ridge (``None``: chosen on validation as ``affine`` chooses it) first, then the
rank (``None``: the ``rank_grid`` value with the lowest validation MSE, each candidate one
eigen-decomposition away). The chosen rank is written into the mapper's config, so a saved
map rebuilds with the same shapes.

Why: a map between residual streams is fitted on many more directions than a steering
vector lives in; capping the rank keeps the directions the target's variance is predicted
along and drops those fitted to noise. ``rank >= min(d_src, d_tgt)`` is the affine map.
Data-parallel as ``affine``: moments all-reduced, every rank solves the same candidates.
"""

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xferlens.distributed import is_main
from xferlens.mappers.affine import DEFAULT_GRID, pick_ridge, ridge_solution
from xferlens.mappers.base import Mapper, MapperConfig, PairSource, register
from xferlens.mappers.moments import Moments

DEFAULT_RANKS = (4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class LowRankConfig(MapperConfig):
    """``rank``: the map's rank (``None``: choose on validation from ``rank_grid``; ranks at
    or above ``min(d_src, d_tgt)`` are the full affine map). ``ridge``/``ridge_grid`` as
    :class:`~xferlens.mappers.affine.AffineConfig`."""

    rank: int | None = None
    rank_grid: tuple[int, ...] = DEFAULT_RANKS
    ridge: float | None = None
    ridge_grid: tuple[float, ...] = DEFAULT_GRID
    batch_size: int = 4096


def reduced_rank(m: Moments, ridge: float, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ridge solution ``W`` and the eigenvectors ``V`` (columns, descending eigenvalue)
    of ``W^T (C_xx + ridge * s * I) W``; ``W V[:, :r] V[:, :r]^T`` is the rank-``r`` fit."""
    if w is None:
        w, _ = ridge_solution(m, ridge)
    cxx = m.cov_xx
    if ridge > 0:
        d = cxx.shape[0]
        cxx = cxx + ridge * (torch.trace(cxx) / d) * torch.eye(d, dtype=cxx.dtype)
    fitted = w.T @ cxx @ w
    _, evecs = torch.linalg.eigh((fitted + fitted.T) / 2)
    evecs = evecs.flip(-1)
    # one sign per eigenvector (its largest entry positive), so the stored factors do not
    # depend on rounding: the same map from one process or several
    top = evecs.abs().argmax(0)
    signs = torch.sign(evecs[top, torch.arange(evecs.shape[1])])
    return w, evecs * torch.where(signs == 0, 1.0, signs)


def _truncate(m: Moments, w: Tensor, v: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    vr = v[:, :rank]
    wr = (w @ vr) @ vr.T
    return wr, m.mean_y - m.mean_x @ wr


@register
class LowRankMapper(Mapper):
    """``y = (x @ down) @ up + bias`` with ``down`` ``[d_src, r]``, ``up`` ``[r, d_tgt]``."""

    kind = "lowrank"
    is_linear = True
    config_class = LowRankConfig

    def __init__(self, d_src: int, d_tgt: int, config: LowRankConfig | None = None):
        super().__init__(d_src, d_tgt, config)
        r = self.config.rank
        if r is None:
            raise ValueError(
                "a lowrank mapper is built with a rank: fit it (rank=None chooses one) or set rank"
            )
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {r}")
        r = min(int(r), d_src, d_tgt)
        self.down = nn.Parameter(torch.zeros(d_src, r))
        self.up = nn.Parameter(torch.zeros(r, d_tgt))
        self.bias = nn.Parameter(torch.zeros(d_tgt))

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    def _map(self, x: Tensor) -> Tensor:
        return (x @ self.down) @ self.up + self.bias

    @property
    def weight(self) -> Tensor:
        """The full ``[d_src, d_tgt]`` matrix ``down @ up``."""
        return self.down @ self.up

    @classmethod
    def fit(
        cls,
        train: PairSource,
        val: PairSource | None,
        config: LowRankConfig,
        *,
        progress: bool = True,
        distributed: bool = False,
    ):
        """``distributed=True``: ``train``/``val`` are this rank's parts (see ``fit_mapper``)."""
        if config.rank is not None and config.rank < 1:
            raise ValueError(f"rank must be >= 1 (or None to choose on validation), got {config.rank}")
        t0 = time.perf_counter()
        m, mv = Moments.of_train_val(
            train,
            val,
            batch_size=config.batch_size,
            progress=progress and is_main(),
            desc="lowrank: X^T X",
            distributed=distributed,
        )
        d_src, d_tgt = m.shift_x.numel(), m.shift_y.numel()
        full = min(d_src, d_tgt)
        ridge, ridge_records = pick_ridge(m, mv, config.ridge, config.ridge_grid, distributed=distributed)
        w, v = reduced_rank(m, ridge)
        rank = config.rank
        records: list[dict] = []
        if mv is not None:
            grid = sorted({min(int(r), full) for r in (config.rank_grid if rank is None else (rank,))})
            if not grid or grid[0] < 1:
                raise ValueError(f"rank_grid must hold ranks >= 1, got {config.rank_grid}")
            for r in grid:
                wr, br = _truncate(m, w, v, r)
                sse = mv.sse(wr, br)
                records.append(
                    {
                        "rank": r,
                        "train_mse": m.sse(wr, br) / (m.n * d_tgt),
                        "val_mse": sse / (mv.n * d_tgt),
                        "val_fvu": sse / max(mv.sst(), 1e-30),
                    }
                )
            if rank is None:
                rank = min(records, key=lambda r: r["val_mse"])["rank"]
        elif rank is None:
            raise ValueError("rank=None chooses the rank on validation rows: pass val pairs or set rank")
        rank = min(int(rank), full)
        wr, br = _truncate(m, w, v, rank)
        mapper = cls(d_src, d_tgt, dataclasses.replace(config, rank=rank, ridge=float(ridge)))
        vr = v[:, :rank]
        with torch.no_grad():
            mapper.down.copy_((w @ vr).float())
            mapper.up.copy_(vr.T.float())
            mapper.bias.copy_(br.float())
        history = {
            "kind": cls.kind,
            "train_rows": m.n,
            "val_rows": None if mv is None else mv.n,
            "ridge": float(ridge),
            "rank": rank,
            "train_mse": m.sse(wr, br) / (m.n * d_tgt),
            "candidates": ridge_records,
            "rank_candidates": records,
            "seconds": time.perf_counter() - t0,
        }
        return mapper, history
