"""``autoencoder``: the paper's ``Linear(d_src -> h) -> ReLU -> Linear(h -> d_tgt)``.

Trained with AdamW on MSE (plus an optional cosine term) over paired rows, with a
validation split, early stopping on validation MSE (the best weights are kept) and a
seed. Inputs and outputs are standardised inside the module (centred and divided by one
global RMS each, so the geometry is unchanged), which makes one learning rate work for
any pair of models.

``affine_skip=True`` (the default) adds a linear path initialised to the closed-form
ridge solution, with the ReLU branch's output layer starting at zero: training starts
from the affine map and can only move away from it where validation MSE improves, so the
autoencoder is never worse than ``affine`` on held-out rows. ``affine_skip=False`` is the
paper's network exactly (its recipe: lr 1e-4, batch 16, ~3 epochs).

Data-parallel (``distributed=True``, see ``fit_mapper``): the statistics and the affine
start are all-reduced like the affine fit's; training runs under
``DistributedDataParallel`` with ``batch_size // world`` rows per rank per step (the same
global batch and steps per epoch as one process), every rank taking the same number of
steps per epoch (a rank with fewer rows cycles through its rows again); validation sums
are all-reduced, so every rank makes the same early-stopping decision and ends with the
same weights.
"""

import copy
import inspect
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from xferlens.distributed import all_reduce_scalars, is_main, world_size
from xferlens.mappers.affine import DEFAULT_GRID, choose_ridge, ridge_solution
from xferlens.mappers.base import Mapper, MapperConfig, PairSource, register
from xferlens.mappers.moments import Moments


@dataclass
class AutoencoderConfig(MapperConfig):
    hidden: int | None = None  # default round(sqrt(d_src * d_tgt))
    affine_skip: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 30
    patience: int = 3  # validations without improvement before stopping
    min_improvement: float = 1e-3  # relative improvement of validation MSE that counts
    evals_per_epoch: int = 1
    cosine_weight: float = 0.0
    seed: int = 0
    max_seconds: float | None = None
    ridge_grid: tuple[float, ...] = DEFAULT_GRID  # for the affine path's initial solution


