"""llama.cpp steers like the HookedTransformer: the whole chain on the paper's pair.

A refusal vector is found in Qwen2.5-Coder-0.5B (difference of means at L10), carried
into Qwen2.5-Coder-1.5B (L12) by an affine map fitted on the last prompt token of
disjoint instructions (the recipe of RESULTS's "shuffled" steering run, same prompts),
exported with ``SteeringVector.to_gguf`` and loaded into llama.cpp (llama-cpp-python)
running the zoo's own GGUF of the 1.5B (Q4_K/Q6_K weights) and, with ``--f32``, a float32
copy of it (the weights the HookedTransformer loads, so raw values can be compared too).

On held-out harmless prompts, under no vector and the vector at each alpha, both runtimes
give xferlens's continuous refusal score (log-odds that the reply opens like a refusal,
``xferlens.evaluation.score``) and the next-token distribution; the per-prompt *shifts*
(steered minus unsteered) are compared. As a check of the layer mapping, the
HookedTransformer also runs the same direction one block earlier and one later: llama.cpp
must match the block the file names, not its neighbours. Judged refusal rates (greedy,
``is_refusal``) come from llama.cpp on the quantized GGUF and, with ``--hooked-generate``,
from the HookedTransformer.

    python benchmarks/scripts/bench_llamacpp.py --f32 --hooked-generate

Needs ``llama-cpp-python`` (``pip install llama-cpp-python``; it compiles llama.cpp) and
the zoo models (pulled on first use; the GGUF is downloaded again, as ``xferlens pull``
keeps only the converted folder, into ``$XFERLENS_HOME/gguf``).
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/scripts/: bench_steering

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # llama.cpp's OpenMP threads on a shared CPU

from bench_steering import draw_prompts  # noqa: E402

from xferlens import chat_prompts, load_model  # noqa: E402
from xferlens.activations import paired_activations  # noqa: E402
from xferlens.activations.tokens import tokenize  # noqa: E402
from xferlens.evaluation import is_refusal, wilson  # noqa: E402
from xferlens.evaluation.score import resolve_openings, score_conditions  # noqa: E402
from xferlens.interop import from_gguf, read_control_vector  # noqa: E402
from xferlens.interop.llama_cpp import (  # noqa: E402
    dequantized_gguf,
    greedy,
    opening_log_odds,
    set_control_vector,
    zoo_gguf,
)
from xferlens.mappers import fit_mapper  # noqa: E402
from xferlens.paths import home  # noqa: E402
from xferlens.steering import SteeringVector, diff_of_means, generate, steer, transfer  # noqa: E402

SRC, TGT = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
OUT = Path(__file__).resolve().parents[1] / "results"


def corr(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else float("nan")
    return {
        "pearson": float(stats.pearsonr(x, y)[0]),
        "spearman": float(stats.spearmanr(x, y)[0]),
        "slope": slope,  # y on x
        "same_sign": float(np.mean(np.sign(x) == np.sign(y))),
    }


def top_union(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    return np.union1d(np.argsort(-a)[:k], np.argsort(-b)[:k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=64, help="prompts per set for the vectors")
    ap.add_argument("--eval", type=int, default=50, help="held-out harmless prompts")
    ap.add_argument("--fit-prompts", type=int, default=300, help="instructions per set for the map")
    ap.add_argument("--src-layer", type=int, default=10)
    ap.add_argument("--tgt-layer", type=int, default=12)
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument(
        "--vector",
        choices=["transferred", "native"],
        default="transferred",
        help="export the transferred vector (default) or the 1.5B's own",
    )
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--f32", action="store_true", help="also run a float32 copy of the GGUF (6 GB)")
    ap.add_argument(
        "--hooked-generate", action="store_true", help="judged rates in the HookedTransformer too"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="qwen", help="outputs: benchmarks/results/llamacpp_{tag}.json / .md")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_start:7.1f}s] {name}: {seconds[name]} s", flush=True)

    # ---------------------------------------------------------------- the vector
    t0 = time.perf_counter()
    draw = argparse.Namespace(
        train=args.train,
        eval=args.eval,
        reference_train=0,
        draw="shuffled",
        fit_texts=0,
        fit_prompts=args.fit_prompts,
    )
    h_tr, s_tr, _, _, _, s_ev, fit_harmful, fit_harmless, _ = draw_prompts(draw)
    tgt = load_model(TGT, device="cpu", progress=False)
    v_native = diff_of_means(tgt, chat_prompts(tgt, h_tr), chat_prompts(tgt, s_tr), hooks=args.tgt_layer)
    record: dict = {"args": vars(args), "src": SRC, "tgt": TGT}
    if args.vector == "transferred":
        src = load_model(SRC, device="cpu", progress=False)
        v_src = diff_of_means(src, chat_prompts(src, h_tr), chat_prompts(src, s_tr), hooks=args.src_layer)
        pairs = paired_activations(
            src,
            tgt,
            chat_prompts(src, fit_harmful + fit_harmless),
            args.src_layer,
            args.tgt_layer,
            positions="last",
            progress=False,
        )
        mapper, _ = fit_mapper(pairs, "affine", progress=False)
        vec = transfer(v_src, mapper)
        del src, pairs
        record["cosine_transferred_native"] = float(
            torch.nn.functional.cosine_similarity(vec.direction(), v_native.direction(), dim=0)
        )
    else:
        vec = v_native
    record["vector"] = {
        "kind": args.vector,
        "hook": vec.hook,
        "norm": vec.norm(),
        "relative_norm": vec.relative_norm(),
    }
    lap("vector", t0)

    # ---------------------------------------------------------------- export
    t0 = time.perf_counter()
    folder = home() / "runs" / f"bench-llamacpp-{args.tag}"
    cvec = vec.to_gguf(folder / f"refusal-{args.vector}.gguf", tgt)
    meta, dirs = read_control_vector(cvec)
    back = from_gguf(cvec, tgt)
    assert torch.equal(back.direction().cpu(), vec.direction().cpu()), "GGUF round trip is not exact"
    record["control_vector"] = {
        "file": str(cvec),
        "bytes": cvec.stat().st_size,
        "tensors": {f"direction.{n}": list(a.shape) for n, a in dirs.items()},
        "model_hint": meta["controlvector.model_hint"],
        "round_trip_exact": True,
    }
    models = {"Q4_K (zoo GGUF)": zoo_gguf(TGT, progress=False)}
    if args.f32:
        models["float32 (de-quantized copy)"] = dequantized_gguf(models["Q4_K (zoo GGUF)"])
    lap("export + GGUF files", t0)

    # ---------------------------------------------------------------- the HookedTransformer
    t0 = time.perf_counter()
    prompts = chat_prompts(tgt, s_ev)
    ids = tokenize(tgt, prompts, truncate=False).ids
    paths = resolve_openings("refusal").token_paths(tgt)
    d = vec.direction()
    layer = args.tgt_layer
    neighbours = {
        f"L{lyr}": SteeringVector({f"blocks.{lyr}.hook_resid_post": d}, vec.model, {"method": "moved"})
        for lyr in (layer - 1, layer + 1)
    }
    conds = [("none", None, 0.0)] + [(f"a{a:g}", vec, a) for a in args.alphas]
    conds += [(f"{n} a{args.alphas[0]:g}", v, args.alphas[0]) for n, v in neighbours.items()]
    ht_scores = score_conditions(
        tgt, prompts, "refusal", [(v, a) for _, v, a in conds], progress=False
    ).numpy()
    ht = {name: {"score": ht_scores[i]} for i, (name, _, _) in enumerate(conds)}
    lap("HookedTransformer scores", t0)
    t0 = time.perf_counter()
    for name, v, a in conds[: 1 + len(args.alphas)]:  # next-token distributions: the file's block
        rows = []
        for tok in ids:
            t = torch.tensor([tok])
            with torch.no_grad():
                if v is None:
                    logits = tgt(t)[0, -1]
                else:
                    with steer(tgt, v, a):
                        logits = tgt(t)[0, -1]
            rows.append(logits.double().log_softmax(-1).numpy())
        ht[name]["logprobs"] = np.stack(rows)
    lap("HookedTransformer next-token log-probs", t0)

    judged: dict = {}

    def rate(texts: list[str]) -> dict:
        k = sum(is_refusal(t) for t in texts)
        return {"refusals": k, "n": len(texts), "rate": k / len(texts), "ci95": wilson(k, len(texts))}

    if args.hooked_generate:
        t0 = time.perf_counter()
        judged["HookedTransformer"] = {}
        for name, v, a in conds[: 1 + len(args.alphas)]:
            outs = generate(
                tgt,
                prompts,
                max_new_tokens=args.max_new_tokens,
                vector=v,
                alpha=a,
                batch_size=10,
                progress=False,
            )
            judged["HookedTransformer"][name] = {**rate(outs), "examples": outs[:3]}
        lap("HookedTransformer generations", t0)
    del tgt
    gc.collect()

    # ---------------------------------------------------------------- llama.cpp
    from llama_cpp import Llama

    stop = {151645, 151643}  # <|im_end|>, <|endoftext|>
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(home() / "hf" / TGT)
    results: dict = {}
    for label, path in models.items():
        t0 = time.perf_counter()
        n_ctx = max(len(x) for x in ids) + args.max_new_tokens + 8
        llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=args.threads,
            logits_all=True,
            verbose=False,
        )
        lc: dict = {}
        for name, _, a in conds[: 1 + len(args.alphas)]:
            set_control_vector(llm, None if a == 0.0 else [(cvec, a)])
            sc, lp, outs = [], [], []
            for tok_ids in ids:
                s, base = opening_log_odds(llm, tok_ids, paths)
                sc.append(s)
                lp.append(base)
                if label.startswith("Q4_K"):
                    outs.append(tok.decode(greedy(llm, tok_ids, args.max_new_tokens, stop)))
            lc[name] = {"score": np.array(sc), "logprobs": np.stack(lp)}
            if outs:
                judged.setdefault(f"llama.cpp {label}", {})[name] = {**rate(outs), "examples": outs[:3]}
        del llm
        results[label] = lc
        lap(f"llama.cpp {label}", t0)

    # ---------------------------------------------------------------- compare
    cmp: dict = {}
    for label, lc in results.items():
        c: dict = {"alphas": {}}
        for a in args.alphas:
            name = f"a{a:g}"
            d_lc = lc[name]["score"] - lc["none"]["score"]
            d_ht = ht[name]["score"] - ht["none"]["score"]
            row = {
                "mean_shift_llama_cpp": float(d_lc.mean()),
                "mean_shift_hooked": float(d_ht.mean()),
                "shift_agreement": corr(d_ht, d_lc),
                "raw_score_mean_abs_diff": float(np.abs(lc[name]["score"] - ht[name]["score"]).mean()),
            }
            # the next-token distribution: per prompt, the correlation of the shifts of the
            # log-probabilities of the tokens either runtime ranks in its top 50 (steered)
            per_prompt = []
            for i in range(len(ids)):
                sel = top_union(ht[name]["logprobs"][i], lc[name]["logprobs"][i], 50)
                dl = lc[name]["logprobs"][i, sel] - lc["none"]["logprobs"][i, sel]
                dh = ht[name]["logprobs"][i, sel] - ht["none"]["logprobs"][i, sel]
                per_prompt.append(float(np.corrcoef(dh, dl)[0, 1]))
            row["next_token_shift_corr_median"] = float(np.median(per_prompt))
            row["next_token_shift_corr_min"] = float(np.min(per_prompt))
            if a == args.alphas[0]:  # the layer-mapping check: the neighbouring blocks
                for n in neighbours:
                    key = f"{n} a{a:g}"
                    d_nb = ht[key]["score"] - ht["none"]["score"]
                    row[f"hooked_at_{n}"] = {
                        "mean_shift_hooked": float(d_nb.mean()),
                        "shift_agreement": corr(d_nb, d_lc),
                        "raw_score_mean_abs_diff": float(np.abs(lc[name]["score"] - ht[key]["score"]).mean()),
                    }
            c["alphas"][name] = row
        c["raw_unsteered_score_mean_abs_diff"] = float(
            np.abs(lc["none"]["score"] - ht["none"]["score"]).mean()
        )
        top = [
            float(
                np.abs(lc["none"]["logprobs"][i] - ht["none"]["logprobs"][i])[
                    top_union(ht["none"]["logprobs"][i], lc["none"]["logprobs"][i], 10)
                ].max()
            )
            for i in range(len(ids))
        ]
        c["raw_unsteered_top10_logprob_max_abs_diff_median"] = float(np.median(top))
        cmp[label] = c
    record.update(
        {
            "prompts": len(ids),
            "hooked_mean_score": {k: float(v["score"].mean()) for k, v in ht.items()},
            "llama_cpp_mean_score": {
                lab: {k: float(v["score"].mean()) for k, v in lc.items()} for lab, lc in results.items()
            },
            "comparison": cmp,
            "judged": judged,
            "seconds": seconds,
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "llama_cpp_python": __import__("llama_cpp").__version__,
        }
    )
    out = OUT / f"llamacpp_{args.tag}.json"
    out.write_text(json.dumps(record, indent=2, default=float))
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out}")


def markdown(r: dict) -> str:
    a = r["args"]
    lines = [
        f"# llama.cpp vs HookedTransformer: the {r['vector']['kind']} refusal vector in {r['tgt']}",
        "",
        f"Vector at {r['vector']['hook']} (norm {r['vector']['norm']:.2f}, "
        f"{r['vector']['relative_norm']:.2f}x the activation norm)"
        + (
            f", cosine to the 1.5B's own {r['cosine_transferred_native']:.3f}"
            if "cosine_transferred_native" in r
            else ""
        )
        + f"; {r['prompts']} held-out harmless prompts; alphas {a['alphas']}.",
        "",
        "| runtime | alpha | mean score shift (llama.cpp / HT) | Pearson r of per-prompt shifts | Spearman | "
        "slope | next-token shift r (median / min) | mean abs score diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, c in r["comparison"].items():
        for name, row in c["alphas"].items():
            s = row["shift_agreement"]
            lines.append(
                f"| {label} | {name[1:]} | "
                f"{row['mean_shift_llama_cpp']:.2f} / {row['mean_shift_hooked']:.2f} | "
                f"{s['pearson']:.3f} | {s['spearman']:.3f} | {s['slope']:.2f} | "
                f"{row['next_token_shift_corr_median']:.3f} / {row['next_token_shift_corr_min']:.3f} | "
                f"{row['raw_score_mean_abs_diff']:.3f} |"
            )
    lines += [
        "",
        "Layer check (alpha {:g}): llama.cpp's shifts against the HookedTransformer's with the "
        "same direction at each block:".format(a["alphas"][0]),
        "",
        "| runtime | HT block | HT mean shift | Pearson r | mean abs score diff |",
        "|---|---|---|---|---|",
    ]
    for label, c in r["comparison"].items():
        row = next(iter(c["alphas"].values()))
        lines.append(
            f"| {label} | L{a['tgt_layer']} (the file's) | {row['mean_shift_hooked']:.2f} | "
            f"{row['shift_agreement']['pearson']:.3f} | {row['raw_score_mean_abs_diff']:.3f} |"
        )
        for k, v in row.items():
            if k.startswith("hooked_at_"):
                lines.append(
                    f"| {label} | {k.removeprefix('hooked_at_')} | {v['mean_shift_hooked']:.2f} | "
                    f"{v['shift_agreement']['pearson']:.3f} | {v['raw_score_mean_abs_diff']:.3f} |"
                )
    lines += [
        "",
        "Unsteered: mean abs score difference "
        + ", ".join(
            f"{lab} {c['raw_unsteered_score_mean_abs_diff']:.3f} "
            "(top-10 next-token log-prob max diff, median "
            f"{c['raw_unsteered_top10_logprob_max_abs_diff_median']:.3f})"
            for lab, c in r["comparison"].items()
        ),
        "",
        f"Judged refusal (greedy, {a['max_new_tokens']} tokens, is_refusal; 95 % Wilson):",
        "",
        "| runtime | condition | refusal | 95 % CI |",
        "|---|---|---|---|",
    ]
    for rt, conds in r["judged"].items():
        for name, j in conds.items():
            lines.append(
                f"| {rt} | {name} | {j['refusals']}/{j['n']} ({j['rate']:.0%}) | "
                f"{j['ci95'][0]:.0%}–{j['ci95'][1]:.0%} |"
            )
    lines += ["", f"Total {r['total_seconds']:.0f} s; llama-cpp-python {r['llama_cpp_python']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
