"""``affine``: least squares / ridge ``y = x W + b``, solved in closed form.

The fit streams the normal equations (:class:`~xferlens.mappers.moments.Moments`), so it
works on pair sets larger than memory. The ridge penalty is relative: ``ridge * mean
variance of x`` is added to the diagonal of the centred covariance, so one value means
the same at any activation scale; the intercept is never penalised. With
``ridge=None`` the value is chosen from ``ridge_grid`` by validation MSE — computed from
the validation rows' own moments, so every candidate costs one linear solve and no
further pass over the data.

Data-parallel (``distributed=True``), the training and validation moments are both
all-reduced, so every rank holds the moments of all the rows; the ridge candidates (one
solve each, the bulk of the work once the moments are in) are shared out over the ranks
and their figures gathered, so every rank picks the same ridge as one process would and
solves for it.
"""

import time
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from xferlens.distributed import all_gather_objects, collectively, is_main, shard_indices
from xferlens.mappers.base import Mapper, MapperConfig, PairSource, register
from xferlens.mappers.moments import Moments

DEFAULT_GRID = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass
class AffineConfig(MapperConfig):
    """``ridge``: relative penalty (``None``: choose on validation from ``ridge_grid``)."""

    ridge: float | None = None
    ridge_grid: tuple[float, ...] = DEFAULT_GRID
    batch_size: int = 4096


def ridge_solution(m: Moments, ridge: float) -> tuple[Tensor, Tensor]:
    """``(W [d_src, d_tgt], b [d_tgt])`` minimising ``|y - xW - b|^2 + ridge * s * n |W|^2``
    with ``s`` the mean variance of ``x``; float64."""
    cxx, cxy = m.cov_xx, m.cov_xy
    d = cxx.shape[0]
    if ridge > 0:
        s = torch.trace(cxx) / d
        w = torch.linalg.solve(cxx + ridge * s * torch.eye(d, dtype=cxx.dtype), cxy)
    else:
        w = torch.linalg.lstsq(cxx, cxy, driver="gelsd").solution  # minimum-norm if singular
    b = m.mean_y - m.mean_x @ w
    return w, b


def _candidate(train: Moments, val: Moments, ridge: float) -> dict:
    w, b = ridge_solution(train, ridge)
    val_sse = val.sse(w, b)
    return {
        "ridge": ridge,
        "train_mse": train.sse(w, b) / (train.n * w.shape[1]),
        "val_mse": val_sse / (val.n * w.shape[1]),
        "val_fvu": val_sse / max(val.sst(), 1e-30),
    }


def choose_ridge(
    train: Moments, val: Moments, grid, *, distributed: bool = False
) -> tuple[float, list[dict]]:
    """The grid value with the lowest validation MSE, and every candidate's figures.

    ``distributed=True`` (every rank holding the same all-reduced moments; call it on
    every rank): each rank solves every ``world``-th candidate and all get every figure.
    """
    grid = [float(r) for r in grid]
    if not distributed:
        rows = [_candidate(train, val, r) for r in grid]
    else:
        mine: dict[int, dict] = {}
        with collectively("ridge candidates"):
            for i in shard_indices(len(grid), strided=True):
                mine[i] = _candidate(train, val, grid[i])
        found = {i: row for part in all_gather_objects(mine) for i, row in part.items()}
        rows = [found[i] for i in range(len(grid))]
    best = min(rows, key=lambda r: r["val_mse"])
    return best["ridge"], rows


def pick_ridge(
    m: Moments, mv: Moments | None, ridge: float | None, grid, *, distributed: bool = False
) -> tuple[float, list[dict]]:
    """``ridge`` itself (``None``: the ``grid`` value chosen on the validation moments ``mv``)
    and the validation figures of every candidate solved (none without ``mv``)."""
    if mv is None:
        if ridge is None:
            raise ValueError("ridge=None chooses the penalty on validation rows: pass val pairs or set ridge")
        return float(ridge), []
    if ridge is None:
        return choose_ridge(m, mv, grid, distributed=distributed)
    return float(ridge), choose_ridge(m, mv, [ridge])[1]


@register
class AffineMapper(Mapper):
    """``y = x W + b`` (a single ``nn.Linear``)."""

    kind = "affine"
    is_linear = True
    config_class = AffineConfig

    def __init__(self, d_src: int, d_tgt: int, config: AffineConfig | None = None):
        super().__init__(d_src, d_tgt, config)
        self.linear = nn.Linear(d_src, d_tgt)

    def _map(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def set_solution(self, w: Tensor, b: Tensor) -> "AffineMapper":
        with torch.no_grad():
            # nn.Linear stores W transposed: [d_tgt, d_src]
            self.linear.weight.copy_(rearrange(w, "d_src d_tgt -> d_tgt d_src").to(self.linear.weight.dtype))
            self.linear.bias.copy_(b.to(self.linear.bias.dtype))
        return self

    @classmethod
    def fit(
        cls,
        train: PairSource,
        val: PairSource | None,
        config: AffineConfig,
        *,
        progress: bool = True,
        distributed: bool = False,
    ):
        """``distributed=True``: ``train``/``val`` are this rank's parts (see ``fit_mapper``)."""
        t0 = time.perf_counter()
        m, mv = Moments.of_train_val(
            train,
            val,
            batch_size=config.batch_size,
            progress=progress and is_main(),
            desc="affine: X^T X",
            distributed=distributed,
        )
        ridge, records = pick_ridge(m, mv, config.ridge, config.ridge_grid, distributed=distributed)
        w, b = ridge_solution(m, ridge)
        mapper = cls(m.shift_x.numel(), m.shift_y.numel(), config).set_solution(w, b)
        history = {
            "kind": cls.kind,
            "train_rows": m.n,
            "val_rows": None if mv is None else mv.n if distributed else len(val),
            "ridge": float(ridge),
            "train_mse": m.sse(w, b) / (m.n * w.shape[1]),
            "candidates": records,
            "seconds": time.perf_counter() - t0,
        }
        return mapper, history
