"""Do the transfer diagnostics predict the native-equivalent dose? (issue 21)

Reads finished run folders (``xferlens run`` outputs) and tabulates, per run and per map
that carried the vector, the diagnostics read before any steering (``vectors.json``) beside
the dose the scoring step measured, then the rank correlation of each diagnostic with the
dose over the runs that measured a transfer (random below the transferred dose). No model
runs: the diagnostics are the run's own, and the doses are read from its saved
dose-response (``scores.json``) by the current library, as a re-rendered report shows them.

    python benchmarks/scripts/diagnostics_table.py benchmarks/results/refusal_* benchmarks/demo ...
"""

import argparse
import json
import math
from pathlib import Path

from scipy.stats import spearmanr

from xferlens.evaluation.dose import DoseResponse
from xferlens.experiment import load_spec
from xferlens.experiment.run import score_summary

DIAG = ("round_trip_cosine", "round_trip_length", "subspace_r2", "spread_ratio", "probe_spearman")


def rows_of(folder: Path) -> list[dict]:
    status = folder / "status.json"
    if not status.is_file() or not json.loads(status.read_text()).get("complete"):
        return []
    vec = json.loads((folder / "vectors.json").read_text())
    sc = json.loads((folder / "scores.json").read_text())
    spec = load_spec(folder / "spec.yaml")
    # the doses as the current library reads them (what a re-rendered report shows)
    sc.update(score_summary(spec, DoseResponse.from_dict(sc["dose_response"])))
    task = spec.vector.task
    maps = {vec["mapper"]: ("transferred", vec.get("diagnostics") or {})}
    for kind, d in (vec.get("diagnostics_carried") or {}).items():
        maps[kind] = (f"transferred via {kind}", d)
    out = []
    for kind, (label, d) in maps.items():
        dose = sc["doses"].get(label)
        if not d or dose is None:
            continue
        out.append(
            {
                "run": folder.name,
                "task": task,
                "map": kind,
                "used": kind == vec["mapper"],
                "n": len(sc["dose_response"]["none"]),
                "dose": dose["dose"],
                "ci": dose["ci"],
                "random": sc["doses"].get("random", {}).get("dose", math.nan),
                "cosine_to_native": vec.get("cosine_to_native", {}).get(label, math.nan),
                **{k: d.get(k, math.nan) for k in DIAG},
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/diagnostics_vs_dose.json"))
    args = ap.parse_args()
    rows = [r for f in args.runs for r in rows_of(f)]
    f = lambda x: "–" if x != x else f"{x:.3f}"  # noqa: E731
    lines = [
        "| run | task | map | n | round trip cos / length | R^2 along v | spread ratio | probe Spearman "
        "| cosine to native | dose [95 % CI] | random |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['task']} | {r['map']} | {r['n']} | {f(r['round_trip_cosine'])} / "
            f"{f(r['round_trip_length'])} | {f(r['subspace_r2'])} | {f(r['spread_ratio'])} | "
            f"{f(r['probe_spearman'])} | {f(r['cosine_to_native'])} | {r['dose']:.2f} "
            f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['random']:.2f}"
            + (" (left out: random >= transferred)" if r["random"] >= r["dose"] else "")
            + " |"
        )
    # a run whose random direction reaches the transfer's dose measured no transfer (the
    # report's warning): its dose says nothing about the map, so it is left out here
    # one row per run (the map it used): carried variants of the same run would count the
    # same prompts twice
    valid = [r for r in rows if not r["random"] >= r["dose"] and r["used"]]
    groups = {
        "all tasks": valid,
        # tag-first tasks read their held-out rows at a leading tag: one point repeated
        "last-token vectors (refusal)": [r for r in valid if r["task"] in ("refusal", "custom")],
    }
    corr: dict = {g: {} for g in groups}
    for g, sel in groups.items():
        for k in (*DIAG, "cosine_to_native"):
            pts = [(r[k], r["dose"]) for r in sel if r[k] == r[k]]
            if len(pts) >= 4:
                rho, p = spearmanr([a for a, _ in pts], [b for _, b in pts])
                corr[g][k] = {"spearman": float(rho), "p": float(p), "n": len(pts)}
    heads = list(groups)
    lines += [
        "",
        "| diagnostic | " + " | ".join(f"Spearman with the dose, {g} (p, runs)" for g in heads) + " |",
        "|---|" + "---|" * len(heads),
    ]
    for k in (*DIAG, "cosine_to_native"):
        cells = [
            f"{c['spearman']:.2f} ({c['p']:.2f}, {c['n']})" if (c := corr[g].get(k)) else "–" for g in heads
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    args.out.write_text(json.dumps({"rows": rows, "correlation": corr}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
