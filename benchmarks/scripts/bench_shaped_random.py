"""A random control shaped like the layer (issue 22 follow-up): on a finished run, score
random directions shaped like the target layer (``xferlens.evaluation.shaped_random_like``:
``sigma * z``, ``sigma`` the layer's per-dimension standard deviation over content tokens of
corpus text the run never steered, ``layer_spread``) with native's norm in that metric
(``|v / sigma| = |native / sigma|``), beside the run's native, transferred and isotropic
random vectors, on the run's own held-out prompts and alphas.

Why: into the Gemma organism an isotropic random direction of native's Euclidean norm
removes the backdoor as well as native does (RESULTS "Backdoor removal SmolLM2 organism ->
Gemma organism"), so that control cannot show a transfer. A push measured against the
layer's natural variation is another reading of "a push of native's size".

    python benchmarks/scripts/bench_shaped_random.py benchmarks/results/backdoor_smollm2_gemma \
        --seeds 0 1 2 --out benchmarks/results/shaped_random_smollm2_gemma.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

import xferlens.experiment.run as r
from xferlens import data
from xferlens.evaluation.score import dose_response
from xferlens.evaluation.steering import layer_spread, random_like, shaped_random_like
from xferlens.experiment import load_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--texts", type=int, default=64, help="corpus texts for the layer's spread")
    ap.add_argument("--judge-prompts", type=int, default=0, help="judge the shaped randoms' replies too")
    ap.add_argument("--judge-alphas", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec = load_spec(args.run / "spec.yaml")
    torch.manual_seed(spec.seed)
    sets = r._prompt_sets(spec)
    src, tgt = r._Models(spec, None).get()
    lt = json.loads((args.run / "layers.json").read_text())["tgt_layer"]
    vecs = r._target_vectors(spec, args.run, tgt)
    native = vecs["native"]
    # corpus texts from the far end of the default corpus: never searched, fitted or steered
    texts = [t[: spec.corpus_chars or 600] for t in data.default_corpus(None).texts[-args.texts :]]
    t0 = time.perf_counter()
    sigma = layer_spread(tgt, lt, texts)
    n = native.direction().float().cpu()
    rows = {}
    for label, v in vecs.items():
        d = v.direction().float().cpu()
        rows[label] = {"norm": float(d.norm()), "metric_norm": float((d / sigma).norm())}
    for s in args.seeds:
        vecs[f"random, layer-shaped (seed {s})"] = shaped_random_like(native, sigma, s)
    trig = r._trigger_positions(spec)
    prompts = r._chat(tgt, spec, sets["eval"])
    dr = dose_response(
        tgt, prompts, vecs, spec.evaluation.alphas, spec.evaluation.openings, seed=spec.seed,
        positions=trig["add"] if trig is not None else "all", batch_size=spec.evaluation.batch_size,
        progress=True,
    )  # fmt: skip
    judged = None
    if args.judge_prompts:  # the run's confirmation judged native / transferred / random on these
        from xferlens.evaluation import evaluate_steering

        shaped = {k: v for k, v in vecs.items() if k.startswith("random, layer-shaped")}
        e = spec.evaluation
        rep = evaluate_steering(
            tgt, prompts[: args.judge_prompts], shaped, alphas=args.judge_alphas, mode="add",
            positions=trig["add"] if trig is not None else "all", judge=e.judge,
            max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=spec.seed,
            random_control=False, progress=True,
        )  # fmt: skip
        judged = [{k: v for k, v in row.items() if k != "completions"} for row in rep.to_dict()["rows"]]
        for row in judged:
            print(row)
    seconds = time.perf_counter() - t0
    summary = r.score_summary(spec, dr)
    for label, v in vecs.items():
        d = v.direction().float().cpu()
        row = rows.setdefault(label, {"norm": float(d.norm()), "metric_norm": float((d / sigma).norm())})
        row["cosine_to_native"] = float(torch.nn.functional.cosine_similarity(d, n, dim=0))
        heavy = sigma.topk(4).indices
        row["share_on_4_widest_dims"] = float(d[heavy].pow(2).sum() / d.pow(2).sum())
        if label in summary["doses"]:
            row["dose"] = summary["doses"][label]
    iso = random_like(native, spec.seed).direction().float().cpu()  # the run's own random control
    rows["random"] = {
        "norm": float(iso.norm()),
        "metric_norm": float((iso / sigma).norm()),
        "cosine_to_native": float(torch.nn.functional.cosine_similarity(iso, n, dim=0)),
        "share_on_4_widest_dims": float(iso[sigma.topk(4).indices].pow(2).sum() / iso.pow(2).sum()),
        "dose": summary["doses"]["random"],
    }
    alphas = " / ".join(f"{a:g}" for a in spec.evaluation.alphas)
    lines = [
        "| vector | norm | norm / sigma | share of norm^2 on the 4 widest dims "
        f"| dose [95 % CI] (n = {len(prompts)}) | per alpha {alphas} |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        dd = row.get("dose")
        dose = (
            "1 (reference)"
            if label == "native"
            else "–"
            if dd is None
            else f"{dd['dose']:.2f} [{dd['ci'][0]:.2f}, {dd['ci'][1]:.2f}]"
        )
        per = (
            ""
            if dd is None
            else " / ".join("–" if x is None or x != x else f"{x:.2f}" for x in dd["per_alpha"])
        )
        lines.append(
            f"| {label} | {row.get('norm', float('nan')):.3g} | {row.get('metric_norm', float('nan')):.3g} | "
            f"{row.get('share_on_4_widest_dims', float('nan')):.2f} | {dose} | {per} |"
        )
    print("\n".join(lines))
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%d %H:%M"),
                "run": str(args.run),
                "texts_for_sigma": len(texts),
                "sigma": {
                    "min": float(sigma.min()),
                    "median": float(sigma.median()),
                    "max": float(sigma.max()),
                },
                "rows": rows,
                "judged": judged,
                "n": len(prompts),
                "seconds": seconds,
                "markdown": "\n".join(lines),
            },
            indent=1,
            default=float,
        )
    )


if __name__ == "__main__":
    main()
