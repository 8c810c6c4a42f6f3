"""Do a source model's SAE features land on features of the target model's SAE?

For each live source feature ``i`` (one that fires on the held-out rows), its unit decoder
direction ``d_i`` is pushed through the mapper (:func:`map_directions`: the image under
the linear part for affine/orthogonal maps, the mean of ``M(h + s d_i) - M(h)`` over real
source rows for nonlinear maps) and compared with every unit decoder direction of the
target SAE. Its **partner** is the target feature with the highest cosine.

Two measures per feature, both also computed for a **random map** control (a Gaussian
matrix with the mapper's shape, seeded: :func:`~xferlens.mappers.controls.random_map_like`),
so that "how often would chance do this" is in the same table:

- ``cosine``: decoder-direction cosine with the partner (the headline rate counts live
  features with ``cosine >= threshold``, 0.5 unless you say otherwise, stated in reports);
- ``act_corr``: Pearson correlation, over paired rows (same token in both models), of the
  source feature's activation with its partner's activation: do they fire on the same
  text, not only point the same way.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from xferlens.activations.align import Pairs
from xferlens.features.sae import TrainedSAE
from xferlens.mappers.base import Mapper
from xferlens.mappers.controls import random_map_like


@torch.no_grad()
def map_directions(
    directions: Float[Tensor, "n d_src"],
    mapper: Mapper,
    *,
    source_rows: Float[Tensor, "m d_src"] | None = None,
    step: float | None = None,
    max_rows: int = 64,
) -> Float[Tensor, "n d_tgt"]:
    """Images of ``directions`` under ``mapper`` (:meth:`Mapper.map_direction`), as unit vectors.

    Linear maps: ``M(d) - M(0)``. Nonlinear maps: the mean over (at most ``max_rows``)
    ``source_rows`` ``h`` of ``M(h + step * d) - M(h)``, with ``step`` default the mean
    row norm of those rows divided by 4 (a feature-sized push, not an infinitesimal
    one: the map is only trained where the model's activations live).
    """
    d = directions.float()
    if len(d) == 0:
        return torch.zeros(0, mapper.d_tgt)
    if not mapper.is_linear:
        if source_rows is None or len(source_rows) == 0:
            raise ValueError(
                f"a {mapper.kind} mapper is nonlinear: map_directions needs source_rows "
                "([m, d_src] real source activations, e.g. pairs.src)"
            )
        if step is None:
            step = float(source_rows[:max_rows].float().norm(dim=1).mean()) / 4
    step = 1.0 if step is None else step  # a linear map ignores it
    out = torch.stack([mapper.map_direction(di, source_rows, step=step, max_rows=max_rows).cpu() for di in d])
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class FeatureRates:
    """The rates of :class:`FeatureTransfer` at a few thresholds, mapper beside random map:
    one row per threshold (``FeatureTransfer.table()``).

    Lists are indexed like ``thresholds``; each rate is the fraction of the ``n_live`` live
    source features whose partner's decoder cosine (``cosine``) or activation correlation
    (``act_corr``) reaches the threshold, ``*_random`` the same through the random map.
    """

    thresholds: list[float]
    cosine: list[float]
    cosine_random: list[float]
    act_corr: list[float]
    act_corr_random: list[float]
    n_live: int
    n_source_features: int

    def to_dict(self) -> list[dict]:
        """One dict per threshold (what ``table()`` returned before it was a report)."""
        return [
            {
                "threshold": t,
                "cosine": self.cosine[k],
                "cosine_random": self.cosine_random[k],
                "act_corr": self.act_corr[k],
                "act_corr_random": self.act_corr_random[k],
            }
            for k, t in enumerate(self.thresholds)
        ]

    def to_frame(self):
        """One row per threshold, as in the markdown."""
        import pandas as pd

        return pd.DataFrame(
            self.to_dict(), columns=["threshold", "cosine", "cosine_random", "act_corr", "act_corr_random"]
        )

    def to_markdown(self) -> str:
        lines = [
            f"{self.n_live} live of {self.n_source_features} source features",
            "",
            "| threshold | decoder cosine >= t | random map | activation corr >= t | random map |",
            "|---|---|---|---|---|",
        ]
        for r in self.to_dict():
            lines.append(
                f"| {r['threshold']:g} | {r['cosine']:.1%} | {r['cosine_random']:.1%} | "
                f"{r['act_corr']:.1%} | {r['act_corr_random']:.1%} |"
            )
        return "\n".join(lines)

    def plot(self, ax=None):
        """Rate against threshold for both measures, mapper solid, random map dashed."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 3.2))
        for by, name in (("cosine", "decoder cosine"), ("act_corr", "activation corr")):
            (line,) = ax.plot(self.thresholds, getattr(self, by), marker="o", label=f"{name}: mapper")
            ax.plot(
                self.thresholds,
                getattr(self, by + "_random"),
                marker="o",
                ls="--",
                color=line.get_color(),
                label=f"{name}: random map",
            )
        ax.set_xlabel("threshold t")
        ax.set_ylabel("live source features >= t")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{self.n_live} live of {self.n_source_features} source features", fontsize=9)
        ax.legend(fontsize=7)
        return fig if fig is not None else ax.figure


@dataclass
class FeatureTransfer:
    """Per live source feature: its partner in the target SAE and how well they agree.

    Tensors are indexed by position in ``features`` (the live source features).
    """

    features: Tensor
    partner: Tensor
    cosine: Tensor
    act_corr: Tensor
    random_partner: Tensor
    random_cosine: Tensor
    random_act_corr: Tensor
    n_source_features: int
    threshold: float = 0.5
    meta: dict = field(default_factory=dict)

    def rate(self, threshold: float | None = None, *, control: bool = False, by: str = "cosine") -> float:
        """Fraction of live source features whose partner's ``by`` (``"cosine"`` or
        ``"act_corr"``) reaches ``threshold``; ``control=True`` for the random map."""
        t = self.threshold if threshold is None else threshold
        if by not in ("cosine", "act_corr"):
            raise ValueError(f"by must be 'cosine' or 'act_corr', not {by!r}")
        x = getattr(self, ("random_" if control else "") + by)
        return float((x >= t).float().mean()) if len(x) else float("nan")

    def table(self, thresholds=(0.3, 0.5, 0.7)) -> FeatureRates:
        """The rates at each of ``thresholds``, mapper and random map (a report:
        ``.to_dict()`` gives one dict per threshold)."""
        ts = list(thresholds)
        return FeatureRates(
            ts,
            [self.rate(t) for t in ts],
            [self.rate(t, control=True) for t in ts],
            [self.rate(t, by="act_corr") for t in ts],
            [self.rate(t, control=True, by="act_corr") for t in ts],
            len(self.features),
            self.n_source_features,
        )

    def to_frame(self, thresholds=(0.3, 0.5, 0.7)):
        """:meth:`table` as a DataFrame: one row per threshold, as in the markdown."""
        return self.table(thresholds).to_frame()

    def to_markdown(self, thresholds=(0.3, 0.5, 0.7)) -> str:
        return self.table(thresholds).to_markdown()

    def plot(self, ax=None):
        """Histograms of partner cosines, mapper vs random map."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.2))
        bins = np.linspace(0, 1, 41)
        ax.hist(self.cosine.numpy(), bins=bins, alpha=0.7, label="through the mapper")
        ax.hist(self.random_cosine.numpy(), bins=bins, alpha=0.7, label="random map")
        ax.axvline(self.threshold, color="k", ls="--", lw=1)
        ax.set_xlabel("cosine with the best target feature")
        ax.set_ylabel("live source features")
        ax.legend()
        return fig or ax.figure


def _partners(mapped: Tensor, tgt_dirs: Tensor) -> tuple[Tensor, Tensor]:
    best_cos, best = [], []
    for chunk in mapped.split(1024):
        c = chunk @ tgt_dirs.T
        v, i = c.max(dim=1)
        best_cos.append(v)
        best.append(i)
    return torch.cat(best), torch.cat(best_cos)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Column-wise Pearson correlation of ``a[:, j]`` with ``b[:, j]`` (0 where constant)."""
    a = a - reduce(a, "row f -> f", "mean")
    b = b - reduce(b, "row f -> f", "mean")
    den = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(
        den > 0, reduce(a * b, "row f -> f", "sum") / den.clamp_min(1e-12), torch.zeros_like(den)
    )


@torch.no_grad()
def feature_transfer(
    src_sae: TrainedSAE,
    tgt_sae: TrainedSAE,
    mapper: Mapper,
    pairs: Pairs,
    *,
    threshold: float = 0.5,
    seed: int = 0,
) -> FeatureTransfer:
    """Match every live source feature to a target feature through ``mapper``, beside a
    random map (module doc). ``pairs`` are held-out paired activations (not the SAEs' or
    the mapper's training rows): they decide which features are live and give the
    activation correlations.
    """
    if src_sae.d_in != mapper.d_src or tgt_sae.d_in != mapper.d_tgt:
        raise ValueError(
            f"widths do not chain: source SAE d_in={src_sae.d_in}, mapper {mapper.d_src} -> {mapper.d_tgt}, "
            f"target SAE d_in={tgt_sae.d_in}"
        )
    if pairs.d_src != src_sae.d_in or pairs.d_tgt != tgt_sae.d_in:
        raise ValueError(
            f"pairs are [{pairs.d_src} -> {pairs.d_tgt}] but the SAEs read {src_sae.d_in} and {tgt_sae.d_in}"
        )
    if len(pairs) == 0:
        raise ValueError("pairs is empty: pass held-out paired activations")
    for role, sae, hook in (("source", src_sae, mapper.src_hook), ("target", tgt_sae, mapper.tgt_hook)):
        if hook and sae.hook and hook != sae.hook:
            raise ValueError(f"the {role} SAE reads {sae.hook} but the mapper's {role} hook is {hook}")
    f_src = src_sae.encode(pairs.src).float().cpu()
    f_tgt = tgt_sae.encode(pairs.tgt).float().cpu()
    live = torch.nonzero(reduce(f_src > 0, "row f -> f", "any")).flatten()
    src_dirs = src_sae.directions().cpu()[live]
    tgt_dirs = tgt_sae.directions().cpu()
    out = {}
    maps = {"": mapper, "random_": random_map_like(mapper, seed)}
    for prefix, m in maps.items():
        mapped = map_directions(src_dirs, m, source_rows=pairs.src)
        partner, cos = _partners(mapped, tgt_dirs)
        out[prefix + "partner"] = partner
        out[prefix + "cosine"] = cos
        out[prefix + "act_corr"] = _pearson(f_src[:, live], f_tgt[:, partner])
    return FeatureTransfer(
        features=live,
        n_source_features=src_sae.d_sae,
        threshold=threshold,
        meta={
            "rows": len(pairs),
            "mapper": mapper.kind,
            "src_hook": src_sae.hook,
            "tgt_hook": tgt_sae.hook,
            "seed": seed,
        },
        **out,
    )
