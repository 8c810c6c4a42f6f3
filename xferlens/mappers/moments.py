"""Streamed first and second moments of paired rows (the normal equations).

One pass over a :class:`~xferlens.mappers.base.PairSource` accumulates, in float64,
``n``, ``sum x``, ``sum y``, ``X^T X``, ``X^T Y`` and ``sum |y|^2`` — everything a linear
least-squares, ridge or Procrustes fit needs, whatever the number of rows. Rows are
shifted by a fixed offset (the first batch's mean) before accumulating, which keeps the
centred moments accurate when activations have large means. The same pass checks every
row for NaN/inf, so bad data is named before any training starts.

Data-parallel (``distributed=True`` under a process group of several ranks), each rank
accumulates its own rows with a shift common to all ranks (the mean of every rank's
first batch) and the sums are all-reduced in float64, so every rank holds the moments of
all rows: the same fit as one process on all the data, up to float64 rounding.
"""

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from xferlens.distributed import all_reduce_, collectively
from xferlens.mappers.base import NonFiniteError, PairSource


def check_finite(x: Tensor, name: str, offset: int = 0) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = torch.nonzero(bad.any(dim=-1)).flatten()
        kinds = ("NaN" if torch.isnan(x).any() else "") + (" inf" if torch.isinf(x).any() else "")
        raise NonFiniteError(
            f"{name} holds {kinds.strip()} in {len(rows)} row(s), first at row {offset + int(rows[0])}: "
            "recompute those activations (a float16 overflow? cache with dtype='float32') or drop the rows"
        )


@dataclass
class Moments:
    n: int
    shift_x: Tensor  # [d_src] float64
    shift_y: Tensor  # [d_tgt]
    sx: Tensor  # sum of (x - shift_x)
    sy: Tensor
    xx: Tensor  # (x - shift_x)^T (x - shift_x)
    xy: Tensor  # (x - shift_x)^T (y - shift_y)
    yy: float  # sum |y - shift_y|^2

    @classmethod
    def empty(cls, shift_x: Tensor, shift_y: Tensor) -> "Moments":
        dx, dy = shift_x.numel(), shift_y.numel()
        z = dict(dtype=torch.float64)
        return cls(
            0,
            shift_x.double(),
            shift_y.double(),
            torch.zeros(dx, **z),
            torch.zeros(dy, **z),
            torch.zeros(dx, dx, **z),
            torch.zeros(dx, dy, **z),
            0.0,
        )

    def add(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch has {x.shape[0]} source rows but {y.shape[0]} target rows")
        check_finite(x, "source activations", self.n)
        check_finite(y, "target activations", self.n)
        xs = x.double() - self.shift_x
        ys = y.double() - self.shift_y
        self.n += x.shape[0]
        self.sx += xs.sum(0)
        self.sy += ys.sum(0)
        self.xx += xs.T @ xs
        self.xy += xs.T @ ys
        self.yy += float((ys * ys).sum())

    @classmethod
    def of(
        cls,
        source: PairSource,
        *,
        batch_size: int = 4096,
        shift: tuple[Tensor, Tensor] | None = None,
        progress: bool = False,
        desc: str = "moments",
        distributed: bool = False,
    ) -> "Moments":
        """Accumulate over every row of ``source`` (shifted by ``shift``, else the first batch's mean).

        ``distributed=True``: ``source`` is this rank's part; every rank must call it, and
        every rank gets the moments of all ranks' rows.
        """
        if distributed:
            return cls._of_distributed(source, batch_size, shift, progress, desc)
        m: Moments | None = None
        with tqdm(total=len(source), unit="row", desc=desc, disable=not progress) as bar:
            for x, y in source.batches(batch_size):
                if m is None:
                    sx, sy = shift if shift is not None else (x.double().mean(0), y.double().mean(0))
                    m = cls.empty(sx, sy)
                m.add(x, y)
                bar.update(x.shape[0])
        if m is None or m.n == 0:
            raise ValueError("no paired rows to fit: the pair source is empty")
        return m

    @classmethod
    def of_train_val(
        cls,
        train: PairSource,
        val: PairSource | None,
        *,
        batch_size: int = 4096,
        progress: bool = False,
        desc: str = "moments",
        distributed: bool = False,
    ) -> tuple["Moments", "Moments | None"]:
        """The training rows' moments and the validation rows' (``None`` without ``val``),
        both shifted by the training offset so their figures compare (see :meth:`of`)."""
        m = cls.of(train, batch_size=batch_size, progress=progress, desc=desc, distributed=distributed)
        if val is None:
            return m, None
        mv = cls.of(
            val,
            batch_size=batch_size,
            shift=(m.shift_x, m.shift_y),
            desc="validation",
            distributed=distributed,
        )
        return m, mv

    @classmethod
    def _of_distributed(
        cls, source: PairSource, batch_size: int, shift, progress: bool, desc: str
    ) -> "Moments":
        with collectively(desc):
            it = iter(source.batches(batch_size))
            first = next(it, None)
        if shift is None:  # one shift for every rank: the mean of all ranks' first batches
            dx = source.d_src
            acc = torch.zeros(dx + source.d_tgt + 1, dtype=torch.float64)
            if first is not None:
                acc[:dx] = first[0].double().sum(0)
                acc[dx:-1] = first[1].double().sum(0)
                acc[-1] = first[0].shape[0]
            all_reduce_(acc)
            count = max(float(acc[-1]), 1.0)
            shift = (acc[:dx] / count, acc[dx:-1] / count)
        m = cls.empty(*shift)
        with collectively(desc), tqdm(total=len(source), unit="row", desc=desc, disable=not progress) as bar:
            for x, y in itertools.chain([first], it) if first is not None else ():
                m.add(x, y)
                bar.update(x.shape[0])
        m.all_reduce()
        if m.n == 0:
            raise ValueError("no paired rows to fit: the pair source is empty on every rank")
        return m

    def all_reduce(self) -> "Moments":
        """Sum these moments with every other rank's, in place (same shift on every rank)."""
        scalars = torch.tensor([float(self.n), self.yy], dtype=torch.float64)
        all_reduce_(scalars, self.sx, self.sy, self.xx, self.xy)
        self.n, self.yy = int(scalars[0]), float(scalars[1])
        return self

    # centred statistics (per row), in float64
    @property
    def mean_x(self) -> Tensor:
        return self.shift_x + self.sx / self.n

    @property
    def mean_y(self) -> Tensor:
        return self.shift_y + self.sy / self.n

    @property
    def cov_xx(self) -> Tensor:
        mx = self.sx / self.n
        return self.xx / self.n - torch.outer(mx, mx)

    @property
    def cov_xy(self) -> Tensor:
        return self.xy / self.n - torch.outer(self.sx / self.n, self.sy / self.n)

    @property
    def var_y(self) -> float:
        """Total variance of y per row: ``mean |y - mean y|^2``."""
        my = self.sy / self.n
        return self.yy / self.n - float(my @ my)

    def sse(self, w: Tensor, b: Tensor) -> float:
        """Sum over rows of ``|y - (x W + b)|^2`` for these rows, from the moments alone."""
        # in shifted coordinates: y' = y - sy0, x' = x - sx0, and x W + b = x' W + c
        c = b.double() + self.shift_x @ w - self.shift_y
        w = w.double()
        fit_sq = float((w * (self.xx @ w)).sum()) + 2 * float((self.sx @ w) @ c) + self.n * float(c @ c)
        cross = float((w * self.xy).sum()) + float(self.sy @ c)
        return max(self.yy - 2 * cross + fit_sq, 0.0)

    def sst(self) -> float:
        return self.var_y * self.n