@register
class AutoencoderMapper(Mapper):
    kind = "autoencoder"
    config_class = AutoencoderConfig

    def __init__(self, d_src: int, d_tgt: int, config: AutoencoderConfig | None = None):
        super().__init__(d_src, d_tgt, config)
        cfg: AutoencoderConfig = self.config
        hidden = cfg.hidden or round(math.sqrt(d_src * d_tgt))
        self.hidden = hidden
        self.register_buffer("mean_src", torch.zeros(d_src))
        self.register_buffer("scale_src", torch.ones(()))
        self.register_buffer("mean_tgt", torch.zeros(d_tgt))
        self.register_buffer("scale_tgt", torch.ones(()))
        self.encoder = nn.Linear(d_src, hidden)
        self.decoder = nn.Linear(hidden, d_tgt)
        self.skip = nn.Linear(d_src, d_tgt) if cfg.affine_skip else None

    def _map_normalized(self, xn: Tensor) -> Tensor:
        y = self.decoder(F.relu(self.encoder(xn)))
        return y + self.skip(xn) if self.skip is not None else y

    def _map(self, x: Tensor) -> Tensor:
        xn = (x - self.mean_src) / self.scale_src
        return self.mean_tgt + self.scale_tgt * self._map_normalized(xn)

    def _init_from(self, m: Moments, w: Tensor | None, b: Tensor | None) -> None:
        with torch.no_grad():
            sx = math.sqrt(max(float(torch.trace(m.cov_xx)), 1e-30))
            sy = math.sqrt(max(m.var_y, 1e-30))
            self.mean_src.copy_(m.mean_x.float())
            self.scale_src.fill_(sx)
            self.mean_tgt.copy_(m.mean_y.float())
            self.scale_tgt.fill_(sy)
            if self.skip is not None and w is not None:
                # y = x W + b  =>  yn = xn (sx / sy) W + (mean_x W + b - mean_y) / sy
                self.skip.weight.copy_(rearrange(w * (sx / sy), "d_src d_tgt -> d_tgt d_src").float())
                self.skip.bias.copy_(((m.mean_x @ w + b - m.mean_y) / sy).float())
                self.decoder.weight.zero_()
                self.decoder.bias.zero_()

    @classmethod
    def fit(
        cls,
        train: PairSource,
        val: PairSource | None,
        config: AutoencoderConfig,
        *,
        progress: bool = True,
        distributed: bool = False,
    ):
        """``distributed=True``: ``train``/``val`` are this rank's parts (see ``fit_mapper``)."""
        if val is None:
            raise ValueError("the autoencoder needs validation rows for early stopping: pass val pairs")
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        progress = progress and is_main()
        m = Moments.of(train, progress=progress, desc="autoencoder: statistics", distributed=distributed)
        mv = Moments.of(val, shift=(m.shift_x, m.shift_y), distributed=distributed)
        mapper = cls(m.shift_x.numel(), m.shift_y.numel(), config)
        w = b = None
        init: dict = {}
        if config.affine_skip:
            ridge, cands = choose_ridge(m, mv, config.ridge_grid, distributed=distributed)
            w, b = ridge_solution(m, ridge)
            init = {"ridge": ridge, "affine_val_mse": min(c["val_mse"] for c in cands)}
        mapper._init_from(m, w, b)
        history = _train(mapper, train, val, config, progress=progress, distributed=distributed)
        history.update(
            init,
            kind=cls.kind,
            train_rows=m.n,
            val_rows=mv.n,
            hidden=mapper.hidden,
            seconds=time.perf_counter() - t0,
        )
        return mapper, history


def validation_mse(
    mapper: Mapper, val: PairSource, batch_size: int = 4096, *, distributed: bool = False
) -> tuple[float, float]:
    """(MSE per element, mean cosine similarity) of ``mapper`` on every row of ``val``
    (``distributed=True``: of every rank's ``val`` together; call it on every rank)."""
    if distributed:
        sse, cos, n = all_reduce_scalars(list(_validation_sums(mapper, val, batch_size)))
        return sse / (max(n, 1) * mapper.d_tgt), cos / max(n, 1)
    sse, cos, n = _validation_sums(mapper, val, batch_size)
    return sse / (n * mapper.d_tgt), cos / n


def _validation_sums(mapper: Mapper, val: PairSource, batch_size: int) -> tuple[float, float, int]:
    sse, cos, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in val.batches(batch_size):
            y = y.float()
            pred = mapper(x.float())
            sse += float(((pred - y) ** 2).sum())
            cos += float(F.cosine_similarity(pred, y, dim=-1).sum())
            n += x.shape[0]
    return sse, cos, n


class _Normalized(nn.Module):
    """The mapper's normalised map as a module's ``forward``, for DistributedDataParallel."""

    def __init__(self, mapper: AutoencoderMapper):
        super().__init__()
        self.mapper = mapper

    def forward(self, xn: Tensor) -> Tensor:
        return self.mapper._map_normalized(xn)


#: the buffers (means, scales) are equal on every rank already (from all-reduced moments):
#: no need to send them at every step (the keyword was renamed in newer torch)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _cycled(source: PairSource, batch_size: int, steps: int, seed: int):
    """Exactly ``steps`` shuffled batches, starting over (reshuffled) when ``source`` ends."""
    taken, round_ = 0, 0
    while taken < steps:
        for batch in source.batches(batch_size, shuffle=True, seed=seed + 7919 * round_):
            yield batch
            taken += 1
            if taken == steps:
                return
        round_ += 1


