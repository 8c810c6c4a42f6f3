"""Mappers on real zoo models (issue 4): layer-pair search, its check against patched KL,
and the report cards of affine / orthogonal / autoencoder at the recommended pair.

    python benchmarks/scripts/bench_mappers.py --pair qwen    # qwen2.5-coder 0.5b -> 1.5b (same tokenizer)
    python benchmarks/scripts/bench_mappers.py --pair cross   # smollm2-135m -> qwen2.5-coder 0.5b

Texts (default corpus, disjoint slices): layer search on ``--search`` texts, fits on
``--train`` texts, every report-card figure on ``--eval`` held-out texts. Writes
``benchmarks/mappers_<pair>.json``, ``benchmarks/mappers_<pair>.md`` and PNGs under
``benchmarks/results/figures/``; mapper artifacts under ``$XFERLENS_HOME/runs/bench-mappers-<pair>``.
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from xferlens import chat_prompts, data, load_model  # noqa: E402
from xferlens.activations import align_sets, cache_activations, paired_activations, resid_post  # noqa: E402
from xferlens.evaluation import evaluate_mappers, layer_pair_scores, rank_agreement  # noqa: E402
from xferlens.mappers import fit_mapper  # noqa: E402
from xferlens.paths import home  # noqa: E402

PAIRS = {
    "qwen": ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"),
    "cross": ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"),
}
PAPER_KL = {"mapped": 7.86, "mean_ablation": 13.11}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", choices=PAIRS, default="qwen")
    ap.add_argument("--search", type=int, default=40)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--rank-train", type=int, default=150)
    ap.add_argument("--rank-eval", type=int, default=10)
    ap.add_argument("--eval", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timing[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_start:7.1f}s] {name}: {timing[name]} s", flush=True)

    src_name, tgt_name = PAIRS[args.pair]
    src = load_model(src_name, device="cpu", progress=False)
    tgt = load_model(tgt_name, device="cpu", progress=False)
    corpus = data.default_corpus(None).texts
    search = corpus[: args.search]
    train = corpus[1000 : 1000 + args.train]
    rank_train = train[: args.rank_train]
    held = corpus[5000 : 5000 + args.eval]
    rank_eval = held[: args.rank_eval]
    prompts = chat_prompts(tgt, data.harmless_prompts(n=50).texts[-args.prompts :])

    # 1. cheap layer-pair search over every layer of both models
    t0 = time.perf_counter()
    ls = layer_pair_scores(src, tgt, search, method="cka")
    lap("layer search (CKA, all pairs)", t0)
    rec = ls.recommend(3)
    (ls_best, lt_best, _), *_ = rec
    fig = ls.plot(mark=[(ls_best, lt_best)])
    fig.savefig(f"benchmarks/results/figures/layers_{args.pair}.png", dpi=110, bbox_inches="tight")

    # 2. does CKA rank pairs like the patched KL does? Fixed target layer, several source layers
    n_s = src.cfg.n_layers
    src_layers = sorted({round(f * (n_s - 1)) for f in (0.1, 0.3, 0.5, 0.7, 0.9)} | {ls_best})
    t0 = time.perf_counter()
    a = cache_activations(src, rank_train, src_layers, progress=False)
    b = cache_activations(tgt, rank_train, lt_best, progress=False)
    alignment = "position" if args.pair == "qwen" else "char_end"
    rank_mappers = {}
    for lay in src_layers:
        pairs = align_sets(a, b, resid_post(lay), resid_post(lt_best), alignment)
        m, _ = fit_mapper(pairs, "affine", progress=False)
        rank_mappers[f"L{lay}"] = m
    del a, b
    rank_reports = evaluate_mappers(rank_mappers, src, tgt, rank_eval, controls=False, max_length=128)
    lap("rank check (affine per source layer, patched KL)", t0)
    kl = {(lay, lt_best): rank_reports[f"L{lay}"].patching["mapped"]["kl"] for lay in src_layers}
    cka = {(lay, lt_best): ls.score(lay, lt_best) for lay in src_layers}
    agreement = rank_agreement(cka, kl)

    # 3. the three kinds at the recommended pair
    t0 = time.perf_counter()
    pairs = paired_activations(src, tgt, train, ls_best, lt_best)
    lap("cache training pairs", t0)
    mappers, histories = {}, {}
    for kind, cfg in [
        ("affine", None),
        ("orthogonal", None),
        ("autoencoder", None),
        ("autoencoder_paper", {"affine_skip": False, "lr": 1e-4, "batch_size": 16, "max_epochs": 3}),
    ]:
        t0 = time.perf_counter()
        m, h = fit_mapper(pairs, "autoencoder" if kind.startswith("autoencoder") else kind, cfg)
        lap(f"fit {kind}", t0)
        mappers[kind], histories[kind] = m, h
    t0 = time.perf_counter()
    reports = evaluate_mappers(mappers, src, tgt, held, prompts=prompts, max_new_tokens=args.max_new_tokens)
    lap("report cards", t0)
    out_dir = home() / "runs" / f"bench-mappers-{args.pair}"
    for kind, m in mappers.items():
        m.meta["report"] = reports[kind].summary()
        m.save(out_dir / kind)
        fig = reports[kind].plot()
        fig.savefig(f"benchmarks/results/figures/report_{args.pair}_{kind}.png", dpi=100, bbox_inches="tight")

    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "src": src_name,
        "tgt": tgt_name,
        "texts": {
            "search": args.search,
            "train": args.train,
            "eval": args.eval,
            "rank_train": args.rank_train,
            "rank_eval": args.rank_eval,
        },
        "train_rows": len(pairs),
        "coverage": pairs.coverage,
        "layer_search": {
            "method": ls.method,
            "rows": ls.n_rows,
            "recommended": rec,
            "scores": ls.scores.round(4).tolist(),
            "src_layers": ls.src_layers,
            "tgt_layers": ls.tgt_layers,
        },
        "rank_check": {
            "cka": {str(k): v for k, v in cka.items()},
            "patched_kl": {str(k): v for k, v in kl.items()},
            "spearman_rho": agreement.rho,
            "p_value": agreement.p_value,
        },
        "reports": {k: r.to_dict() for k, r in reports.items()},
        "histories": {k: {kk: vv for kk, vv in h.items() if kk != "records"} for k, h in histories.items()},
        "ae_curve": {k: h.get("records") for k, h in histories.items() if "records" in h},
        "seconds": timing,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(f"benchmarks/results/mappers_{args.pair}.json").write_text(
        json.dumps(result, indent=1, default=float)
    )
    lines = [
        f"# {src_name} -> {tgt_name}",
        "",
        f"recommended pairs (CKA, target depth 25-75 %): {rec}",
        f"Spearman rho(CKA, -patched KL) over source layers {src_layers} at target layer {lt_best}: "
        f"{agreement.rho:.2f} (p={agreement.p_value:.2g})",
        "",
    ]
    lines += [reports[k].to_markdown() + "\n" for k in reports]
    Path(f"benchmarks/results/mappers_{args.pair}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(json.dumps(timing))


if __name__ == "__main__":
    main()
