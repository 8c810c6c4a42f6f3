"""Sparse autoencoders on cached residual activations, trained and stored with sae-lens.

No pretrained SAE can be downloaded here, so :func:`train_sae` trains a small one on rows
you already cached (``cache_activations(...).rows(hook)``, ``pairs.src``...) with
sae-lens's own ``SAETrainer`` fed from a plain iterator of shuffled batches.

- Architecture: TopK (``k`` active features per token), so there is no L1 coefficient to
  tune per model; sae-lens's auxiliary loss revives dead features.
- Scale: inputs are multiplied by ``sqrt(d_in) / mean row norm`` during training (what
  sae-lens's ``normalize_activations="expected_average_only_in"`` does), and the factor is
  folded into the weights afterwards, so the returned SAE reads raw activations.
- Storage: sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``) plus an
  ``xferlens.json`` naming the model and hook it belongs to and how it was trained;
  :func:`load_sae` refuses a folder whose model differs from the one you pass.
- Users with a hub: :func:`load_pretrained_sae` is sae-lens's ``SAE.from_pretrained``.
"""

import functools
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from sae_lens import SAE, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import Layer, hook_name
from xferlens.errors import ModelMismatchError
from xferlens.identity import ModelId, model_identity

META_FILE = "xferlens.json"


class SAEMismatchError(ModelMismatchError):
    """An SAE was used with a model or hook other than the one it was trained on."""


