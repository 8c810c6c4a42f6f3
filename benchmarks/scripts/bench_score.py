"""Throughput of the steering score beside a bare forward pass of the same tokens.

The score (``xferlens.evaluation.score_conditions``) reads the refusal log-odds at the first
reply position; a bare forward is what any scorer must at least do: run every prompt's
tokens (chat template included) through the model once. Both run in this process on the
same prompts, batch size and threads, alternating, best of ``--repeats``:

    python benchmarks/scripts/bench_score.py --model qwen2.5-coder-1.5b-instruct --prompts 64

It also scores the hand-labelled unsteered completions of ``tests/data/refusal_labels.jsonl``
(the 1.5B's own replies; the steered rows' vectors were not kept, so only the unsteered
rows can be re-scored) and gives the score's AUC against the hand labels.

It also times one steered grid (unsteered + ``--conditions`` steered conditions at a middle
layer) to show the per-condition cost once the lower layers are shared.

``--dtype bfloat16`` runs all of it in bfloat16; ``--agreement`` instead scores the same
prompts unsteered and under the model's own refusal vector (difference of means, 32 + 32
prompts, middle layer) at alpha 1 and 2 in float32 and in bfloat16, and reports per
condition the mean score in each dtype, the per-prompt correlation, the mean absolute
difference and the time: whether bfloat16 (``dtype: auto``) changes what the score says.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from xferlens import chat_prompts, data, load_model
from xferlens.activations.tokens import tokenize
from xferlens.evaluation.score import score_conditions
from xferlens.evaluation.steering import random_like
from xferlens.identity import model_identity
from xferlens.steering.vector import SteeringVector


def bare_forward(model, prompts: list[str], batch_size: int) -> int:
    """Logits of every prompt's tokens, batched by length like the scorer; returns tokens run."""
    tk = tokenize(model, prompts, truncate=False)
    order = sorted(range(len(prompts)), key=lambda i: len(tk.ids[i]))
    n_tok = 0
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        width = max(len(tk.ids[i]) for i in idx)
        tokens = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for r, i in enumerate(idx):
            tokens[r, : len(tk.ids[i])] = torch.tensor(tk.ids[i])
            mask[r, : len(tk.ids[i])] = 1
            n_tok += len(tk.ids[i])
        model(tokens.to(model.cfg.device), attention_mask=mask.to(model.cfg.device))
    return n_tok


LABELS = Path(__file__).parents[2] / "tests" / "data" / "refusal_labels.jsonl"


def auc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def label_agreement(model) -> dict:
    rows = [json.loads(x) for x in LABELS.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "condition=none" in r["source"] and not r["ambiguous"]]
    prompts = chat_prompts(model, [r["prompt"] for r in rows])
    s = score_conditions(model, prompts, "refusal", [(None, 0.0)], progress=False)[0].tolist()
    y = [bool(r["refusal"]) for r in rows]
    return {"n": len(rows), "refusals": sum(y), "auc": auc(s, y), "scores": s, "labels": y}


def dtype_agreement(args) -> dict:
    import numpy as np

    from xferlens.steering.build import diff_of_means

    out: dict = {"model": args.model, "prompts": args.prompts, "dtypes": {}}
    scores = {}
    for dt in ("float32", "bfloat16"):
        model = load_model(args.model, dtype=dt, progress=False)
        prompts = chat_prompts(model, list(data.harmless_prompts(n=args.prompts, seed=11)))
        harmful = chat_prompts(model, list(data.harmful_prompts())[:32])
        harmless = chat_prompts(model, list(data.harmless_prompts(n=32, seed=5)))
        layer = model.cfg.n_layers // 2
        v = diff_of_means(model, harmful, harmless, hooks=layer)
        conds = [(None, 0.0), (v, 1.0), (v, 2.0)]
        t0 = time.perf_counter()
        scores[dt] = score_conditions(
            model, prompts, "refusal", conds, batch_size=args.batch_size, progress=False
        )
        out["dtypes"][dt] = {
            "score_s": time.perf_counter() - t0,
            "vector_norm": v.norm(),
            "layer": layer,
            "mean_score": scores[dt].mean(1).tolist(),
        }
        del model
    a, b = scores["float32"].numpy(), scores["bfloat16"].numpy()
    out["conditions"] = ["none", "native x1", "native x2"]
    out["pearson_r"] = [float(np.corrcoef(a[c], b[c])[0, 1]) for c in range(len(a))]
    out["mean_abs_diff"] = np.abs(a - b).mean(1).tolist()
    out["speedup"] = out["dtypes"]["float32"]["score_s"] / out["dtypes"]["bfloat16"]["score_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--conditions", type=int, default=4, help="steered conditions in the grid timing")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--agreement", action="store_true", help="float32 vs bfloat16 scores (module doc)")
    ap.add_argument("--out", default="benchmarks/results/score_throughput.json")
    args = ap.parse_args()
    if args.agreement:
        out = dtype_agreement(args)
        print(json.dumps(out, indent=1))
        Path(args.out).write_text(json.dumps(out, indent=1))
        return

    model = load_model(args.model, dtype=args.dtype)
    prompts = chat_prompts(model, list(data.harmless_prompts(n=args.prompts, seed=11)))
    n_tok = sum(len(x) for x in tokenize(model, prompts, truncate=False).ids)
    with torch.inference_mode():
        bare_forward(model, prompts[:4], args.batch_size)  # warm-up
        score_conditions(model, prompts[:4], "refusal", [(None, 0.0)], progress=False)
        t_bare, t_score = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            bare_forward(model, prompts, args.batch_size)
            t_bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            score_conditions(
                model, prompts, "refusal", [(None, 0.0)], batch_size=args.batch_size, progress=False
            )
            t_score.append(time.perf_counter() - t0)
        layer = model.cfg.n_layers // 2
        hook = f"blocks.{layer}.hook_resid_post"
        base = SteeringVector({hook: torch.ones(model.cfg.d_model)}, model=model_identity(model))
        vecs = [random_like(base, seed) for seed in range(args.conditions)]
        conds = [(None, 0.0)] + [(v, 1.0) for v in vecs]
        t0 = time.perf_counter()
        score_conditions(model, prompts, "refusal", conds, batch_size=args.batch_size, progress=False)
        t_grid = time.perf_counter() - t0
        labels = label_agreement(model) if "1.5b" in args.model else None
    b, s = min(t_bare), min(t_score)
    out = {
        "model": args.model,
        "dtype": args.dtype,
        "prompts": len(prompts),
        "prompt_tokens": n_tok,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "bare_forward_s": b,
        "score_s": s,
        "bare_prompts_per_s": len(prompts) / b,
        "bare_tokens_per_s": n_tok / b,
        "score_prompts_per_s": len(prompts) / s,
        "score_tokens_per_s": n_tok / s,
        "score_vs_bare": b / s,
        "grid_conditions": len(conds),
        "grid_layer": layer,
        "grid_s": t_grid,
        "grid_prompt_conditions_per_s": len(prompts) * len(conds) / t_grid,
        "grid_per_condition_vs_bare": b / (t_grid / len(conds)),
        "repeats": {"bare_s": t_bare, "score_s": t_score},
        "hand_labels": labels,
    }
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
