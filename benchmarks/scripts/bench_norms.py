"""Residual-stream scale per model (issue 22, "what differs with Gemma"): at five depths,
the norm of the first token, the median norm of the other tokens, and the largest
dimension's mean absolute value over all dimensions' (max over dimensions of
max |h_d| / mean |h|), averaged over 8 corpus texts (400 characters).

    python benchmarks/scripts/bench_norms.py   # writes benchmarks/results/residual_norms.json
"""

import json
from pathlib import Path

import torch

from xferlens import data, load_model
from xferlens.activations import resid_post

MODELS = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]


def main() -> None:
    torch.set_num_threads(1)
    texts = [t[:400] for t in data.default_corpus(None).texts[6000:6008]]
    out = {}
    for name in MODELS:
        m = load_model(name, device="cpu", progress=False)
        n = m.cfg.n_layers
        rows = {}
        for lay in sorted({n // 4, n // 3, n // 2, 3 * n // 4, n - 1}):
            first, rest, top = [], [], []
            for t in texts:
                _, cache = m.run_with_cache(t, names_filter=resid_post(lay), stop_at_layer=lay + 1)
                h = cache[resid_post(lay)][0]
                first.append(h[0].norm().item())
                rest.append(h[1:].norm(dim=-1).median().item())
                top.append((h[1:].abs().max(0).values / h[1:].abs().mean()).max().item())
            rows[lay] = {
                "first": sum(first) / len(first),
                "rest_median": sum(rest) / len(rest),
                "max_dim_over_mean": sum(top) / len(top),
            }
        cfg = m.cfg
        out[name] = {"n_layers": n, "d_model": cfg.d_model, "bos": cfg.default_prepend_bos, "layers": rows}
        print(name, json.dumps(out[name]), flush=True)
        del m
    Path("benchmarks/results/residual_norms.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
