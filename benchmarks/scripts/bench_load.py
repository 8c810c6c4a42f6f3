"""Cold and warm load times of every zoo model, measured in one run on one machine.

cold = first ``load_model`` of a pulled model: read the HF folder, convert to
TransformerLens format, process the weights, write the converted cache (the pull itself
is excluded). warm = a later ``load_model`` that reads the converted cache. For scale,
the same run also times ``transformers.AutoModelForCausalLM.from_pretrained`` on the same
folder. Each load runs in a fresh Python process (imports included in neither figure;
they are reported apart) and reports its peak RSS, and the peak less the RSS the process
had after its imports (torch and transformers alone hold about 0.5 GB).

    python benchmarks/scripts/bench_load.py [--models NAME ...] [--out benchmarks/results/load.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch, xferlens
from transformers import AutoModelForCausalLM
t1 = time.perf_counter()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
kind, name, folder = sys.argv[1:4]
if kind == "hf":
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
else:
    m = xferlens.load_model(name, device="cpu", progress=False)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "base_rss_gb": base,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run(kind: str, name: str, folder: Path, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, name, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} load of {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from xferlens import paths, zoo

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(zoo.ZOO))
    ap.add_argument("--out", default="benchmarks/results/load.json")
    args = ap.parse_args()
    real_home = paths.home()
    rows = []
    for name in args.models:
        folder = zoo.pull(name)
        weights_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
        with tempfile.TemporaryDirectory(prefix="bench-home-") as tmp:
            # a fresh cache that shares the pulled HF folders but has no conversions yet
            (Path(tmp) / "hf").symlink_to(real_home / "hf")
            env = dict(os.environ, XFERLENS_HOME=tmp, HF_HUB_OFFLINE="1")
            hf = run("hf", name, folder, env)
            cold = run("xferlens", name, folder, env)
            warm = run("xferlens", name, folder, env)
        row = {
            "model": name,
            "fp32_weights_gb": round(weights_gb, 2),
            "hf_from_pretrained_s": round(hf["load_s"], 1),
            "cold_s": round(cold["load_s"], 1),
            "warm_s": round(warm["load_s"], 1),
            "cold_peak_rss_gb": round(cold["peak_rss_gb"], 2),
            "cold_peak_over_weights": round(cold["peak_rss_gb"] / weights_gb, 2),
            # the same, less what the process held before loading (torch, transformers)
            "cold_added_over_weights": round((cold["peak_rss_gb"] - cold["base_rss_gb"]) / weights_gb, 2),
            "warm_peak_rss_gb": round(warm["peak_rss_gb"], 2),
            "import_s": round(warm["import_s"], 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
