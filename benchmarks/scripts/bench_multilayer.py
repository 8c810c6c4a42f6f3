"""Multi-layer maps on a finished refusal run (issue 21): several source layers side by side
into the run's target layer, each carrying the source vector built at all of them, scored by
the continuous score on the run's own held-out prompts beside its native vector and its
single-layer transfer: several layer sets on one run's draws (a spec runs one set,
``source.layers``).

    python benchmarks/scripts/bench_multilayer.py benchmarks/results/refusal_smollm2_qwen05_variants \
        --layers 14,15,16 12,15,18 --out benchmarks/results/multilayer_smollm2_qwen05.json

Same prompt draws as the run (the spec's seed): the map is fitted on the last token of the
run's fit prompts (in the target's chat format), the vectors on its vector prompts, the
diagnostics read on its twin prompts; the single-layer map is refitted here the same way.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import xferlens.experiment.run as r
from xferlens.activations import paired_activations
from xferlens.evaluation import transfer_diagnostics
from xferlens.evaluation.score import dose_response
from xferlens.experiment import load_spec
from xferlens.mappers import fit_mapper
from xferlens.steering import diff_of_means, load_steering_vector, transfer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--layers", nargs="+", required=True, help="source layer sets, e.g. 14,15,16")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts scored (default: the run's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None, help="cut every prompt set to this many (smoke runs)")
    args = ap.parse_args()
    spec = load_spec(args.run / "spec.yaml")
    torch.manual_seed(spec.seed)
    if spec.source.layers or spec.mapper.fit_sources:
        raise SystemExit(
            f"{spec.name}: a run with source.layers or mapper.fit_sources; give a one-layer, task-fit run"
        )
    sets = {k: v[: args.limit] for k, v in r._prompt_sets(spec).items()}
    src, tgt = r._Models(spec, None).get()
    ls, lt = spec.source.layer, spec.target.layer
    fmt = tgt if spec.mapper.fit_format == "target" else src
    fit_texts = r._chat(fmt, spec, sets["fit_positive"] + sets["fit_negative"])
    held_texts = r._chat(fmt, spec, sets["twin_positive"] + sets["twin_negative"])
    layer_sets = [[ls]] + [[int(x) for x in s.split(",")] for s in args.layers]
    native = load_steering_vector(args.run / "vectors" / "native", tgt)
    n = native.direction().float().cpu()
    t0 = time.perf_counter()
    vecs, rows = {"native": native}, []
    for layers in layer_sets:
        label = "transferred L" + "+".join(map(str, layers))
        pairs = paired_activations(src, tgt, fit_texts, layers, lt, positions="last", progress=False)
        mapper, hist = fit_mapper(pairs, "affine", progress=False)
        v = diff_of_means(
            src, r._chat(src, spec, sets["positive"]), r._chat(src, spec, sets["negative"]), layers
        )
        t = transfer(v, mapper)
        vecs[label] = t
        held = paired_activations(src, tgt, held_texts, layers, lt, positions="last", progress=False)
        dg = transfer_diagnostics(
            v.direction(mapper.src_hook).float(), mapper, held.src, held.tgt, native=n
        ).to_dict()
        best = min(hist["candidates"], key=lambda c: c["val_mse"])
        d = t.direction().float().cpu()
        rows.append(
            {
                "label": label,
                "layers": layers,
                "d_src": pairs.d_src,
                "ridge": hist["ridge"],
                "val_fvu": best["val_fvu"],
                "norm_ratio": float(d.norm() / n.norm()),
                **dg,
            }
        )
        print(f"{label}: val FVU {best['val_fvu']:.3f}, cosine {dg['cosine_to_native']:.3f}", flush=True)
    fit_s = time.perf_counter() - t0
    prompts = r._chat(tgt, spec, sets["eval"][: args.prompts])
    t0 = time.perf_counter()
    dr = dose_response(
        tgt, prompts, vecs, spec.evaluation.alphas, spec.evaluation.openings, seed=spec.seed,
        batch_size=spec.evaluation.batch_size, progress=False,
    )  # fmt: skip
    score_s = time.perf_counter() - t0
    summary = r.score_summary(spec, dr)
    for row in rows:
        row["dose"] = summary["doses"][row["label"]]
    random_dose = summary["doses"]["random"]
    alphas = " / ".join(f"{a:g}" for a in spec.evaluation.alphas)
    lines = [
        "| source layers | d_src | val FVU | cosine to native | norm / native's | R^2 along v | spread ratio "
        f"| dose [95 % CI] (n = {len(prompts)}) | per alpha {alphas} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dd = row["dose"]
        per = " / ".join("–" if x is None or x != x else f"{x:.2f}" for x in dd["per_alpha"])
        lines.append(
            f"| {'+'.join(map(str, row['layers']))} | {row['d_src']} | {row['val_fvu']:.3f} | "
            f"{row['cosine_to_native']:.3f} | {row['norm_ratio']:.3f} | {row['subspace_r2']:.3f} | "
            f"{row['spread_ratio']:.3f} | {dd['dose']:.2f} [{dd['ci'][0]:.2f}, {dd['ci'][1]:.2f}] | {per} |"
        )
    lines.append(f"| random (native's norm) | | | | | | | {random_dose['dose']:.2f} | |")
    print("\n".join(lines))
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%d %H:%M"),
                "run": str(args.run),
                "rows": rows,
                "random": random_dose,
                "n": len(prompts),
                "seconds": {"fit": fit_s, "score": score_s},
                "markdown": "\n".join(lines),
            },
            indent=1,
            default=float,
        )
    )


if __name__ == "__main__":
    main()
