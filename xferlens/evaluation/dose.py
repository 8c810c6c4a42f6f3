"""Dose-response of steering vectors on the continuous score, and the native-equivalent dose.

A :class:`DoseResponse` holds the score (:mod:`xferlens.evaluation.score`) of every prompt
under every (vector, alpha) of a grid, plus the unsteered model (alpha 0 for every vector).
Rules:

- Intervals are percentile bootstraps over prompts; every condition is resampled with the
  same prompt indices (the conditions are paired: same prompts).
- The **native-equivalent dose** of a vector ``T`` against a reference ``N`` (the target's
  own vector) is the scale ``c`` for which ``N x c`` best matches ``T``'s curve: it
  minimises the mean squared difference between ``T``'s mean score at each alpha and
  ``N``'s mean score at ``c * alpha``, read by linear interpolation on ``N``'s measured
  curve (``0`` is the unsteered point). ``c`` is searched on ``[0, c_max]``. ``c = 1``
  means the vector acts like the native one; a random direction gets ``c`` near 0.
- Only the **rising part** of each curve is used: a score level names one dose only
  below the curve's peak (past it, oversteering degrades the replies and the score falls
  again, so a late low score would read as a small dose). ``N`` is read on ``[0, its peak
  alpha]`` and ``T``'s points count up to ``T``'s own peak; points where ``c * alpha``
  falls past ``N``'s peak are left out (no extrapolation). Peaks are the argmax of the
  mean curve, taken again in every bootstrap resample. Near a peak the score is flat in
  the dose and the reading is weak; linear interpolation on a concave curve reads doses a
  few hundredths high (tests/unit/test_dose.py measures it on a synthetic peaked curve).
- The dose **at each alpha** inverts ``N``'s rising part (made monotone by a running
  maximum): the ``c`` with ``N(c * alpha) = T(alpha)``; ``nan`` where ``T(alpha)`` lies
  above ``N``'s peak or ``alpha`` lies past ``T``'s own peak.
"""

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from einops import reduce

C_MAX = 2.5
C_STEP = 0.005


def _interp_weights(xs: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights to read a curve sampled at sorted ``xs`` at points ``q``
    (``valid`` false beyond the last sample)."""
    valid = q <= xs[-1] + 1e-12
    qc = np.clip(q, xs[0], xs[-1])
    hi = np.clip(np.searchsorted(xs, qc, side="right"), 1, len(xs) - 1)
    lo = hi - 1
    w = (qc - xs[lo]) / np.maximum(xs[hi] - xs[lo], 1e-12)
    return lo, hi, w, valid


def equivalent_dose(
    alphas: Sequence[float] | np.ndarray,
    reference: np.ndarray,
    curve: np.ndarray,
    *,
    c_max: float = C_MAX,
    step: float = C_STEP,
) -> np.ndarray:
    """The native-equivalent dose (module doc) for each row of a batch of curves.

    Args:
        alphas: the grid, positive and increasing (``K`` values).
        reference: ``[B, K + 1]`` the reference's mean score at ``0, *alphas``.
        curve: ``[B, K]`` the compared vector's mean score at ``alphas``.

    Returns:
        ``[B]`` doses (``nan`` where fewer than two points are comparable at every ``c``).
    """
    a = np.asarray(alphas, dtype=float)
    if a.ndim != 1 or len(a) < 1 or np.any(a <= 0) or np.any(np.diff(a) <= 0):
        raise ValueError(f"alphas must be positive and increasing, got {list(alphas)}")
    reference, curve = np.atleast_2d(reference), np.atleast_2d(curve)
    xs = np.concatenate([[0.0], a])
    cs = np.arange(0.0, c_max + step / 2, step)
    lo, hi, w, _ = _interp_weights(xs, cs[:, None] * a[None, :])  # [C, K]
    pred = reference[:, lo] * (1 - w) + reference[:, hi] * w  # [B, C, K]
    err = (curve[:, None, :] - pred) ** 2
    ref_top = xs[np.argmax(reference, axis=1)]  # [B] the reference's peak alpha
    reach = (cs[:, None] * a[None, :])[None] <= ref_top[:, None, None] + 1e-12  # [B, C, K]
    use = np.arange(len(a))[None, :] <= np.argmax(curve, axis=1)[:, None]  # [B, K] rising part
    valid = reach & use[:, None, :]
    need = np.minimum(2, use.sum(1))  # [B]
    enough = valid.sum(2) >= need[:, None]  # [B, C]
    err = np.where(valid & enough[:, :, None], err, np.nan)
    with warnings.catch_warnings():  # rows of all-NaN (c too large for the grid) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = np.nanmean(err, axis=2)  # [B, C]
    out = np.full(len(curve), np.nan)
    ok = ~np.all(np.isnan(loss), axis=1) & (ref_top > 0)  # a reference that never rises: no dose
    out[ok] = cs[np.nanargmin(loss[ok], axis=1)]
    return out


def dose_at_each_alpha(
    alphas: Sequence[float] | np.ndarray, reference: np.ndarray, curve: np.ndarray
) -> np.ndarray:
    """``[B, K]``: for each alpha, the ``c`` with ``ref(c * alpha) = curve(alpha)`` (module doc)."""
    a = np.asarray(alphas, dtype=float)
    reference, curve = np.atleast_2d(reference), np.atleast_2d(curve)
    xs = np.concatenate([[0.0], a])
    out = np.full(curve.shape, np.nan)
    for b in range(len(curve)):
        top = int(np.argmax(reference[b]))
        ref = np.maximum.accumulate(reference[b][: top + 1])
        own_top = int(np.argmax(curve[b]))
        for k, y in enumerate(curve[b]):
            if k > own_top:
                continue  # past the compared curve's own peak
            if y <= ref[0]:
                out[b, k] = 0.0
            elif y <= ref[-1]:
                j = int(np.searchsorted(ref, y, side="left"))
                j = max(1, j)
                span = ref[j] - ref[j - 1]
                x = xs[j - 1] + (xs[j] - xs[j - 1]) * ((y - ref[j - 1]) / span if span > 0 else 1.0)
                out[b, k] = x / a[k]
    return out


@dataclass
class DoseEstimate:
    """A dose with its bootstrap interval, and the per-alpha doses with theirs."""

    label: str
    reference: str
    dose: float
    ci: tuple[float, float]
    per_alpha: list[float]
    per_alpha_ci: list[tuple[float, float]]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if len(x) else math.nan


@dataclass
class DoseDifference:
    """Per alpha: the mean score of ``label`` minus that of ``other`` over the same prompts,
    with a paired bootstrap 95 % interval (:meth:`DoseResponse.difference`).

    Attributes:
        alphas: the grid.
        diff: the difference of mean scores at each alpha.
        ci: its interval at each alpha.
        n: prompts per condition.
    """

    label: str
    other: str
    alphas: list[float]
    diff: list[float]
    ci: list[tuple[float, float]]
    n: int

    def to_dict(self) -> list[dict]:
        """One dict per alpha (what ``difference()`` returned before it was a report)."""
        return [{"alpha": a, "diff": self.diff[k], "ci": self.ci[k]} for k, a in enumerate(self.alphas)]

    def to_frame(self):
        """One row per alpha, as in the markdown."""
        import pandas as pd

        return pd.DataFrame(
            {
                "alpha": list(self.alphas),
                "diff": self.diff,
                "ci_low": [c[0] for c in self.ci],
                "ci_high": [c[1] for c in self.ci],
            }
        )

    def to_markdown(self) -> str:
        lines = [
            f"Mean log-odds of {self.label} minus {self.other} (n = {self.n} paired prompts; "
            "95 % bootstrap intervals).",
            "",
            f"| alpha | {self.label} - {self.other} | 95 % CI |",
            "|---|---|---|",
        ]
        for a, d, (lo, hi) in zip(self.alphas, self.diff, self.ci, strict=True):
            lines.append(f"| {a:g} | {d:.2f} | [{lo:.2f}, {hi:.2f}] |")
        return "\n".join(lines)

    def plot(self, ax=None):
        """The difference against alpha with its intervals; 0 dashed."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 3.2))
        lo = [d - c[0] for d, c in zip(self.diff, self.ci, strict=True)]
        hi = [c[1] - d for d, c in zip(self.diff, self.ci, strict=True)]
        ax.errorbar(self.alphas, self.diff, yerr=[lo, hi], marker="o", capsize=3)
        ax.axhline(0.0, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("alpha")
        ax.set_ylabel(f"{self.label} - {self.other} (mean log-odds)")
        ax.set_title(f"{self.label} minus {self.other}: n = {self.n} prompts", fontsize=9)
        return fig if fig is not None else ax.figure


@dataclass
class DoseResponse:
    """Per-prompt scores under every vector and alpha, with the unsteered model.

    Attributes:
        alphas: the grid (positive, increasing).
        none: ``[n]`` the unsteered scores.
        scores: ``{label: [K, n]}`` per vector.
        meta: model, openings, prompt count and fingerprint, norms.
    """

    alphas: list[float]
    none: np.ndarray
    scores: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.none = np.asarray(self.none, dtype=float)
        self.scores = {k: np.asarray(v, dtype=float) for k, v in self.scores.items()}
        for k, v in self.scores.items():
            if v.shape != (len(self.alphas), len(self.none)):
                raise ValueError(
                    f"scores[{k!r}] has shape {v.shape}; expected (alphas, prompts) = "
                    f"({len(self.alphas)}, {len(self.none)})"
                )

    @property
    def labels(self) -> list[str]:
        return list(self.scores)

    @property
    def n(self) -> int:
        return len(self.none)

    def _boot_idx(self, n_boot: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.integers(0, self.n, size=(n_boot, self.n))

    def curve(self, label: str, idx: np.ndarray | None = None) -> np.ndarray:
        """Mean score at ``0, *alphas`` (``[K + 1]``; ``[B, K + 1]`` over bootstrap indices)."""
        if label != "none" and label not in self.scores:
            raise KeyError(f"no condition {label!r}; have {['none', *self.labels]}")
        if idx is None:
            none = self.none.mean()
            if label == "none":
                return np.full(len(self.alphas) + 1, none)
            return np.concatenate([[none], reduce(self.scores[label], "alpha prompt -> alpha", "mean")])
        # idx: [boot, prompt] resampled prompt indices, the same for every condition
        none = reduce(self.none[idx], "boot prompt -> boot", "mean")
        if label == "none":
            return np.repeat(none[:, None], len(self.alphas) + 1, axis=1)
        rest = reduce(self.scores[label][:, idx], "alpha boot prompt -> boot alpha", "mean")
        return np.concatenate([none[:, None], rest], axis=1)

    def peak(self, label: str) -> float:
        """The alpha where ``label``'s mean score is highest (0: never above unsteered);
        doses are read below it (module doc)."""
        return float(([0.0, *self.alphas])[int(np.argmax(self.curve(label)))])

    def intervals(self, label: str, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
        """``[K + 1, 2]`` bootstrap 95 % intervals of the mean score at ``0, *alphas``."""
        boot = self.curve(label, self._boot_idx(n_boot, seed))
        return np.stack([np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)], axis=1)

    def equivalent_dose(
        self, label: str, reference: str = "native", n_boot: int = 1000, seed: int = 0
    ) -> DoseEstimate:
        """``label``'s native-equivalent dose against ``reference`` (module doc), with a
        bootstrap 95 % interval over prompts."""
        ref, cur = self.curve(reference), self.curve(label)[1:]
        c = float(equivalent_dose(self.alphas, ref[None], cur[None])[0])
        per = dose_at_each_alpha(self.alphas, ref[None], cur[None])[0]
        idx = self._boot_idx(n_boot, seed)
        bref, bcur = self.curve(reference, idx), self.curve(label, idx)[:, 1:]
        cb = equivalent_dose(self.alphas, bref, bcur)
        pb = dose_at_each_alpha(self.alphas, bref, bcur)
        return DoseEstimate(
            label,
            reference,
            c,
            (_pct(cb, 2.5), _pct(cb, 97.5)),
            [float(x) for x in per],
            [(_pct(pb[:, k], 2.5), _pct(pb[:, k], 97.5)) for k in range(len(self.alphas))],
        )

    def difference(self, label: str, other: str, n_boot: int = 1000, seed: int = 0) -> DoseDifference:
        """Per alpha: mean score of ``label`` minus ``other`` with a paired bootstrap interval."""
        idx = self._boot_idx(n_boot, seed)
        d = self.curve(label)[1:] - self.curve(other)[1:]
        db = self.curve(label, idx)[:, 1:] - self.curve(other, idx)[:, 1:]
        return DoseDifference(
            label,
            other,
            list(self.alphas),
            [float(x) for x in d],
            [(_pct(db[:, k], 2.5), _pct(db[:, k], 97.5)) for k in range(len(self.alphas))],
            self.n,
        )

    def mean_probability(self, label: str) -> np.ndarray:
        """Mean P(opening) at ``0, *alphas`` (the score on the probability scale)."""
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        none = sig(self.none).mean()
        if label == "none":
            return np.full(len(self.alphas) + 1, none)
        return np.concatenate([[none], reduce(sig(self.scores[label]), "alpha prompt -> alpha", "mean")])

    # ------------------------------------------------------------ views

    def to_dict(self) -> dict:
        return {
            "alphas": list(self.alphas),
            "none": self.none.tolist(),
            "scores": {k: v.tolist() for k, v in self.scores.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DoseResponse":
        return cls(
            list(d["alphas"]),
            np.asarray(d["none"]),
            {k: np.asarray(v) for k, v in d["scores"].items()},
            d.get("meta", {}),
        )

    def to_frame(self, n_boot: int = 1000, seed: int = 0):
        """The markdown table as a DataFrame: one row per condition (``none`` first), columns
        ``(stat, alpha)`` for stat in ``mean``, ``ci_low``, ``ci_high``, ``p`` (mean P(opening));
        ``frame["mean"]`` is the conditions-by-alphas table. The ``none`` row repeats the
        unsteered figures at every alpha."""
        import pandas as pd

        rows = {}
        for lab in ["none", *self.labels]:
            m, iv, pr = (
                self.curve(lab)[1:],
                self.intervals(lab, n_boot, seed)[1:],
                self.mean_probability(lab)[1:],
            )
            rows[lab] = {"mean": m, "ci_low": iv[:, 0], "ci_high": iv[:, 1], "p": pr}
        stats = ["mean", "ci_low", "ci_high", "p"]
        columns = pd.MultiIndex.from_product([stats, list(self.alphas)], names=["stat", "alpha"])
        data = [np.concatenate([rows[lab][s] for s in stats]) for lab in rows]
        return pd.DataFrame(data, index=pd.Index(list(rows), name="condition"), columns=columns)

    def to_markdown(self, n_boot: int = 1000, seed: int = 0) -> str:
        """Mean log-odds with 95 % intervals (and mean P(opening)) per condition and alpha."""
        head = "| condition | " + " | ".join(f"alpha {a:g}" for a in self.alphas) + " |"
        lines = [
            f"Mean log-odds of the reply's opening `{self.meta.get('openings', '?')}` "
            f"(n = {self.n} prompts per condition; 95 % bootstrap intervals; mean P in brackets).",
            "",
            head,
            "|" + "---|" * (len(self.alphas) + 1),
        ]
        ci = self.intervals("none", n_boot, seed)[0]
        p0 = self.mean_probability("none")[0]
        lines.append(
            f"| none | {self.none.mean():.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (P {p0:.2f}) |"
            + " |" * (len(self.alphas) - 1)
        )
        for lab in self.labels:
            m, iv, pr = (
                self.curve(lab)[1:],
                self.intervals(lab, n_boot, seed)[1:],
                self.mean_probability(lab)[1:],
            )
            cells = [f"{m[k]:.2f} [{iv[k, 0]:.2f}, {iv[k, 1]:.2f}] (P {pr[k]:.2f})" for k in range(len(m))]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, ax=None, n_boot: int = 1000, seed: int = 0):
        """Mean score against alpha per condition, 95 % bands; the unsteered score at 0."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5.8, 3.8))
        xs = [0.0, *self.alphas]
        for lab in self.labels:
            m, iv = self.curve(lab), self.intervals(lab, n_boot, seed)
            (line,) = ax.plot(xs, m, marker="o", ms=3, label=lab)
            ax.fill_between(xs, iv[:, 0], iv[:, 1], color=line.get_color(), alpha=0.15)
        ax.axhline(self.none.mean(), color="gray", ls="--", lw=0.8, label="none")
        ax.set_xlabel("alpha")
        ax.set_ylabel("mean log-odds of the opening")
        ax.set_title(
            f"{self.meta.get('model', '')}: n = {self.n} prompts, openings {self.meta.get('openings', '')}",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        return fig if fig is not None else ax.figure
