"""Data-parallel caching and fitting: 1 rank vs 2 ranks on one machine (torchrun, gloo, CPU).

One spec (``SPEC`` below: the zoo's Qwen2.5-Coder 0.5B -> 1.5B pair, a layer pair at a
quarter of the depth, every token of ``texts`` default-corpus texts): pair the two models'
activations into shards (``pairs_to_disk``), then fit ``affine`` and ``orthogonal`` maps
from the shards (moments all-reduced). The driver runs it with 1 rank x 1 thread and 2
ranks x 1 thread back to back (``OMP_NUM_THREADS=1``) and reports the wall time of each
step (from a barrier before it to one after it: the slowest rank), speedup and
efficiency (speedup / ranks), each rank's peak RSS, the maps' agreement between the two
runs, and the machine's load (``uptime``) before and after each run, since other jobs on a
shared machine distort the efficiency. Before each run it also measures what the machine
offers two processes at that moment: two single-thread matmul loops side by side against
one alone (``ceiling``: the speedup two perfectly parallel ranks could reach then).

    python benchmarks/scripts/bench_distributed.py --out /tmp/bench_distributed
    python benchmarks/scripts/bench_distributed.py --out /tmp/bd --texts 16 --chars 300  # smoke size

Worker (what the driver starts; also usable on its own)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/scripts/bench_distributed.py \\
        worker --out /tmp/bd/ranks2

Models load from the TransformerLens cache with their weights memory-mapped, so ranks
share the pages of the weights (RSS counts them in each rank) and only the blocks up to
the hooked layer are ever read.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SPEC = {
    "source": "qwen2.5-coder-0.5b-instruct",
    "target": "qwen2.5-coder-1.5b-instruct",
    "src_layer": 6,  # of 24
    "tgt_layer": 7,  # of 28
    "texts": 64,
    "chars": 300,  # each text cut to this many characters (about 70 tokens)
    "batch_size": 8,
    "chunk_texts": 16,
    "dtype": "float32",
    "kinds": ["affine", "orthogonal"],
    "seed": 0,
}
STEPS = ("load", "cache", "fit_affine", "fit_orthogonal")
HERE = Path(__file__).resolve()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(spec: dict, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from xferlens import data, load_model
    from xferlens import distributed as xd
    from xferlens.activations.pair_shards import pairs_to_disk
    from xferlens.mappers import fit_mapper

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    rec: dict = {"rank": xd.rank(), "world": xd.world_size(), "steps": {}, "rss_mb": {}}

    def step(name: str, fn):
        xd.barrier()
        t0 = time.perf_counter()
        result = fn()
        busy = time.perf_counter() - t0  # this rank's own work
        xd.barrier()
        rec["steps"][name] = {"wall_s": time.perf_counter() - t0, "busy_s": busy}
        rec["rss_mb"][name] = peak_rss_mb()
        return result

    texts = [t[: spec["chars"]] for t in data.default_corpus(spec["texts"], seed=spec["seed"]).texts]

    def load():
        kw = dict(device="cpu", dtype=spec["dtype"], progress=False)
        return load_model(spec["source"], **kw), load_model(spec["target"], **kw)

    src, tgt = step("load", load)
    pairs = step(
        "cache",
        lambda: pairs_to_disk(
            src, tgt, texts, spec["src_layer"], spec["tgt_layer"], out / "pairs",
            dtype="float32", batch_size=spec["batch_size"], chunk_texts=spec["chunk_texts"],
            overwrite=True, progress=False,
        ),
    )  # fmt: skip
    rec["rows"] = len(pairs)
    for kind in spec["kinds"]:
        mapper, hist = step(f"fit_{kind}", lambda k=kind: fit_mapper(pairs, k, progress=False))
        rec[kind] = {k: v for k, v in hist.items() if isinstance(v, int | float | str) and k != "seconds"}
        if xd.is_main():
            state = {k: v.detach().contiguous() for k, v in mapper.state_dict().items()}
            save_file(state, out / f"{kind}.safetensors")
    (out / f"rank{xd.rank()}.json").write_text(json.dumps(rec, indent=1))


PROBE = """
import time, torch
torch.set_num_threads(1)
a, n, t = torch.randn(512, 512), 0, time.perf_counter()
while time.perf_counter() - t < {s}:
    a @ a
    n += 1
