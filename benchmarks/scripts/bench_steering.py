"""What a refusal run of ``xferlens run`` cannot express (issue 5; a thin wrapper since issue 18).

    RUN=benchmarks/results/refusal_qwen
    xferlens run benchmarks/specs/refusal_qwen.yaml --out $RUN
    python benchmarks/scripts/bench_steering.py $RUN --native-scales 0.95 0.9 --dose-matched  # all three
    python benchmarks/scripts/bench_steering.py benchmarks/specs/refusal_qwen.yaml --out $RUN  # run it first
    python benchmarks/scripts/bench_steering.py $RUN --ablate-prompts 8 --thr-prompts 8        # a quick look

Takes a run folder (or a spec, whose folder -- ``--out``, default ``runs/<name>`` -- is run or
resumed first by ``run_experiment``) and adds, with the run's models and target vectors:

1. Ablation of each target vector's direction at every residual point on held-out *harmful*
   prompts (the harmful split's other half, minus every prompt set of the run), judged,
   beside none and a random direction, with perplexity on ``--ppl-texts`` general texts:
   refusal should fall. A rescaled copy of a direction already ablated is left out.
2. ``--native-scales`` (native shortened by factors) and ``--dose-matched`` (transferred
   rescaled to native's length along native: a diagnostic, not a transfer) scored like the
   run's vectors (same prompts, openings, alpha grid) and joined to the run's scores, so
   their native-equivalent doses read beside the run's (the unsteered scores are scored
   again, in the run's batches, and their largest difference from the run's is reported).
3. Throughput of batched steered generation (alpha 0) against HF ``generate``.

Writes ``bench_steering.{json,md}`` into the run folder, leaving the run's files as they were.
Older tables in RESULTS and docs/notes come from the previous script, which rebuilt the whole
pipeline from flags the spec now holds: ``git show ee2c78c:benchmarks/scripts/bench_steering.py``.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from xferlens import data, load_model, zoo
from xferlens.evaluation import evaluate_steering
from xferlens.evaluation.dose import DoseResponse
from xferlens.evaluation.score import dose_response
from xferlens.experiment import load_spec, run_experiment
from xferlens.experiment import run as r
from xferlens.experiment.report import layer_label
from xferlens.steering import generate, load_steering_vector

DOSE = "transferred, native's length along native (diagnostic)"


def hf_throughput(name: str, vector: Path, prompts: list[str], n_new: int = 24, bs: int = 16) -> dict:
    """Batched greedy generation, float32 on CPU: xferlens (TransformerLens, KV cache, the
    run's source vector hooked in at alpha 0) against HF ``generate`` on the same prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(name) if Path(name).is_dir() else zoo.hf_dir(name)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    new_hf, stop = 0, torch.tensor([tok.pad_token_id, tok.eos_token_id])
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), bs):
            enc = tok(prompts[i : i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
            out = hf.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
            new_hf += int((~torch.isin(out[:, enc["input_ids"].shape[1] :], stop)).sum())
    t_hf = time.perf_counter() - t0
    del hf
    model = load_model(name, device="cpu", progress=False)
    v = load_steering_vector(vector, model)
    t0 = time.perf_counter()
    outs = generate(model, prompts, max_new_tokens=n_new, batch_size=bs, vector=v, alpha=0.0, progress=False)
    t_xl = time.perf_counter() - t0
    new_xl = sum(len(model.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)
    hf_rate, xl_rate = new_hf / t_hf, new_xl / t_xl
    return {
        **{"model": name, "prompts": len(prompts), "batch_size": bs, "max_new_tokens": n_new},
        **{"hf_seconds": t_hf, "hf_new_tokens": new_hf, "hf_tok_per_s": hf_rate},
        **{"xferlens_seconds": t_xl, "xferlens_new_tokens": new_xl, "xferlens_tok_per_s": xl_rate},
        "ratio": xl_rate / hf_rate,
    }


def held_out_harmful(spec, sets: dict, n: int) -> list[str]:
    """The first ``n`` of the harmful split's held-out half (shuffled for a shuffled draw),
    minus anything in any of the run's prompt sets."""
    _, held = data.harmful_prompts().split(0.5, seed=spec.seed)
    held = held.shuffled(spec.seed + 2) if spec.vector.draw == "shuffled" else held
    used = set().union(*sets.values())
    out = [p for p in held if p not in used][:n]
    assert len(out) == n, f"only {len(out)} held-out harmful prompts; lower --ablate-prompts"
    return out


def ablation(spec, folder, tgt, sets, vecs, args) -> tuple[dict, list[str]]:
    """Every direction (one of each parallel family) ablated at every residual point."""
    kept = {}
    for k, v in vecs.items():
        d = v.direction().float().cpu()
        cos = [float(torch.cosine_similarity(d, u.direction().float().cpu(), dim=0)) for u in kept.values()]
        if all(abs(c) < 0.9999 for c in cos):
            kept[k] = v
    harmful, e = held_out_harmful(spec, sets, args.ablate_prompts), spec.evaluation
    ppl = r._corpus(spec, "ppl", args.ppl_texts, set(sets["eval"])) if args.ppl_texts else None
    how = {"judge": e.judge, "ppl_texts": ppl, "max_new_tokens": args.max_new_tokens or e.max_new_tokens}
    how |= {"alphas": [1.0], "mode": "ablate", "layers": "all", "batch_size": e.batch_size, "seed": spec.seed}
    rep = evaluate_steering(tgt, r._chat(tgt, spec, harmful), kept, progress=False, **how)
    none, gone = rep.rate("none"), rep.rate("none") - rep.rate("native", 1.0)
    removal = {k: (none - rep.rate(k, 1.0)) / gone if gone > 0 else float("nan") for k in rep.labels[2:]}
    md = [f"## Ablating each direction at every residual point, {len(harmful)} held-out harmful prompts"]
    md += ["", "Refusal rate: lower = the direction carries refusal.", "", rep.to_markdown(), ""]
    md += ["refusal removed relative to native: " + ", ".join(f"{k}: {x:.2f}" for k, x in removal.items())]
    return {**rep.to_dict(), "prompts": harmful, "removal_relative_to_native": removal}, md


def extra_doses(spec, folder, tgt, sets, vecs, args) -> tuple[dict, list[str]]:
    """Shortened native / dose-matched transfer on the run's score, joined to its scores."""
    nat, e = vecs["native"], spec.evaluation
    extras = {f"native x{f:g}": nat.scaled(f) for f in args.native_scales}
    if args.dose_matched:
        tr, u = vecs["transferred"], nat.direction().float().cpu() / nat.norm()
        extras[DOSE] = tr.scaled(nat.norm() / float(tr.direction().float().cpu() @ u))
    run_dr = DoseResponse.from_dict(json.loads((folder / "scores.json").read_text())["dose_response"])
    trig = r._trigger_positions(spec)
    how = {"seed": spec.seed, "positions": trig["add"] if trig else "all", "batch_size": e.batch_size}
    prompts = r._chat(tgt, spec, sets["eval"])  # all of them, in the run's batches
    dr = dose_response(
        tgt, prompts, extras, e.alphas, e.openings, random_control=False, progress=False, **how
    )
    gap = float(np.abs(dr.none - run_dr.none).max())
    joined = DoseResponse(run_dr.alphas, run_dr.none, {**run_dr.scores, **dr.scores}, run_dr.meta)
    others = [k for k in joined.labels if k != "native"]
    doses = {k: joined.equivalent_dose(k, "native", e.bootstrap, spec.seed).to_dict() for k in others}
    norms = {"random": nat.norm(), **{k: v.norm() for k, v in {**vecs, **extras}.items()}}
    md = [f"## Native-equivalent dose on the run's score ({run_dr.n} held-out prompts)", ""]
    md += [f"Unsteered scores within {gap:.1e} of the run's.", ""]
    md += ["| condition | norm | dose [95 % CI] | dose at each alpha |", "|---|---|---|---|"]
    for k, d in doses.items():
        dose = f"{d['dose']:.2f} [{d['ci'][0]:.2f}, {d['ci'][1]:.2f}]"
        per = ", ".join(f"{a:g}: {x:.2f}" for a, x in zip(e.alphas, d["per_alpha"], strict=True))
        md.append(f"| {k} | {norms.get(k, float('nan')):.3g} | {dose} | {per} |")
    md += ["", joined.to_markdown(e.bootstrap, spec.seed)]
    out = {"norms": norms, "doses": doses, "none_max_abs_diff_vs_run": gap, "scores": dr.to_dict()}
    return out, md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder of `xferlens run`, or a spec YAML")
    ap.add_argument("--out", type=Path, help="for a spec: its run folder (default runs/<name>)")
    ap.add_argument("--ablate-prompts", type=int, default=50, help="held-out harmful prompts (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, help="for the ablation (default: the spec's)")
    ap.add_argument("--ppl-texts", type=int, default=8, help="general texts for the ablation's perplexity")
    ap.add_argument("--native-scales", type=float, nargs="*", default=[], help="native shortened by these")
    ap.add_argument("--dose-matched", action="store_true", help="transferred at native's length along native")
    ap.add_argument("--thr-prompts", type=int, default=32, help="throughput comparison (0: skip)")
    args = ap.parse_args()
    is_spec = args.run.suffix in (".yaml", ".yml")
    spec = load_spec(args.run if is_spec else args.run / "spec.yaml")
    folder = (args.out or Path("runs") / spec.name) if is_spec else args.run
    mdl, t0, seconds = r._Models(spec, None), time.perf_counter(), {}
    src, tgt = mdl.get()
    status = folder / "status.json"
    if not (status.is_file() and json.loads(status.read_text())["complete"]):
        run_experiment(spec, folder, models=(src, tgt))
    seconds["load and run"] = time.perf_counter() - t0
    torch.manual_seed(spec.seed)
    sets, vecs = r._prompt_sets(spec), r._target_vectors(spec, folder, tgt)
    layers = json.loads((folder / "layers.json").read_text())
    src_l = layer_label(layers["src_layer"])
    pair = f"{spec.source.model} L{src_l} -> {spec.target.model} L{layers['tgt_layer']}"
    res = {"when": time.strftime("%Y-%m-%d %H:%M"), "run": str(folder), "pair": pair, "args": vars(args)}
    lines = [f"# bench_steering: {pair} (run `{folder}`)"]
    wanted = {"ablate": args.ablate_prompts, "extra": args.native_scales or args.dose_matched}
    for name, step in (("ablate", ablation), ("extra", extra_doses)):
        if wanted[name]:
            t0 = time.perf_counter()
            res[name], md = step(spec, folder, tgt, sets, vecs, args)
            lines, seconds[name] = [*lines, "", *md], time.perf_counter() - t0
    if args.thr_prompts:  # the source model alone in memory
        t0 = time.perf_counter()
        prompts = r._chat(src, spec, sets["eval"][: args.thr_prompts])
        del src, tgt, vecs
        mdl._pair = None
        thr = res["throughput"] = hf_throughput(r._weights(spec.source), folder / "vectors/source", prompts)
        head = f"Throughput, {thr['model']}, {len(prompts)} prompts, batch 16, 24 new tokens, float32 CPU: "
        x, h = thr["xferlens_tok_per_s"], thr["hf_tok_per_s"]
        lines += ["", head + f"xferlens steered {x:.1f} tok/s, HF generate {h:.1f} tok/s, ratio {x / h:.2f}"]
        seconds["throughput"] = time.perf_counter() - t0
    res["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    (folder / "bench_steering.json").write_text(json.dumps(res, indent=1, default=str))
    (folder / "bench_steering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), "\n", json.dumps(res["seconds"]), sep="")


if __name__ == "__main__":
    main()
