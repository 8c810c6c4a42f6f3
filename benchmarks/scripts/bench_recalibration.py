"""How long does a transferred refusal vector come out, and does norm recalibration fix it?

    python benchmarks/scripts/bench_recalibration.py
    # Qwen 0.5B L10 -> 1.5B L12; SmolLM2 L15 -> Qwen 0.5B L10

Geometry only (no generation), on bench_steering's shuffled draw (``--train`` prompts per
set for the vector, ``--train`` *other* prompts for a second native vector, the "twin";
the map on the last prompt token of 300 + 300 other instructions, ridge by validation).
The 2 x ``--train`` vector prompts are re-split ``--splits`` times at random, and for
every split:

- cosine of the transferred vector to the target's own (native) vector, and its length
  along native relative to native's (1.0 = the same dose), also measured along the
  twin's direction (whose sampling noise is independent of both vectors');
- the same length for each rescaling of the transferred vector: ``transfer``'s norm
  recalibrations, which keep the vector's norm over the layer's mean activation norm
  (``recalibrate="norm"``) or over its centred spread, the RMS distance to the mean
  activation (``"spread"``), from source to target; and a label-free shrinkage
  correction (the target rows' spread along the transferred direction over the mapped
  rows' spread; not in the library);
- the vectors' relative norms in each model, the quantity recalibration assumes equal.

Writes ``benchmarks/results/recalibration.json`` / ``.md``.
"""

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_steering import draw_prompts  # noqa: E402

from xferlens import chat_prompts, load_model  # noqa: E402
from xferlens.activations import paired_activations  # noqa: E402
from xferlens.mappers import fit_mapper  # noqa: E402
from xferlens.steering import diff_of_means, transfer  # noqa: E402
from xferlens.steering.vector import SteeringVector  # noqa: E402

PAIRS = {
    "qwen": ("qwen2.5-coder-0.5b-instruct", 10, "qwen2.5-coder-1.5b-instruct", 12),
    "cross": ("smollm2-135m-instruct", 15, "qwen2.5-coder-0.5b-instruct", 10),
}


def run_pair(key: str, n: int, splits: int) -> dict:
    src_name, ls, tgt_name, lt = PAIRS[key]
    t0 = time.perf_counter()
    src = load_model(src_name, device="cpu", progress=False)
    tgt = load_model(tgt_name, device="cpu", progress=False)
    args = types.SimpleNamespace(
        train=n, reference_train=n, eval=50, draw="shuffled", fit_texts=0, fit_prompts=300
    )
    h_tr, s_tr, h_ref, s_ref, _, _, fit_h, fit_s, _ = draw_prompts(args)

    def rows(xs):
        p = paired_activations(src, tgt, chat_prompts(src, xs), ls, lt, positions="last", progress=False)
        assert len(p) == len(xs), f"{len(p)} rows for {len(xs)} prompts"
        return p

    vec_h, vec_s = rows(h_tr + h_ref), rows(s_tr + s_ref)
    fit = rows(fit_h + fit_s)
    mapper, hist = fit_mapper(fit, "affine", progress=False)
    # the row means of split 0 are bench_steering's vectors: check against the library builder
    v0 = diff_of_means(src, chat_prompts(src, h_tr), chat_prompts(src, s_tr), hooks=ls)
    row0 = vec_h.src[:n].double().mean(0) - vec_s.src[:n].double().mean(0)
    check = float(torch.nn.functional.cosine_similarity(v0.direction().double(), row0, dim=0))
    assert check > 0.9999, f"row-mean vector differs from diff_of_means (cosine {check})"
    fy = fit.tgt.double()
    with torch.no_grad():
        mapped = mapper(fit.src.float()).double()
    training = mapper.meta["training"]
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {}
    for k in range(splits):
        ph = torch.arange(2 * n) if k == 0 else torch.randperm(2 * n, generator=gen)
        ps = torch.arange(2 * n) if k == 0 else torch.randperm(2 * n, generator=gen)

        def diff(side, a, b):
            return getattr(vec_h, side)[a].double().mean(0) - getattr(vec_s, side)[b].double().mean(0)

        vs = diff("src", ph[:n], ps[:n])
        native, twin = diff("tgt", ph[:n], ps[:n]), diff("tgt", ph[n:], ps[n:])
        v = SteeringVector({v0.hook: vs.float()}, v0.model, {"method": "diff_of_means (rows)"})
        raw, rec_norm, rec_spread = (
            transfer(v, mapper, recalibrate=r).direction().double() for r in (False, "norm", "spread")
        )
        u = raw / raw.norm()
        scaled = {
            "raw": raw,
            "recalibrated (mean norm)": rec_norm,
            "recalibrated (centred spread)": rec_spread,
            "shrinkage-corrected": raw * float((fy @ u).std() / (mapped @ u).std()),
        }
        un, uw = native / native.norm(), twin / twin.norm()
        rec_ = {
            "cosine transferred-native": float(u @ un),
            "cosine twin-native": float(uw @ un),
            "twin length along native": float(twin @ un / native.norm()),
            "relative norm source (mean norm)": float(vs.norm() / training["src_norm"]),
            "relative norm native (mean norm)": float(native.norm() / training["tgt_norm"]),
            "relative norm source (centred spread)": float(vs.norm() / training["src_spread"]),
            "relative norm native (centred spread)": float(native.norm() / training["tgt_spread"]),
        }
        for name, t in scaled.items():
            rec_[f"{name}: length along native"] = float(t @ un / native.norm())
            rec_[f"{name}: length along twin"] = float((t @ uw) / (native @ uw))
        for key_, val in rec_.items():
            out.setdefault(key_, []).append(val)
    return {
        "src": f"{src_name} L{ls}",
        "tgt": f"{tgt_name} L{lt}",
        "prompts_per_vector": n,
        "fit_rows": len(fit),
        "ridge": hist["ridge"],
        "mean_norm": {"src": training["src_norm"], "tgt": training["tgt_norm"]},
        "centred_spread": {"src": training["src_spread"], "tgt": training["tgt_spread"]},
        "splits": out,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(res: dict) -> list[str]:
    def cell(xs):
        m = sum(xs) / len(xs)
        return f"{xs[0]:.3f} | {m:.3f} ({min(xs):.3f}–{max(xs):.3f})"

    s = res["splits"]
    lines = [
        f"## {res['src']} -> {res['tgt']}",
        "",
        f"{res['prompts_per_vector']} prompts per set per vector; map: {res['fit_rows']} rows, ridge "
        f"{res['ridge']:g}; mean activation norm src {res['mean_norm']['src']:.1f} / tgt "
        f"{res['mean_norm']['tgt']:.1f}, centred spread src {res['centred_spread']['src']:.1f} / tgt "
        f"{res['centred_spread']['tgt']:.1f}",
        "",
        f"| quantity | split 0 (bench_steering's) | mean over {len(s['cosine twin-native'])} splits "
        "(range) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {cell(v)} |" for k, v in s.items()]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    ap.add_argument("--train", type=int, default=64, help="prompts per set for each vector")
    ap.add_argument("--splits", type=int, default=8, help="random re-splits of the vector prompts")
    args = ap.parse_args()
    results = {k: run_pair(k, args.train, args.splits) for k in args.pairs}
    Path("benchmarks/results/recalibration.json").write_text(json.dumps(results, indent=1))
    lines = ["# Transferred refusal vectors: length and recalibration (geometry, no generation)", ""]
    for r in results.values():
        lines += table(r) + [""]
    Path("benchmarks/results/recalibration.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