@dataclass
class TrainedSAE:
    """An SAE (sae-lens inference object) with where it reads from and how good it is.

    Attributes:
        sae: a sae-lens ``SAE`` reading raw activations of ``hook``.
        hook: the TransformerLens hook name it was trained on.
        model: identity of that model (``xferlens.identity.model_identity``), or ``{}``.
        metrics: held-out ``fvu`` (fraction of variance unexplained), ``l0``, ``dead``
            (fraction of features that never fire on the held-out rows), the same FVU of
            the untrained SAE (``fvu_at_init``), ``seconds``.
        recipe: the training settings.
    """

    sae: SAE
    hook: str
    model: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    def encode(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_sae"]:
        p = self.sae.W_dec
        with torch.no_grad():
            return self.sae.encode(x.to(device=p.device, dtype=p.dtype))

    def directions(self) -> Float[Tensor, "d_sae d_in"]:
        """Unit decoder directions, one row per feature."""
        w = self.sae.W_dec.detach().float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def check_model(self, model: HookedTransformer) -> None:
        ModelId.read(self.model).check(
            model,
            what=f"this SAE was trained on {self.model.get('name')} ({self.hook}), "
            f"not on {model.cfg.model_name}",
            role="SAE's model",
            error=SAEMismatchError,
        )

    def save(self, folder: str | os.PathLike) -> Path:
        """sae-lens's inference format plus ``xferlens.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.sae.save_model(folder)
        meta = {"hook": self.hook, "model": self.model, "metrics": self.metrics, "recipe": self.recipe}
        (folder / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        return folder

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"TrainedSAE({self.model.get('name')} {self.hook}: d_in={self.d_in}, d_sae={self.d_sae}, "
            f"k={self.recipe.get('k')}, held-out FVU {m.get('fvu', float('nan')):.3f}, "
            f"L0 {m.get('l0', float('nan')):.1f}, dead {m.get('dead', float('nan')):.1%})"
        )


def load_sae(
    folder: str | os.PathLike, model: HookedTransformer | None = None, device: str = "cpu"
) -> TrainedSAE:
    """Load a folder written by :meth:`TrainedSAE.save` (or any sae-lens folder: then
    ``hook`` is sae-lens's ``metadata.hook_name`` and the model is unknown)."""
    folder = Path(folder)
    if not (folder / "cfg.json").is_file():
        raise FileNotFoundError(f"{folder} has no cfg.json: not an SAE folder saved by sae-lens")
    sae = SAE.load_from_disk(str(folder), device=device)
    meta_path = folder / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
    else:
        meta = {"hook": getattr(sae.cfg.metadata, "hook_name", None) or "", "model": {}}
    out = TrainedSAE(
        sae, meta["hook"], meta.get("model", {}), meta.get("metrics", {}), meta.get("recipe", {})
    )
    if model is not None and out.model:
        out.check_model(model)
    return out


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu") -> TrainedSAE:
    """A pretrained SAE from sae-lens's registry (needs the Hugging Face hub).

    Example:
        >>> load_pretrained_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")  # doctest: +SKIP
    """
    sae = SAE.from_pretrained(release, sae_id, device=device)
    hook = getattr(sae.cfg.metadata, "hook_name", None) or ""
    name = getattr(sae.cfg.metadata, "model_name", None)
    return TrainedSAE(sae, hook, {"name": name} if name else {}, {}, {"pretrained": [release, sae_id]})


def _batches(x: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield x[order[i : i + batch_size]]


@torch.no_grad()
def _evaluate(sae: SAE, x: Tensor) -> dict:
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    se = l0 = 0.0
    for chunk in x.split(4096):
        f = sae.encode(chunk)
        fired |= (f > 0).any(0)
        l0 += float((f > 0).sum())
        se += float(((sae.decode(f) - chunk) ** 2).sum())
    var = float(((x - x.mean(0)) ** 2).sum())
    return {"fvu": se / var, "l0": l0 / len(x), "dead": float((~fired).float().mean())}


def train_sae(
    rows: Float[Tensor, "n d_in"],
    *,
    hook: Layer | str,
    model: HookedTransformer | dict | None = None,
    expansion: int = 8,
    d_sae: int | None = None,
    k: int = 32,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 4e-4,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> TrainedSAE:
    """Train a TopK SAE on cached activations ``rows`` (``[n, d_in]``, real tokens only).

    Args:
        rows: activations of one hook (leave out attention-sink positions: their huge
            norm would take the SAE's capacity; ``positions.content()`` does).
        hook: the hook they came from, by name or layer number (recorded; used to refuse
            other hooks later).
        model: the model (or its identity dict) they came from, recorded with the SAE.
        expansion, d_sae: dictionary size is ``d_sae`` or ``expansion * d_in``.
        k: active features per token.
        steps, batch_size, lr: Adam in sae-lens's trainer; the learning rate is constant,
            then decays linearly to 0 over the last fifth of the steps.
        val_fraction: rows held out for the reported metrics.

    Example:
        >>> acts = cache_activations(model, texts, [10], positions=positions.content())  # doctest: +SKIP
        >>> sae = train_sae(acts.rows(resid_post(10)), hook=resid_post(10), model=model)  # doctest: +SKIP
    """
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"rows must be a non-empty [n, d_in] tensor, got shape {tuple(rows.shape)}")
    if not torch.isfinite(rows).all():
        raise ValueError("rows has NaN or inf entries; drop them before training an SAE")
    hook = hook_name(hook)
    d_in = rows.shape[1]
    d_sae = d_sae or expansion * d_in
    if not 0 < k <= d_sae:
        raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
    n_val = max(1, int(len(rows) * val_fraction))
    if len(rows) - n_val < batch_size:
        raise ValueError(
            f"{len(rows)} rows leave {len(rows) - n_val} for training, fewer than batch_size={batch_size}; "
            "cache more text or lower batch_size"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(rows), generator=gen)
    x = rows[perm].to(device=device, dtype=torch.float32)
    val, train = x[:n_val], x[n_val:]
    scale = math.sqrt(d_in) / float(train.norm(dim=1).mean())
    torch.manual_seed(seed)
    # rescale_acts_by_decoder_norm=False: folding the input scale into the weights is then exact
    cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=k, device=device, dtype="float32", rescale_acts_by_decoder_norm=False
    )
    sae = TopKTrainingSAE(cfg)
    sae.b_dec.data = (train * scale).mean(0)
    t0 = time.perf_counter()
    at_init = _evaluate(sae, val * scale)["fvu"]
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,  # required by the config; the constant schedule starts its decay from lr
        lr_scheduler_name="constant",
        lr_decay_steps=steps // 5,
        device=device,
        dead_feature_window=max(50, steps // 10),
        feature_sampling_window=max(100, steps // 5),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(train * scale, batch_size, seed))
    with _quiet_trainer(progress):
        trained = trainer.fit()
    trained.fold_activation_norm_scaling_factor(scale)
    inference = _to_inference(trained)
    metrics = {**_evaluate(inference, val), "fvu_at_init": at_init, "seconds": time.perf_counter() - t0}
    metrics["rows_train"], metrics["rows_val"] = len(train), len(val)
    ident = model_identity(model) if isinstance(model, HookedTransformer) else dict(model or {})
    recipe = {
        "architecture": "topk",
        "k": k,
        "d_sae": d_sae,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "input_scale": scale,
        "library": "sae-lens",
    }
    return TrainedSAE(inference, hook, ident, metrics, recipe)


def _to_inference(trained) -> SAE:
    """The inference ``SAE`` (what ``SAE.load_from_disk`` returns) with the same weights."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        trained.save_inference_model(d)
        return SAE.load_from_disk(d, device=str(trained.W_dec.device))


@contextmanager
def _quiet_trainer(progress: bool):
    """sae-lens's trainer opens its own tqdm bar; ``progress=False`` disables it."""
    import sae_lens.training.sae_trainer as trainer_module

    original = trainer_module.tqdm
    if not progress:
        trainer_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        trainer_module.tqdm = original
