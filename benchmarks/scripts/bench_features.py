"""SAE features across models (issue 7): do a source SAE's features land on target SAE
features through the mapper, more often than through a random map?

    python benchmarks/scripts/bench_features.py                 # the Qwen pair, then the cross pair

Per pair (same layers as the steering benchmark): paired content-token activations of
``--texts`` default-corpus texts (SAEs and the affine map are fitted on them) and of
``--heldout`` other texts (liveness, matching and activation agreement are measured on
them only). One TopK SAE per (model, hook), trained once with sae-lens and reused: the
Qwen-0.5B L10 SAE is the source of the Qwen pair and the target of the cross pair.
Writes ``benchmarks/features_<pairs>.json`` and ``.md``, histograms under
``benchmarks/results/figures/`` and the SAEs under ``$XFERLENS_HOME/runs/bench-features``.
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from xferlens import data, load_model  # noqa: E402
from xferlens.activations import paired_activations, positions, resid_post  # noqa: E402
from xferlens.features import feature_transfer, train_sae  # noqa: E402
from xferlens.mappers import fit_mapper  # noqa: E402
from xferlens.paths import home  # noqa: E402

PAIRS = {
    "qwen": ("qwen2.5-coder-0.5b-instruct", 10, "qwen2.5-coder-1.5b-instruct", 12),
    "cross": ("smollm2-135m-instruct", 15, "qwen2.5-coder-0.5b-instruct", 10),
    # Gemma on one side (issue 22): its middle layer (9 of 18), like SmolLM2 L15 of 30
    "smollm2_gemma": ("smollm2-135m-instruct", 15, "gemma-3-270m", 9),
    "gemma_qwen": ("gemma-3-270m", 9, "qwen2.5-coder-0.5b-instruct", 10),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", nargs="+", choices=PAIRS, default=["qwen", "cross"])
    ap.add_argument("--texts", type=int, default=160)
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--expansion", type=int, default=2)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus = data.default_corpus(None).texts
    train_texts = corpus[3000 : 3000 + args.texts]
    held_texts = corpus[8000 : 8000 + args.heldout]
    out_dir = home() / "runs" / "bench-features"
    saes: dict[tuple[str, int], object] = {}
    results = {"when": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "pairs": {}}
    md = ["# SAE feature transfer", ""]
    t_all = time.perf_counter()
    for pair in args.pairs:
        s_name, s_layer, t_name, t_layer = PAIRS[pair]
        t0 = time.perf_counter()
        src = load_model(s_name, device="cpu", progress=False)
        tgt = load_model(t_name, device="cpu", progress=False)
        kw = {"positions": positions.content(), "max_length": args.max_length, "progress": False}
        train = paired_activations(src, tgt, train_texts, s_layer, t_layer, **kw)
        held = paired_activations(src, tgt, held_texts, s_layer, t_layer, **kw)
        t_cache = time.perf_counter() - t0
        print(f"[{pair}] {len(train)} training / {len(held)} held-out pairs in {t_cache:.0f} s", flush=True)
        sae_info = {}
        for role, model, layer, rows in (("src", src, s_layer, train.src), ("tgt", tgt, t_layer, train.tgt)):
            key = (model.cfg.model_name, layer)
            if key not in saes:
                sae = train_sae(
                    rows,
                    hook=resid_post(layer),
                    model=model,
                    expansion=args.expansion,
                    k=args.k,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    progress=False,
                )
                sae.save(out_dir / f"{model.cfg.model_name}-L{layer}")
                saes[key] = sae
                print(f"[{pair}] {sae}  ({sae.metrics['seconds']:.0f} s)", flush=True)
            sae_info[role] = {"model": key[0], "layer": layer, **saes[key].metrics, **saes[key].recipe}
        mapper, hist = fit_mapper(train, "affine", progress=False)
        ft = feature_transfer(
            saes[(src.cfg.model_name, s_layer)],
            saes[(tgt.cfg.model_name, t_layer)],
            mapper,
            held,
            threshold=args.threshold,
        )
        fig = ft.plot()
        fig.axes[0].set_title(f"{s_name} L{s_layer} -> {t_name} L{t_layer}", fontsize=9)
        fig.savefig(f"benchmarks/results/figures/features_{pair}.png", dpi=110, bbox_inches="tight")
        best = min(hist["candidates"], key=lambda r: r["val_mse"])
        results["pairs"][pair] = {
            "src": f"{s_name} L{s_layer}",
            "tgt": f"{t_name} L{t_layer}",
            "pairs_train": len(train),
            "pairs_heldout": len(held),
            "coverage_heldout": held.coverage,
            "cache_seconds": t_cache,
            "mapper": {"kind": "affine", "ridge": hist["ridge"], "val_fvu": best["val_fvu"]},
            "saes": sae_info,
            "live_source_features": len(ft.features),
            "source_features": ft.n_source_features,
            "table": ft.table().to_dict(),
            "rate": ft.rate(),
            "rate_random": ft.rate(control=True),
            "median_cosine": float(ft.cosine.median()),
            "median_cosine_random": float(ft.random_cosine.median()),
        }
        r = results["pairs"][pair]
        md += [
            f"## {s_name} L{s_layer} -> {t_name} L{t_layer}",
            "",
            f"{len(train)} training pairs, {len(held)} held-out pairs; affine map validation FVU "
            f"{best['val_fvu']:.3f}. SAEs (TopK k={args.k}, sae-lens): "
            + "; ".join(
                f"{v['model']} L{v['layer']}: {v['d_sae']} features, held-out FVU {v['fvu']:.3f}, "
                f"dead {v['dead']:.1%}, {v['seconds']:.0f} s"
                for v in sae_info.values()
            ),
            "",
            ft.to_markdown(),
            "",
            f"Headline (decoder cosine >= {args.threshold:g}): {r['rate']:.1%} through the mapper vs "
            f"{r['rate_random']:.1%} through a random map; median best cosine {r['median_cosine']:.3f} vs "
            f"{r['median_cosine_random']:.3f}.",
            "",
        ]
        del src, tgt
    results["total_seconds"] = time.perf_counter() - t_all
    tag = "_".join(args.pairs)
    Path(f"benchmarks/results/features_{tag}.json").write_text(json.dumps(results, indent=1, default=float))
    Path(f"benchmarks/results/features_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
