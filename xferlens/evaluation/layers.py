"""Choose the (source layer, target layer) pair cheaply.

Every requested layer of both models is cached once over a small sample of text, rows
are paired once (the pairing depends only on tokens), and every layer pair is scored:

* ``"cka"``: linear CKA of the paired rows (centred; 1 = the same geometry up to rotation
  and scale), from ``|X^T Y|_F^2 / (|X^T X|_F |Y^T Y|_F)``;
* ``"ridge"``: held-out R^2 (``1 - FVU``) of a ridge map fitted on half the sample's texts.

:func:`rank_agreement` then says whether the cheap score ranks pairs the way the
expensive patched KL does (Spearman's rho).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from xferlens import distributed as xd
from xferlens.activations import cache_activations, match_rows, resid_post, same_tokenizer
from xferlens.activations.hooks import HookSpec, hook_layer, resolve_hooks
from xferlens.activations.positions import Selector, from_token
from xferlens.activations.shares import cache_share, joined_set, rows_on_main, without_acts


@dataclass
class LayerScores:
    scores: np.ndarray  # [len(src_layers), len(tgt_layers)]
    src_layers: list[int]
    tgt_layers: list[int]
    method: str
    src_model: str
    tgt_model: str
    n_rows: int
    meta: dict = field(default_factory=dict)

    def score(self, src_layer: int, tgt_layer: int) -> float:
        return float(self.scores[self.src_layers.index(src_layer), self.tgt_layers.index(tgt_layer)])

    def recommend(
        self, k: int = 3, depth: tuple[float | int, float | int] = (0.25, 0.75)
    ) -> list[tuple[int, int, float]]:
        """The ``k`` best pairs whose target layer lies within ``depth`` (fractions of the
        target's depth). Steering works in middle layers (the paper's "last steerable
        layer" is about half-way), while the highest similarity is often found at the
        embeddings, where nothing is worth transferring; ``depth=(0, 1)`` searches all."""
        n_t = self.meta.get("tgt_n_layers", max(self.tgt_layers) + 1)
        n_s = self.meta.get("src_n_layers", max(self.src_layers) + 1)
        cands = []
        for i, ls in enumerate(self.src_layers):
            for j, lt in enumerate(self.tgt_layers):
                ok_t = depth[0] <= lt / max(1, n_t - 1) <= depth[1]
                ok_s = depth[0] <= ls / max(1, n_s - 1) <= depth[1]
                if ok_t and ok_s:
                    cands.append((ls, lt, float(self.scores[i, j])))
        if not cands:
            raise ValueError(f"no scored layer pair lies within depth {depth}; widen it or score more layers")
        return sorted(cands, key=lambda c: -c[2])[:k]

    def best_source_for(self, tgt_layer: int) -> int:
        j = self.tgt_layers.index(tgt_layer)
        return self.src_layers[int(np.argmax(self.scores[:, j]))]

    def to_frame(self):
        """``scores`` as a DataFrame: a row per source layer, a column per target layer."""
        import pandas as pd

        return pd.DataFrame(
            self.scores,
            index=pd.Index(self.src_layers, name="src_layer"),
            columns=pd.Index(self.tgt_layers, name="tgt_layer"),
        )

    def to_markdown(self) -> str:
        """The score table: a row per source layer, a column per target layer; the best
        source layer for each target layer in bold."""
        best = np.argmax(self.scores, axis=0)
        lines = [
            f"Layer-pair {self.method}, {self.src_model} (rows) -> {self.tgt_model} (columns), "
            f"{self.n_rows:,} paired tokens.",
            "",
            "| source layer | " + " | ".join(f"tgt {t}" for t in self.tgt_layers) + " |",
            "|" + "---|" * (len(self.tgt_layers) + 1),
        ]
        for i, ls in enumerate(self.src_layers):
            cells = [
                f"**{x:.3f}**" if best[j] == i else f"{x:.3f}" for j, x in enumerate(self.scores[i].tolist())
            ]
            lines.append(f"| {ls} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, ax=None, mark: Sequence[tuple[int, int]] = ()):
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 5))
        fig = ax.figure
        # one cell per scored layer, labelled with its number (scored layers need not be
        # consecutive: an extent in layer units would stretch cells over unscored layers)
        im = ax.imshow(self.scores, origin="lower", aspect="auto", cmap="viridis")
        step_x = max(1, len(self.tgt_layers) // 14)
        step_y = max(1, len(self.src_layers) // 14)
        ax.set_xticks(range(0, len(self.tgt_layers), step_x), self.tgt_layers[::step_x])
        ax.set_yticks(range(0, len(self.src_layers), step_y), self.src_layers[::step_y])
        fig.colorbar(im, ax=ax, label=self.method)
        for ls, lt in mark:
            ax.plot(self.tgt_layers.index(lt), self.src_layers.index(ls), "r*", markersize=12)
        ax.set_xlabel(f"target layer ({self.tgt_model})")
        ax.set_ylabel(f"source layer ({self.src_model})")
        ax.set_title(f"layer-pair {self.method} on {self.n_rows:,} paired tokens", fontsize=9)
        return fig


def _centered(x: Tensor) -> Tensor:
    """Centred in float64, then float32 for the products (CKA is a ratio of sums of
    squares; float32 products of a few thousand rows change it by ~1e-6, at a quarter of
    the cost on CPU)."""
    x = x.double()
    return (x - x.mean(0)).float()


def _cka(xs: list[Tensor], ys: list[Tensor], progress: bool) -> np.ndarray:
    xs = [_centered(x) for x in xs]
    ys = [_centered(y) for y in ys]
    nx = [float(torch.linalg.matrix_norm((x.T @ x).double())) for x in xs]
    ny = [float(torch.linalg.matrix_norm((y.T @ y).double())) for y in ys]
    out = np.zeros((len(xs), len(ys)))
    for i, x in enumerate(tqdm(xs, desc="CKA", disable=not progress)):
        for j, y in enumerate(ys):
            out[i, j] = float((x.T @ y).double().square().sum()) / (nx[i] * ny[j])
    return out


def _ridge_r2(xs, ys, text_index: Tensor, ridge: float, progress: bool) -> np.ndarray:
    texts = torch.unique(text_index)
    train = torch.isin(text_index, texts[::2])
    out = np.zeros((len(xs), len(ys)))
    for i, x in enumerate(tqdm(xs, desc="ridge R2", disable=not progress)):
        x = x.double()  # (a Cholesky solve wants float64)
        xt, xv = x[train], x[~train]
        mx = xt.mean(0)
        xt, xv = xt - mx, xv - mx
        cxx = xt.T @ xt
        lam = ridge * torch.trace(cxx) / cxx.shape[0]
        chol = torch.linalg.cholesky(cxx + lam * torch.eye(cxx.shape[0], dtype=cxx.dtype))
        for j, y in enumerate(ys):
            y = y.double()
            yt, yv = y[train], y[~train]
            my = yt.mean(0)
            w = torch.cholesky_solve(xt.T @ (yt - my), chol)
            resid = (yv - my) - xv @ w
            out[i, j] = 1 - float(resid.square().sum() / (yv - yv.mean(0)).square().sum())
    return out


def _block_outputs(model: HookedTransformer, layers: HookSpec) -> list[int]:
    """Layer numbers of ``layers`` given as numbers or ``hook_resid_post`` names."""
    names = resolve_hooks(model, layers)
    other = [h for h in names if h != resid_post(hook_layer(h) or 0)]
    if other:
        raise ValueError(
            f"layer_pair_scores compares block outputs (blocks.{{l}}.hook_resid_post); {other} are other "
            "points: pass layer numbers or resid_post hook names"
        )
    return [hook_layer(h) for h in names]


def layer_pair_scores(
    src: HookedTransformer,
    tgt: HookedTransformer,
    texts: Sequence[str],
    *,
    src_layers: HookSpec | None = None,
    tgt_layers: HookSpec | None = None,
    method: str = "cka",
    positions: Selector | None = None,
    max_rows: int = 4000,
    ridge: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> LayerScores:
    """Score every (source layer, target layer) pair on ``texts`` (a small sample).

    ``src_layers``, ``tgt_layers``: layer numbers or their ``blocks.{l}.hook_resid_post``
    names (default: every layer); the scores compare block outputs.
    ``positions`` defaults to every real token but the first (see the code comment);
    pass ``"all"`` to keep it.

    ``distributed``: ``None`` (default) splits the caching over the ranks when a process
    group of several ranks is initialised; ``False`` never (each process does it all).
    Distributed, call it on every rank with the same arguments: each rank caches whole
    batches of the batching one process uses, every rank pairs the rows from their tokens
    and keeps the same subsample, rank 0 gathers the kept rows and scores them, and every
    rank returns the same scores, equal to one process's bit for bit.

    Example:
        >>> ls = layer_pair_scores(small, big, corpus[:60])  # doctest: +SKIP
        >>> ls.recommend(3)  # doctest: +SKIP
        [(11, 13, 0.83), ...]
    """
    if method not in ("cka", "ridge"):
        raise ValueError(f"method must be 'cka' or 'ridge', not {method!r}")
    src_layers = list(range(src.cfg.n_layers)) if src_layers is None else _block_outputs(src, src_layers)
    tgt_layers = list(range(tgt.cfg.n_layers)) if tgt_layers is None else _block_outputs(tgt, tgt_layers)
    hooks = ([resid_post(lay) for lay in src_layers], [resid_post(lay) for lay in tgt_layers])
    # the first token is an attention sink with a huge norm in many models; left in, it
    # dominates every similarity score (CKA saturated at one value across half the layers)
    sel = from_token(1) if positions is None else positions
    spread = xd.active(distributed)
    if spread:  # each rank caches its batches; every rank gets the rows' tokens, not activations
        with xd.collectively("caching the layer search"):
            shares = [
                cache_share(m, texts, layers, positions=sel, progress=progress)
                for m, layers in ((src, src_layers), (tgt, tgt_layers))
            ]
        a, b = (joined_set(xd.all_gather_objects(without_acts(sh)), texts) for sh in shares)
    else:
        a = cache_activations(src, texts, src_layers, positions=sel, progress=progress)
        b = cache_activations(tgt, texts, tgt_layers, positions=sel, progress=progress)
    alignment = "position" if same_tokenizer(src, tgt) else "char_end"
    # rows are matched once; the same matching holds for every layer
    si, ti = match_rows(a, b, alignment)
    coverage = {"src": len(si) / max(1, len(a)), "tgt": len(ti) / max(1, len(b))}
    if len(si) > max_rows:
        keep = torch.randperm(len(si), generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
        si, ti = si[keep], ti[keep]
    if spread:  # the kept rows, from the ranks that cached them, on rank 0
        xs, ys = rows_on_main(shares[0], a, si, hooks[0]), rows_on_main(shares[1], b, ti, hooks[1])
    else:
        xs, ys = [a.rows(h)[si] for h in hooks[0]], [b.rows(h)[ti] for h in hooks[1]]
    scores = None
    with xd.collectively("scoring the layer pairs", spread):
        if xs is not None:
            scores = (
                _cka(xs, ys, progress)
                if method == "cka"
                else _ridge_r2(xs, ys, a.text_index[si], ridge, progress)
            )
    if spread:
        scores = xd.broadcast_object(scores)
    return LayerScores(
        scores,
        src_layers,
        tgt_layers,
        method,
        src.cfg.model_name,
        tgt.cfg.model_name,
        len(si),
        meta={
            "alignment": alignment,
            "coverage": coverage,
            "n_texts": len(texts),
            "src_n_layers": src.cfg.n_layers,
            "tgt_n_layers": tgt.cfg.n_layers,
        },
    )


@dataclass
class RankAgreement:
    """Spearman's rho between a cheap layer-pair score and an expensive one
    (:func:`rank_agreement`); +1 means the cheap score ranks the pairs the same way.

    Attributes:
        pairs: the layer pairs scored both ways, sorted.
        cheap, expensive: the scores of each pair, signed so that higher is better.
        rho, p_value: Spearman's rank correlation and its p-value.
    """

    pairs: list[tuple[int, int]]
    cheap: list[float]
    expensive: list[float]
    rho: float
    p_value: float

    def to_dict(self) -> dict:
        """``{"pairs", "rho", "p_value"}`` (what ``rank_agreement`` returned before)."""
        return {"pairs": self.pairs, "rho": self.rho, "p_value": self.p_value}

    def to_frame(self):
        """One row per layer pair: both scores (higher is better) and their ranks."""
        import pandas as pd

        df = pd.DataFrame(
            {
                "src_layer": [p[0] for p in self.pairs],
                "tgt_layer": [p[1] for p in self.pairs],
                "cheap": self.cheap,
                "expensive": self.expensive,
            }
        )
        df["cheap_rank"] = df["cheap"].rank(ascending=False)
        df["expensive_rank"] = df["expensive"].rank(ascending=False)
        return df

    def to_markdown(self) -> str:
        lines = [
            f"Spearman's rho {self.rho:.2f} (p = {self.p_value:.2g}) over {len(self.pairs)} layer pairs "
            "(scores signed so that higher is better).",
            "",
            "| source layer | target layer | cheap | expensive | cheap rank | expensive rank |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.to_frame().itertuples():
            lines.append(
                f"| {r.src_layer} | {r.tgt_layer} | {r.cheap:.4g} | {r.expensive:.4g} "
                f"| {r.cheap_rank:g} | {r.expensive_rank:g} |"
            )
        return "\n".join(lines)

    def plot(self, ax=None):
        """The expensive score against the cheap one, one labelled point per pair."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(4.5, 3.4))
        ax.scatter(self.cheap, self.expensive)
        for p, x, y in zip(self.pairs, self.cheap, self.expensive, strict=True):
            ax.annotate(f"{p[0]}->{p[1]}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("cheap score (higher is better)")
        ax.set_ylabel("expensive score (higher is better)")
        ax.set_title(f"rank agreement: rho = {self.rho:.2f}, {len(self.pairs)} pairs", fontsize=9)
        return fig if fig is not None else ax.figure


def rank_agreement(
    cheap: dict[tuple[int, int], float],
    expensive: dict[tuple[int, int], float],
    higher_is_better: tuple[bool, bool] = (True, False),
) -> RankAgreement:
    """Spearman's rho between a cheap score and an expensive one over the same layer pairs.

    By default the cheap score is better when higher (CKA, R^2) and the expensive one when
    lower (patched KL); rho is reported so that +1 means the same ranking.
    """
    from scipy.stats import spearmanr

    keys = sorted(set(cheap) & set(expensive))
    if len(keys) < 3:
        raise ValueError(f"need at least 3 layer pairs scored both ways, got {len(keys)}")
    c = np.array([cheap[k] for k in keys]) * (1 if higher_is_better[0] else -1)
    e = np.array([expensive[k] for k in keys]) * (1 if higher_is_better[1] else -1)
    res = spearmanr(c, e)
    return RankAgreement(keys, c.tolist(), e.tolist(), float(res.statistic), float(res.pvalue))
