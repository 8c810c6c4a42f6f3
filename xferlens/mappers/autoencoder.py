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
"""

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

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
                self.skip.weight.copy_((w * (sx / sy)).T.float())
                self.skip.bias.copy_(((m.mean_x @ w + b - m.mean_y) / sy).float())
                self.decoder.weight.zero_()
                self.decoder.bias.zero_()

    @classmethod
    def fit(
        cls, train: PairSource, val: PairSource | None, config: AutoencoderConfig, *, progress: bool = True
    ):
        if val is None:
            raise ValueError("the autoencoder needs validation rows for early stopping: pass val pairs")
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        m = Moments.of(train, progress=progress, desc="autoencoder: statistics")
        mv = Moments.of(val, shift=(m.shift_x, m.shift_y))
        mapper = cls(m.shift_x.numel(), m.shift_y.numel(), config)
        w = b = None
        init: dict = {}
        if config.affine_skip:
            ridge, cands = choose_ridge(m, mv, config.ridge_grid)
            w, b = ridge_solution(m, ridge)
            init = {"ridge": ridge, "affine_val_mse": min(c["val_mse"] for c in cands)}
        mapper._init_from(m, w, b)
        history = _train(mapper, train, val, config, progress=progress)
        history.update(
            init,
            kind=cls.kind,
            train_rows=m.n,
            val_rows=mv.n,
            hidden=mapper.hidden,
            seconds=time.perf_counter() - t0,
        )
        return mapper, history


def validation_mse(mapper: Mapper, val: PairSource, batch_size: int = 4096) -> tuple[float, float]:
    """(MSE per element, mean cosine similarity) of ``mapper`` on every row of ``val``."""
    sse, cos, n, d = 0.0, 0.0, 0, mapper.d_tgt
    with torch.no_grad():
        for x, y in val.batches(batch_size):
            y = y.float()
            pred = mapper(x.float())
            sse += float(((pred - y) ** 2).sum())
            cos += float(F.cosine_similarity(pred, y, dim=-1).sum())
            n += x.shape[0]
    return sse / (n * d), cos / n


def _train(
    mapper: AutoencoderMapper, train: PairSource, val: PairSource, cfg: AutoencoderConfig, *, progress: bool
) -> dict:
    opt = torch.optim.AdamW(mapper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    t0 = time.perf_counter()
    best_mse, best_cos = validation_mse(mapper, val)
    best_state = copy.deepcopy(mapper.state_dict())
    records = [
        {"epoch": 0, "step": 0, "seconds": 0.0, "train_loss": None, "val_mse": best_mse, "val_cos": best_cos}
    ]
    bad, step, stop_reason = 0, 0, "max_epochs"
    bar = tqdm(total=cfg.max_epochs * steps_per_epoch, unit="step", desc="autoencoder", disable=not progress)
    running = []
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            for x, y in train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
                x, y = x.float(), y.float()
                xn = (x - mapper.mean_src) / mapper.scale_src
                yn = (y - mapper.mean_tgt) / mapper.scale_tgt
                pred_n = mapper._map_normalized(xn)
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
                    mse, cos = validation_mse(mapper, val)
                    records.append(
                        {
                            "epoch": epoch,
                            "step": step,
                            "seconds": time.perf_counter() - t0,
                            "train_loss": sum(running) / len(running),
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
                    if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
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