def _train(
    mapper: AutoencoderMapper,
    train: PairSource,
    val: PairSource,
    cfg: AutoencoderConfig,
    *,
    progress: bool,
    distributed: bool = False,
) -> dict:
    opt = torch.optim.AdamW(mapper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    forward = mapper._map_normalized
    if distributed:
        batch_size = max(1, cfg.batch_size // world_size())
        local_steps = math.ceil(len(train) / batch_size)
        most, minus_fewest = all_reduce_scalars([local_steps, -local_steps], op="max")
        if minus_fewest == 0:
            raise ValueError(
                f"a rank has no training rows ({world_size()} ranks share {most:.0f} steps at most): "
                "use more texts or fewer ranks"
            )
        steps_per_epoch = int(most)
        forward = DistributedDataParallel(_Normalized(mapper), **_NO_BUFFER_SYNC)

        def epoch_batches(epoch: int):
            return _cycled(train, batch_size, steps_per_epoch, cfg.seed * 1000 + epoch)
    else:
        steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))

        def epoch_batches(epoch: int):
            return train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch)

    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    t0 = time.perf_counter()
    best_mse, best_cos = validation_mse(mapper, val, distributed=distributed)
    best_state = copy.deepcopy(mapper.state_dict())
    records = [
        {"epoch": 0, "step": 0, "seconds": 0.0, "train_loss": None, "val_mse": best_mse, "val_cos": best_cos}
    ]
    bad, step, stop_reason = 0, 0, "max_epochs"
    bar = tqdm(total=cfg.max_epochs * steps_per_epoch, unit="step", desc="autoencoder", disable=not progress)
    running = []
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            for x, y in epoch_batches(epoch):
                x, y = x.float(), y.float()
                xn = (x - mapper.mean_src) / mapper.scale_src
                yn = (y - mapper.mean_tgt) / mapper.scale_tgt
                pred_n = forward(xn)
                loss = F.mse_loss(pred_n, yn) * mapper.d_tgt  # per row, in units of the target variance
                if cfg.cosine_weight:
                    pred = mapper.mean_tgt + mapper.scale_tgt * pred_n
                    loss = loss + cfg.cosine_weight * (1 - F.cosine_similarity(pred, y, dim=-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running.append(float(loss.detach()))
                step += 1
                bar.update(1)
                if step % eval_every == 0:
                    mse, cos = validation_mse(mapper, val, distributed=distributed)
                    train_loss = sum(running) / len(running)
                    if distributed:  # every rank records the mean over ranks and stops together
                        loss_sum, loss_n, late = all_reduce_scalars(
                            [sum(running), len(running), float(_out_of_time(cfg, t0))]
                        )
                        train_loss = loss_sum / loss_n
                    records.append(
                        {
                            "epoch": epoch,
                            "step": step,
                            "seconds": time.perf_counter() - t0,
                            "train_loss": train_loss,
                            "val_mse": mse,
                            "val_cos": cos,
                        }
                    )
                    running = []
                    bar.set_postfix(val_mse=f"{mse:.4g}")
                    # keep any better weights; only a real improvement resets the patience
                    bad = 0 if mse < best_mse * (1 - cfg.min_improvement) else bad + 1
                    if mse < best_mse:
                        best_mse, best_cos = mse, cos
                        best_state = copy.deepcopy(mapper.state_dict())
                    if bad >= cfg.patience:
                        stop_reason = "early_stopping"
                        break
                    if (late > 0) if distributed else _out_of_time(cfg, t0):
                        stop_reason = "max_seconds"
                        break
            if stop_reason != "max_epochs":
                break
    finally:
        bar.close()
    mapper.load_state_dict(best_state)
    return {
        "records": records,
        "best_val_mse": best_mse,
        "best_val_cos": best_cos,
        "stop_reason": stop_reason,
        "steps": step,
        "train_seconds": time.perf_counter() - t0,
    }


def _out_of_time(cfg: AutoencoderConfig, t0: float) -> bool:
    return cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds
