"""Will a map carry a vector? Diagnostics read before any steering or generation.

A map can align activations well on average and still lose the one direction a vector
needs (a high-cosine map whose mapped activations do not act: arXiv 2606.03280). These
diagnostics look at that direction only. Each takes plain tensors (rows are real
activations of held-out prompts, never the rows the map was fitted on) and returns a dict
of floats; :func:`transfer_diagnostics` computes them all for one vector and map (a
:class:`TransferDiagnostics` report).

- **Round trip** (:func:`round_trip`): carry the source vector ``v`` to the target with the
  forward map and back with a map fitted the other way; ``cosine(v, B(F(v)))`` and the
  length ratio ``|B(F(v))| / |v|``. A direction the forward map drops does not come back.
- **Subspace fidelity** (:func:`subspace_fidelity`): project mapped rows and the target's own
  rows on the transferred direction ``u``; ``r2`` is how much of the target's spread along
  ``u`` the mapped projections explain, ``spread_ratio`` = std(target along ``u``) / std(mapped
  along ``u``) is the label-free length correction (a least-squares map shrinks what it
  predicts poorly; > 1 means the mapped rows are squeezed along ``u``).
- **Probe agreement** (:func:`probe_agreement`): does ``<h, v>`` rank held-out prompts the same
  way in the source as ``<h, T(v)>`` in the target? Spearman and Pearson over prompts; with the
  target's own vector given, the same against it (a property of the pair and task, not of
  the map: do both models order the prompts alike?). Read it beside the fidelity: where the
  prompts vary mostly along the behaviour, almost any direction with a component along it
  ranks them alike, even one from a map that learned nothing (its sign then is chance).

How well each predicts the native-equivalent dose across pairs and tasks is measured in
``benchmarks/RESULTS.md`` ("Will a map carry a vector?").
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
from jaxtyping import Float
from torch import Tensor

from xferlens.mappers.base import Mapper


def _unit(v: Tensor) -> Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError(f"direction has norm {float(n)}; give a non-zero, finite vector")
    return v / n


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(_unit(a.double()), _unit(b.double())))


def round_trip(
    v: Float[Tensor, " d_src"],
    forward: Mapper,
    backward: Mapper,
    source_rows: Float[Tensor, "n d_src"] | None = None,
    target_rows: Float[Tensor, "n d_tgt"] | None = None,
) -> dict[str, float]:
    """``cosine(v, B(F(v)))`` and ``|B(F(v))| / |v|`` (module doc). ``source_rows`` /
    ``target_rows`` are needed only for maps that are not affine (``Mapper.map_direction``)."""
    if forward.d_src != backward.d_tgt or forward.d_tgt != backward.d_src:
        raise ValueError(
            f"backward must map {forward.d_tgt} -> {forward.d_src} (the forward map's target to its "
            f"source), not {backward.d_src} -> {backward.d_tgt}"
        )
    there = forward.map_direction(v, source_rows)
    back = backward.map_direction(there, target_rows).to(v.device)
    return {"cosine": _cos(v, back), "length": float(back.norm() / v.norm())}


def subspace_fidelity(
    mapped_rows: Float[Tensor, "n d"],
    target_rows: Float[Tensor, "n d"],
    direction: Float[Tensor, " d"],
) -> dict[str, float]:
    """The map's fidelity along ``direction`` only (module doc): ``r2`` (1 - squared error
    of the mapped projections over the target projections' variance), ``spread_ratio`` and
    the projections' correlation."""
    if mapped_rows.shape != target_rows.shape or mapped_rows.ndim != 2:
        raise ValueError(
            f"mapped_rows {tuple(mapped_rows.shape)} and target_rows {tuple(target_rows.shape)} must be "
            "the same [n, d] (row i: the same token in both)"
        )
    if len(target_rows) < 3:
        raise ValueError(f"need at least 3 rows, got {len(target_rows)}")
    if mapped_rows.shape[1] != direction.shape[0]:
        raise ValueError(f"direction has {direction.shape[0]} dims, the rows {mapped_rows.shape[1]}")
    u = _unit(direction.double().cpu())
    pm, pt = mapped_rows.double().cpu() @ u, target_rows.double().cpu() @ u
    var_t = float(pt.var(unbiased=False))
    if var_t == 0:
        raise ValueError("the target rows do not vary along the direction; give varied prompts")
    r2 = 1 - float(((pt - pm) ** 2).mean()) / var_t
    sm = float(pm.std(unbiased=False))
    return {
        "r2": r2,
        "spread_ratio": math.sqrt(var_t) / sm if sm > 0 else math.inf,
        "correlation": float(torch.corrcoef(torch.stack([pm, pt]))[0, 1]),
        "n": len(pt),
    }


def probe_agreement(
    source_rows: Float[Tensor, "n d_src"],
    target_rows: Float[Tensor, "n d_tgt"],
    source_vector: Float[Tensor, " d_src"],
    target_vector: Float[Tensor, " d_tgt"],
) -> dict[str, float]:
    """Spearman and Pearson correlation over prompts of ``<h_src, v_src>`` and
    ``<h_tgt, v_tgt>`` (row i of both: the same prompt)."""
    from scipy.stats import spearmanr

    if len(source_rows) != len(target_rows) or len(source_rows) < 3:
        raise ValueError(
            f"source_rows ({len(source_rows)}) and target_rows ({len(target_rows)}) must hold the same "
            "prompts, at least 3"
        )
    a = source_rows.double().cpu() @ source_vector.double().cpu()
    b = target_rows.double().cpu() @ target_vector.double().cpu()
    return {
        "spearman": float(spearmanr(a.numpy(), b.numpy()).statistic),
        "pearson": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
        "n": len(a),
    }


@dataclass
class TransferDiagnostics:
    """Every diagnostic of the module doc for one vector and map (:func:`transfer_diagnostics`).

    Attributes:
        n_rows: held-out rows read.
        subspace_r2, spread_ratio: :func:`subspace_fidelity` along the transferred direction.
        probe_spearman: :func:`probe_agreement` of ``v`` in the source with its image.
        round_trip_cosine, round_trip_length: :func:`round_trip` (NaN without a backward map).
        cosine_to_native: cosine of the image with the target's own vector (NaN without one).
        native_probe_spearman: probe agreement of ``v`` with the target's own vector (NaN
            without one).

    ``report["subspace_r2"]`` and ``{**report}`` read it like the flat dict it replaces.
    """

    n_rows: float
    subspace_r2: float
    spread_ratio: float
    probe_spearman: float
    round_trip_cosine: float = math.nan
    round_trip_length: float = math.nan
    cosine_to_native: float = math.nan
    native_probe_spearman: float = math.nan

    def to_dict(self) -> dict[str, float]:
        """The flat dict of floats, in field order."""
        return asdict(self)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str) -> float:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def to_frame(self):
        """One row (the markdown's), one column per diagnostic."""
        import pandas as pd

        return pd.DataFrame([self.to_dict()], columns=self.keys())

    def to_markdown(self) -> str:
        f = lambda x: "-" if math.isnan(x) else f"{x:.3f}"  # noqa: E731
        return "\n".join(
            [
                f"Transfer diagnostics on {int(self.n_rows)} held-out rows (- where not asked for).",
                "",
                "| round-trip cosine | round-trip length | subspace R^2 | spread ratio | probe Spearman "
                "| cosine to native | native probe Spearman |",
                "|---|---|---|---|---|---|---|",
                f"| {f(self.round_trip_cosine)} | {f(self.round_trip_length)} | {f(self.subspace_r2)} | "
                f"{f(self.spread_ratio)} | {f(self.probe_spearman)} | {f(self.cosine_to_native)} | "
                f"{f(self.native_probe_spearman)} |",
            ]
        )

    def plot(self, ax=None):
        """One bar per diagnostic (missing ones left out); 1 dotted, what a faithful map reaches
        on every one of them."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.2))
        d = {k: v for k, v in self.to_dict().items() if k != "n_rows" and not math.isnan(v)}
        ax.bar(range(len(d)), list(d.values()))
        ax.set_xticks(range(len(d)), [k.replace("_", " ") for k in d], rotation=30, ha="right", fontsize=7)
        ax.axhline(1.0, color="gray", ls=":", lw=0.8)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_title(f"transfer diagnostics, {int(self.n_rows)} held-out rows", fontsize=9)
        return fig if fig is not None else ax.figure


def transfer_diagnostics(
    v: Float[Tensor, " d_src"],
    mapper: Mapper,
    source_rows: Float[Tensor, "n d_src"],
    target_rows: Float[Tensor, "n d_tgt"],
    *,
    backward: Mapper | None = None,
    native: Float[Tensor, " d_tgt"] | None = None,
) -> TransferDiagnostics:
    """Every diagnostic of the module doc for the source vector ``v`` under ``mapper``, on
    held-out rows (the same prompts' activations at the map's two hooks). ``backward``: a map
    fitted target -> source, for the round trip; ``native``: the target's own vector, for
    the cosine to it and the probe agreement with it. NaN where a piece was not asked for;
    ``.to_dict()`` is the flat dict of floats."""
    src, tgt = source_rows.float(), target_rows.float()
    t = mapper.map_direction(v, src).cpu()
    with torch.no_grad():
        mapped = torch.cat([mapper(b) for b in src.split(4096)]).cpu()
    fid = subspace_fidelity(mapped, tgt.cpu(), t)
    probe = probe_agreement(src, tgt, v, t)
    out = TransferDiagnostics(
        n_rows=float(len(src)),
        subspace_r2=fid["r2"],
        spread_ratio=fid["spread_ratio"],
        probe_spearman=probe["spearman"],
    )
    if backward is not None:
        rt = round_trip(v, mapper, backward, src, tgt)
        out.round_trip_cosine, out.round_trip_length = rt["cosine"], rt["length"]
    if native is not None:
        out.cosine_to_native = _cos(t, native.cpu())
        out.native_probe_spearman = probe_agreement(src, tgt, v, native)["spearman"]
    return out
