"""Caching throughput and streaming memory (issue 3), each figure measured in this run.

Part 1, throughput on smollm2-135m-instruct, the same 8 texts of exactly 128 tokens:
  (a) HF ``AutoModelForCausalLM`` full forward
  (b) TransformerLens ``run_with_cache`` with no filter (every hook)
  (c) xferlens ``cache_activations`` of one mid layer (``blocks.15.hook_resid_post``)
  (d) TransformerLens forward with ``stop_at_layer=16`` and no hooks: the cost of running
      only the layers (c) needs, for reference
Target: (c) >= 0.9 x (a) x n_layers / (layer + 1).

Part 2, memory of ``cache_to_disk`` streaming one layer (``--layer``, default 12; float16) of
qwen2.5-coder-0.5b-instruct (float32 weights, 2.35 GiB) over the default corpus, for
growing token counts, each in a fresh process: RSS sampled every 50 ms while caching,
against the RSS just before, split into anonymous memory (heap: activations, buffers) and
file-backed pages (the memory-mapped converted weights). It must not grow with the corpus.

    python benchmarks/scripts/bench_cache.py [--tokens 20000 100000 1000000] [--out benchmarks/cache.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYER = 15
REPS = 5


def throughput() -> dict:
    from transformers import AutoModelForCausalLM

    from xferlens import data, load_model
    from xferlens.activations import cache_activations
    from xferlens.identity import loaded_from

    model = load_model("smollm2-135m-instruct", device="cpu", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(loaded_from(model)["folder"], dtype=torch.float32).eval()
    corpus = data.default_corpus(None).texts
    long = [t for t in corpus if len(model.to_tokens(t)[0]) >= 130][:8]
    tokens = torch.stack([model.to_tokens(t)[0, :128] for t in long])
    texts = [model.tokenizer.decode(row) for row in tokens]
    # the decoded texts re-tokenize to 128 tokens (checked, so all four see the same work)
    n_tok = sum(len(model.to_tokens(t)[0]) for t in texts)

    def timeit(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with torch.inference_mode():
        t_hf = timeit(lambda: hf(tokens))
        t_tl_all = timeit(lambda: model.run_with_cache(tokens))
        t_stop = timeit(lambda: model(tokens, stop_at_layer=LAYER + 1))
    t_ours = timeit(lambda: cache_activations(model, texts, LAYER, batch_size=8, progress=False))
    n_layers = model.cfg.n_layers
    rate = {
        k: tokens.numel() / v
        for k, v in {
            "hf_full_forward": t_hf,
            "tl_run_with_cache_all": t_tl_all,
            "tl_stop_at_layer": t_stop,
        }.items()
    }
    rate["xferlens_one_layer"] = n_tok / t_ours
    target = 0.9 * rate["hf_full_forward"] * n_layers / (LAYER + 1)
    return {
        "model": "smollm2-135m-instruct",
        "batch": list(tokens.shape),
        "layer": LAYER,
        "tok_per_s": {k: round(v) for k, v in rate.items()},
        "ours_over_hf": round(rate["xferlens_one_layer"] / rate["hf_full_forward"], 2),
        "ours_over_run_with_cache": round(rate["xferlens_one_layer"] / rate["tl_run_with_cache_all"], 2),
        "ours_over_stop_at_layer": round(rate["xferlens_one_layer"] / rate["tl_stop_at_layer"], 2),
        "target_tok_per_s": round(target),
        "meets_target": rate["xferlens_one_layer"] >= target,
    }


CHILD = r"""
import json, resource, sys, tempfile, threading, time
import psutil
from xferlens import data, load_model
from xferlens.activations import cache_to_disk
n_tokens, name, shard_rows, layer = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
budget = int(sys.argv[5]) or None
model = load_model(name, device="cpu", progress=False)
corpus = data.default_corpus(None).texts
texts, total, passes = [], 0, 0
while total < n_tokens:  # the corpus holds ~0.99M Qwen tokens: 1M tokens go round it again
    passes += 1
    for t in corpus:
        if total >= n_tokens:
            break
        texts.append(t)
        total += len(model.tokenizer(t)["input_ids"])
proc = psutil.Process()
def status():  # resident anonymous memory (heap) vs file-backed pages (the mmapped weights)
    f = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
    return {k: int(v.split()[0]) * 1024 for k, v in f.items()}
base = proc.memory_info().rss
base_parts = status()
peak = [base]
peak_parts = dict(base_parts)
done = threading.Event()
def sample():
    while not done.is_set():
        rss = proc.memory_info().rss
        parts = status()
        for k, v in parts.items():
            peak_parts[k] = max(peak_parts.get(k, 0), v)
        peak[0] = max(peak[0], rss)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as d:
    store = cache_to_disk(model, texts, d + "/acts", layer, dtype="float16", progress=False,
                          shard_rows=shard_rows, max_batch_tokens=budget)
    rows, shards = len(store), len(store.manifest["shards"])
    disk = sum(p.stat().st_size for p in store.folder.iterdir())
done.set()
print(json.dumps({"layer": layer, "max_batch_tokens": budget, "tokens": total, "texts": len(texts),
                  "corpus_passes": passes,
                  "rows": rows, "shards": shards,
                  "disk_mib": round(disk / 2**20, 1), "seconds": round(time.perf_counter() - t0, 1),
                  "rss_before_caching_gib": round(base / 2**30, 2),
                  "peak_rss_while_caching_gib": round(peak[0] / 2**30, 2),
                  "added_by_caching_gib": round((peak[0] - base) / 2**30, 2),
                  "anon_before_gib": round(base_parts.get("RssAnon", 0) / 2**30, 2),
                  "peak_anon_gib": round(peak_parts.get("RssAnon", 0) / 2**30, 2),
                  "file_before_gib": round(base_parts.get("RssFile", 0) / 2**30, 2),
                  "peak_file_gib": round(peak_parts.get("RssFile", 0) / 2**30, 2),
                  "process_max_rss_gib": round(
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def streaming(n_tokens: int, model: str, shard_rows: int, layer: int, budget: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n_tokens), model, str(shard_rows), str(layer), str(budget)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", nargs="*", type=int, default=[10_000, 100_000])
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--shard-rows", type=int, default=32768)
    ap.add_argument("--layer", type=int, default=12, help="layer streamed in part 2")
    ap.add_argument(
        "--max-batch-tokens", type=int, default=1024, help="padded tokens per forward pass (0: no cap)"
    )
    ap.add_argument("--out", default="benchmarks/results/cache.json")
    args = ap.parse_args()
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if not args.skip_throughput:
        result["throughput"] = throughput()
        print(json.dumps(result["throughput"], indent=1), flush=True)
    result["streaming"] = []
    for n in args.tokens:
        row = {
            "model": args.model,
            "shard_rows": args.shard_rows,
            **streaming(n, args.model, args.shard_rows, args.layer, args.max_batch_tokens),
        }
        result["streaming"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