print(n / {s})
"""


def capacity(seconds: float = 5.0) -> dict:
    """Matmuls per second of one single-thread process alone, and of two side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", PROBE.format(s=seconds)]
    one = float(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    two = sum(float(p.communicate()[0]) for p in procs)
    return {"one": one, "two": two, "ceiling": two / one}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def launch(ranks: int, spec_path: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += [str(HERE), "worker", "--out", str(out), "--spec", str(spec_path)]
    probe = capacity()
    before = uptime()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    after = uptime()
    if proc.returncode:
        raise SystemExit(f"{ranks} rank(s) failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {
        "capacity": probe,
        "ranks": ranks,
        "launch_s": total,
        "uptime_before": before,
        "uptime_after": after,
        "per_rank": per_rank,
    }


def agreement(a: Path, b: Path, kind: str) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / f"{kind}.safetensors"), load_file(b / f"{kind}.safetensors")
    worst = 0.0
    for k in y:
        d = (x[k].double() - y[k].double()).abs().max() / y[k].double().abs().max().clamp_min(1e-30)
        worst = max(worst, float(d))
    return worst


def report(runs: list[dict], agree: dict, spec: dict) -> str:
    one, two = runs
    lines = [
        f"Spec: {spec['source']} L{spec['src_layer']} -> {spec['target']} L{spec['tgt_layer']}, "
        f"{spec['texts']} texts x <= {spec['chars']} chars, {one['per_rank'][0]['rows']} paired rows, "
        f"{spec['dtype']}, OMP_NUM_THREADS=1, gloo on CPU",
        "",
        "| step | 1 rank wall s | 2 ranks wall s | speedup | efficiency | 2 ranks busy s (r0 / r1) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in STEPS:
        w1 = one["per_rank"][0]["steps"][s]["wall_s"]
        w2 = max(r["steps"][s]["wall_s"] for r in two["per_rank"])
        busy = " / ".join(f"{r['steps'][s]['busy_s']:.1f}" for r in two["per_rank"])
        eff = "n/a (each rank loads)" if s == "load" else f"{w1 / w2 / 2:.2f}"
        lines.append(f"| {s} | {w1:.1f} | {w2:.1f} | {w1 / w2:.2f} | {eff} | {busy} |")
    cf = [s for s in STEPS if s != "load"]
    w1 = sum(one["per_rank"][0]["steps"][s]["wall_s"] for s in cf)
    w2 = sum(max(r["steps"][s]["wall_s"] for r in two["per_rank"]) for s in cf)
    lines.append(f"| caching + fitting | {w1:.1f} | {w2:.1f} | {w1 / w2:.2f} | {w1 / w2 / 2:.2f} | |")
    ceiling = two["capacity"]["ceiling"]
    lines += [
        "",
        f"Speedup of caching + fitting against what the machine offered two processes then "
        f"(ceiling {ceiling:.2f}): {w1 / w2 / ceiling:.2f}",
    ]
    lines += [
        "",
        "Peak RSS (MiB, after each step; the weights are memory-mapped and counted in every rank):",
        "",
    ]
    lines += ["| run | rank | " + " | ".join(STEPS) + " |", "|---|---|" + "---:|" * len(STEPS)]
    for run in runs:
        for r in run["per_rank"]:
            rss = " | ".join(f"{r['rss_mb'][s]:.0f}" for s in STEPS)
            lines.append(f"| {run['ranks']} rank(s) | {r['rank']} | {rss} |")
    lines += ["", "Maps' agreement, 2 ranks vs 1 rank (max |a - b| / max |b| over each tensor):", ""]
    for kind, d in agree.items():
        h1, h2 = one["per_rank"][0][kind], two["per_rank"][0][kind]
        same = {k: h1.get(k) == h2.get(k) for k in ("train_rows", "val_rows", "ridge") if k in h1}
        lines.append(f"- {kind}: {d:.2e}; {', '.join(f'{k} equal: {v}' for k, v in same.items())}")
    lines += ["", "Load (`uptime`) and the 2-process ceiling measured just before each run:", ""]
    for run in runs:
        c = run["capacity"]
        lines.append(
            f"- before the {run['ranks']}-rank run: one matmul loop {c['one']:.0f}/s alone, two side by "
            f"side {c['two']:.0f}/s together: ceiling speedup {c['ceiling']:.2f}"
        )
    for run in runs:
        lines.append(
            f"- {run['ranks']} rank(s): before `{run['uptime_before']}`; after `{run['uptime_after']}`"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="drive", choices=["drive", "worker"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--spec", type=Path, default=None, help="JSON overriding keys of SPEC")
    p.add_argument("--texts", type=int, default=None)
    p.add_argument("--chars", type=int, default=None)
    args = p.parse_args()
    spec = {**SPEC, **(json.loads(args.spec.read_text()) if args.spec else {})}
    spec.update({k: v for k, v in (("texts", args.texts), ("chars", args.chars)) if v is not None})
    if args.mode == "worker":
        from xferlens import distributed as xd

        xd.run(worker, spec, args.out, device="cpu")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = args.out / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    runs = [launch(n, spec_path, args.out / f"ranks{n}") for n in (1, 2)]
    agree = {k: agreement(args.out / "ranks2", args.out / "ranks1", k) for k in spec["kinds"]}
    text = report(runs, agree, spec)
    (args.out / "results.json").write_text(
        json.dumps({"spec": spec, "runs": runs, "agreement": agree}, indent=1)
    )
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
