"""Refusal steering transferred from Qwen2.5-Coder 0.5B to 1.5B (issue 5), with controls.

    python benchmarks/scripts/bench_steering.py            # the issue's table (>= 50 eval prompts each)
    python benchmarks/scripts/bench_steering.py --eval 8 --alphas 1   # a quick look

1. Refusal vectors by difference of means (harmful - harmless, last prompt token) from
   disjoint *training* prompts: the source's at ``--src-layer``, the target's own at
   ``--tgt-layer``.
2. An affine map src -> tgt at those layers, fitted on general text plus the training
   prompts (content tokens only: no system prefix, no attention-sink first token), ridge
   chosen on held-out text (``--fit-set prompts --fit-positions last``: the last prompt
   token of instructions disjoint from every other set instead). The source vector is
   carried through it, raw and with its norm recalibrated. ``--reference-train N`` also
   builds the target's own vector from N other prompts, the yardstick for transferred /
   native; ``--draw shuffled`` draws every harmful set at random from the whole
   HarmBench + Do-Not-Answer mixture (the default takes each split half in dataset order).
   ``--native-scales 0.95 0.9`` adds the native vector shortened by those factors and
   ``--dose-matched`` the transferred one at native's length along native (a diagnostic
   that uses the target's own vector): what a shorter dose, or the direction alone, costs.
3. On *evaluation* prompts: adding each vector to harmless prompts at every alpha of the
   sweep (refusal rate should rise), and ablating it at every layer on harmful prompts
   (refusal rate should fall; ``--no-ablate`` skips it); always beside no steering and a
   random vector of the native vector's norm; perplexity of each condition on general text.
4. Throughput of batched steered generation against HF ``generate`` on the same prompts.

Writes ``benchmarks/steering_{tag}.json`` / ``.md``, figures, and every completion to
``benchmarks/steering_completions_{tag}.jsonl`` (for checking the refusal judge by hand).
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from xferlens import chat_prompts, data, load_model, zoo  # noqa: E402
from xferlens.activations import paired_activations, positions  # noqa: E402
from xferlens.evaluation import evaluate_steering  # noqa: E402
from xferlens.mappers import fit_mapper  # noqa: E402
from xferlens.paths import home  # noqa: E402
from xferlens.steering import diff_of_means, generate, transfer  # noqa: E402

SRC, TGT = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
REF = "native (other prompts)"
DOSE = "transferred, native's length along native (diagnostic)"


def hf_throughput(name: str, prompts: list[str], max_new_tokens: int, batch_size: int) -> dict:
    """Batched greedy generation: xferlens (TransformerLens, KV cache, a zero steering hook)
    against HF ``generate`` on the same prompts, same batch size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = zoo.hf_dir(name)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    new_hf = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(
                prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            out = hf.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
            new = out[:, enc["input_ids"].shape[1] :]
            new_hf += int((~torch.isin(new, torch.tensor([tok.pad_token_id, tok.eos_token_id]))).sum())
    t_hf = time.perf_counter() - t0
    del hf
    model = load_model(name, device="cpu", progress=False)
    v = diff_of_means(model, prompts[:4], prompts[4:8], hooks=model.cfg.n_layers // 2)
    t0 = time.perf_counter()
    outs = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        vector=v,
        alpha=0.0,
        progress=False,
    )
    t_xl = time.perf_counter() - t0
    new_xl = sum(len(model.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)
    return {
        "model": name,
        "prompts": len(prompts),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "hf_seconds": t_hf,
        "hf_new_tokens": new_hf,
        "hf_tok_per_s": new_hf / t_hf,
        "xferlens_seconds": t_xl,
        "xferlens_new_tokens": new_xl,
        "xferlens_tok_per_s": new_xl / t_xl,
        "ratio": (new_xl / t_xl) / (new_hf / t_hf),
    }


def draw_prompts(args) -> tuple[list[str], ...]:
    """The run's prompt sets from ``--train/--reference-train/--eval/--fit-*`` and ``--draw``:
    ``(h_tr, s_tr, h_ref, s_ref, h_ev, s_ev, fit_harmful, fit_harmless, fit_texts)`` — the
    vectors', the reference vector's and the evaluation's harmful (h) / harmless (s) prompts,
    the map's instructions for ``--fit-set prompts`` and its general texts for ``corpus``.
    Every set is disjoint from the others (asserted)."""
    n_tr, n_ev = args.train, args.eval
    harmful = data.harmful_prompts()
    harmful_train, harmful_eval = harmful.split(0.5, seed=0)
    if args.draw == "shuffled":
        harmful_train, harmful_eval = harmful_train.shuffled(1), harmful_eval.shuffled(2)
    n_ref = args.reference_train
    harmless = data.harmless_prompts(n=4 * (n_tr + n_ref + n_ev), seed=1)
    harmless_train, harmless_eval = harmless.split(0.5, seed=0)
    h_tr, h_ev = list(harmful_train)[:n_tr], list(harmful_eval)[:n_ev]
    s_tr, s_ev = list(harmless_train)[:n_tr], list(harmless_eval)[:n_ev]
    assert not (set(h_tr) & set(h_ev)) and not (set(s_tr) & set(s_ev))
    h_ref = list(harmful_train)[n_tr : n_tr + n_ref]
    s_ref = list(harmless_train)[n_tr : n_tr + n_ref]
    assert len(h_ref) == len(s_ref) == n_ref, "not enough training prompts for --reference-train"
    held_out = set(h_ev) | set(s_ev)
    corpus = [t for t in data.default_corpus(None).texts[2000:] if t not in held_out]
    fit_texts = corpus[: args.fit_texts]
    # instructions for --fit-set prompts: harmful ones from the training half past the
    # vectors' prompts, harmless ones from a second draw minus every harmless prompt above
    used = held_out | set(h_tr) | set(s_tr) | set(h_ref) | set(s_ref)
    fit_harmful = [p for p in list(harmful_train)[n_tr + n_ref :] if p not in used][: args.fit_prompts]
    drawn = used | set(harmless)
    pool = data.harmless_prompts(n=None, seed=2)
    fit_harmless = [p for p in pool if p not in drawn][: args.fit_prompts]
    assert not set(fit_harmful + fit_harmless) & drawn
    return h_tr, s_tr, h_ref, s_ref, h_ev, s_ev, fit_harmful, fit_harmless, fit_texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=64, help="prompts per set for building vectors")
    ap.add_argument("--eval", type=int, default=50, help="prompts per set for evaluation")
    ap.add_argument("--fit-texts", type=int, default=200, help="general texts for the mapper fit")
    ap.add_argument(
        "--fit-set",
        choices=["corpus", "prompts"],
        default="corpus",
        help="corpus: --fit-texts general texts + the vectors' training prompts (the first runs); "
        "prompts: --fit-prompts harmful and harmless instructions disjoint from the training and "
        "evaluation prompts (the vectors' own prompts stay out of the fit)",
    )
    ap.add_argument("--fit-prompts", type=int, default=300, help="instructions per set for --fit-set prompts")
    ap.add_argument(
        "--fit-positions",
        choices=["content", "last"],
        default="content",
        help="content: every token after the system prefix; last: only the last prompt token, "
        "where the refusal vector is read and where it acts",
    )
    ap.add_argument(
        "--reference-train",
        type=int,
        default=0,
        help="also build the target's own vector a second time, from this many *other* training "
        "prompts per set (disjoint from the first vector's, the fit's and the evaluation's), and "
        "evaluate it as 'native (other prompts)': how far the native effect moves when only the "
        "prompt sample changes, the yardstick for the transferred/native ratio (0: skip)",
    )
    ap.add_argument(
        "--draw",
        choices=["ordered", "shuffled"],
        default="ordered",
        help="ordered: the first prompts of each half of the harmful split, which keeps the "
        "dataset's order (HarmBench's 200 behaviours, then Do-Not-Answer's questions), so the "
        "vectors come from HarmBench and the fit prompts mostly from Do-Not-Answer (the first "
        "runs); shuffled: each half shuffled first, so vectors, reference, fit and evaluation "
        "prompts are random draws from the same mixture",
    )
    ap.add_argument(
        "--native-scales",
        type=float,
        nargs="*",
        default=[],
        help="also add the target's own vector scaled by each factor (rows 'native x0.9' ...): "
        "how much of the native effect a vector of the right direction but a shorter length "
        "keeps at each alpha, the yardstick for a transferred vector that comes out short",
    )
    ap.add_argument(
        "--dose-matched",
        action="store_true",
        help="also add the transferred vector rescaled so its length along the native vector "
        "equals native's (a diagnostic that uses the target's own vector, not a transfer): "
        "what its direction alone is worth",
    )
    ap.add_argument("--no-ablate", action="store_true", help="skip the ablation table")
    ap.add_argument("--src-layer", type=int, default=10)
    ap.add_argument("--tgt-layer", type=int, default=12)
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--ppl-texts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument(
        "--thr-prompts", type=int, default=32, help="prompts for the throughput comparison (0: skip)"
    )
    ap.add_argument("--tag", default="qwen", help="output names: benchmarks/steering_{tag}.json etc.")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timing[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_start:7.1f}s] {name}: {timing[name]} s", flush=True)

    t0 = time.perf_counter()
    src = load_model(SRC, device="cpu", progress=False)
    tgt = load_model(TGT, device="cpu", progress=False)
    lap("load models", t0)
    h_tr, s_tr, h_ref, s_ref, h_ev, s_ev, fit_harmful, fit_harmless, fit_texts = draw_prompts(args)
    ppl_texts = data.default_corpus(None).texts[6000 : 6000 + args.ppl_texts]

    def chat(model, xs):
        return chat_prompts(model, xs)

    # 1. vectors from training prompts
    t0 = time.perf_counter()
    v_src = diff_of_means(src, chat(src, h_tr), chat(src, s_tr), hooks=args.src_layer)
    v_native = diff_of_means(tgt, chat(tgt, h_tr), chat(tgt, s_tr), hooks=args.tgt_layer)
    v_ref = (
        diff_of_means(tgt, chat(tgt, h_ref), chat(tgt, s_ref), hooks=args.tgt_layer)
        if args.reference_train
        else None
    )
    lap("build vectors", t0)

    # 2. the map, and the transferred vectors
    t0 = time.perf_counter()
    if args.fit_set == "corpus":
        map_texts = fit_texts + chat(src, h_tr) + chat(src, s_tr)
    else:
        map_texts = chat(src, fit_harmful + fit_harmless)
    pairs = paired_activations(
        src,
        tgt,
        map_texts,
        args.src_layer,
        args.tgt_layer,
        positions=positions.content() if args.fit_positions == "content" else "last",
        progress=False,
    )
    fit_desc = (
        f"{len(fit_texts)} general texts + the vectors' training prompts"
        if args.fit_set == "corpus"
        else f"{len(fit_harmful)} harmful + {len(fit_harmless)} harmless instructions "
        "disjoint from the vectors' prompts"
    ) + (", content tokens" if args.fit_positions == "content" else ", last prompt token only")
    lap("cache mapper pairs", t0)
    t0 = time.perf_counter()
    mapper, hist = fit_mapper(pairs, "affine", progress=False)
    lap("fit affine", t0)
    mapper.save(home() / "runs" / f"bench-steering-{args.tag}" / "mapper")
    v_tr = transfer(v_src, mapper)
    v_tr_rc = transfer(v_src, mapper, recalibrate=True)
    v_tr_rc.save(home() / "runs" / f"bench-steering-{args.tag}" / "transferred-recalibrated")

    def cos_to_native(v):
        return float(torch.nn.functional.cosine_similarity(v.direction(), v_native.direction(), dim=0))

    cos = cos_to_native(v_tr)
    cos_ref = cos_to_native(v_ref) if v_ref is not None else None
    vectors = {"native": v_native, "transferred": v_tr, "transferred (recalibrated)": v_tr_rc}
    if v_ref is not None:
        vectors[REF] = v_ref
    for f in args.native_scales:
        vectors[f"native x{f:g}"] = v_native.scaled(f)
    if args.dose_matched:
        u = v_native.direction() / v_native.norm()
        vectors[DOSE] = v_tr.scaled(v_native.norm() / float(v_tr.direction() @ u))
    val_best = min(hist["candidates"], key=lambda r: r["val_mse"])

    # 3. add on harmless prompts; ablate at every layer on harmful prompts
    t0 = time.perf_counter()
    evaluate = partial(
        evaluate_steering,
        tgt,
        judge="refusal",
        ppl_texts=ppl_texts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=False,
    )
    add = evaluate(chat(tgt, s_ev), vectors, alphas=args.alphas, mode="add")
    lap("add on harmless prompts", t0)
    ablate = None
    if not args.no_ablate:
        t0 = time.perf_counter()
        # ablation removes the unit direction: rescaled copies give the same row
        ablate = evaluate(
            chat(tgt, h_ev),
            {k: v for k, v in vectors.items() if k in ("native", "transferred", REF)},
            alphas=[1.0],
            mode="ablate",
            layers="all",
        )
        lap("ablate on harmful prompts", t0)
    for name, rep in (("add", add), ("ablate", ablate)):
        if rep is not None:
            fig = rep.plot()
            fig.savefig(
                f"benchmarks/results/figures/steering_{name}_{args.tag}.png", dpi=110, bbox_inches="tight"
            )

    # 4. throughput
    thr = None
    if args.thr_prompts:
        t0 = time.perf_counter()
        del src, tgt
        thr = hf_throughput(
            SRC, chat_prompts(load_model(SRC, device="cpu", progress=False), s_ev[: args.thr_prompts]), 24, 16
        )
        lap("throughput vs HF generate", t0)

    with open(f"benchmarks/results/steering_completions_{args.tag}.jsonl", "w") as f:
        for mode, rep, prompts in (("add", add, s_ev), ("ablate", ablate, h_ev)):
            for r in rep.rows if rep is not None else []:
                for p, c, h in zip(prompts, r["completions"], r["hits"], strict=True):
                    f.write(
                        json.dumps(
                            {
                                "mode": mode,
                                "label": r["label"],
                                "alpha": r["alpha"],
                                "prompt": p,
                                "completion": c,
                                "judge": h,
                            }
                        )
                        + "\n"
                    )

    def slim(rep):
        if rep is None:
            return None
        return {
            "meta": rep.meta,
            "rows": [{k: v for k, v in r.items() if k not in ("completions", "hits")} for r in rep.rows],
        }

    def compared(rep, skip=()):
        """Every evaluated condition but the baselines, in the report's order."""
        return [k for k in dict.fromkeys(r["label"] for r in rep.rows) if k not in ("none", "native", *skip)]

    ratios = {k: add.ratio(k, "native") for k in compared(add, skip=("random",))}
    removal = {}
    if ablate is not None:
        none_ab = ablate.rate("none")
        removal = {
            k: (none_ab - ablate.rate(k, 1.0)) / (none_ab - ablate.rate("native", 1.0))
            if none_ab > ablate.rate("native", 1.0)
            else float("nan")
            for k in compared(ablate)
        }
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "src": f"{SRC} L{args.src_layer}",
        "tgt": f"{TGT} L{args.tgt_layer}",
        "args": vars(args),
        "vectors": {
            k: {"norm": v.norm(), "relative_norm": v.relative_norm(), "recipe_method": v.recipe.get("method")}
            for k, v in {"source": v_src, **vectors}.items()
        },
        "cosine_transferred_vs_native": cos,
        "cosine_native_other_prompts_vs_native": cos_ref,
        "mapper": {
            "fit": fit_desc,
            "rows": len(pairs),
            "ridge": hist["ridge"],
            "val_fvu": val_best["val_fvu"],
            "val_mse": val_best["val_mse"],
        },
        "add": slim(add),
        "ablate": slim(ablate),
        "add_ratio_to_native": ratios,
        "ablate_removal_relative_to_native": removal,
        "throughput": thr,
        "seconds": timing,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(f"benchmarks/results/steering_{args.tag}.json").write_text(
        json.dumps(result, indent=1, default=float)
    )
    lines = [
        f"# Refusal: {SRC} L{args.src_layer} -> {TGT} L{args.tgt_layer}",
        "",
        f"affine map fitted on {fit_desc}: {len(pairs)} rows, ridge {hist['ridge']:g}, "
        f"validation FVU {val_best['val_fvu']:.3f}; "
        f"cosine(transferred, native) = {cos:.3f}"
        + (f"; cosine({REF}, native) = {cos_ref:.3f}" if cos_ref is not None else ""),
        "",
        "## Adding the vector to harmless prompts (refusal rate; higher = steering works)",
        "",
        add.to_markdown(),
        "",
        "transferred / native refusal rate at each alpha: "
        + "; ".join(f"{k}: " + ", ".join(f"{a:g}: {r:.2f}" for a, r in v.items()) for k, v in ratios.items()),
    ]
    if ablate is not None:
        lines += [
            "",
            "## Ablating the direction at every layer on harmful prompts "
            "(refusal rate; lower = steering works)",
            "",
            ablate.to_markdown(),
            "",
            "refusal removed relative to the native vector: "
            + ", ".join(f"{k}: {v:.2f}" for k, v in removal.items()),
        ]
    if thr:
        lines += [
            "",
            f"Throughput ({thr['model']}, {thr['prompts']} prompts, batch {thr['batch_size']}, "
            f"{thr['max_new_tokens']} new tokens): xferlens steered {thr['xferlens_tok_per_s']:.1f} tok/s, "
            f"HF generate {thr['hf_tok_per_s']:.1f} tok/s, ratio {thr['ratio']:.2f}",
        ]
    Path(f"benchmarks/results/steering_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(timing))


if __name__ == "__main__":
    main()
