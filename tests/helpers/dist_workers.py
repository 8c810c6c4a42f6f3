"""Jobs the 2-rank tests start under torchrun (gloo on CPU, tiny models).

``torchrun --standalone --nproc-per-node 2 -m tests.helpers.dist_workers JOB ARGS.json``

``ARGS.json`` holds the tiny models' folders, the texts and an output folder. Every rank
writes ``rank<r>.json`` (what it saw) into the output folder; rank 0 also saves the fitted
maps' tensors, so the test (one process) compares them with its own single-process fit.

Jobs:

``fit``    cache activations and pairs to shards (each rank its share of the texts), fit
           affine, orthogonal and autoencoder maps from the pair shards (moments all-reduced,
           the autoencoder under DistributedDataParallel); then run the experiment spec
           ``args["spec"]`` with the CLI (``xferlens run``) into ``run/``, counting each
           step's forward passes on this rank, and again (it must resume with nothing
           left to compute); call the library functions that split themselves
           (``layer_pair_scores``, ``evaluate_mappers``, ``evaluate_steering``) split and
           alone (``distributed=False``) on every rank; then cache again into ``failed/``,
           where rank 1 raises in the middle of its share (one launch tests all of it:
           starting torchrun costs more than any one part)
``crash``  cache into ``failed/``, but rank 1 dies outright (``os._exit``), as a killed
           process would
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

#: hooks / layers used by every job (the tiny models have 3 layers)
HOOKS = [1, 2]
SRC_LAYER, TGT_LAYER = 1, 2
MULTI_LAYERS = [0, 2]  # source layers read side by side
FIT_KINDS = ("affine", "orthogonal", "lowrank", "autoencoder")
#: small and fast: a couple of epochs at most, a fixed ridge grid
FIT_CONFIGS = {
    "affine": {},
    "orthogonal": {},
    "lowrank": {"rank_grid": [2, 4, 8]},
    "autoencoder": {"hidden": 16, "max_epochs": 2, "batch_size": 32, "seed": 0},
}


def load_pair(args: dict):
    from xferlens import load_model

    kw = dict(device="cpu", progress=False, cache=False)
    return load_model(args["src"], **kw), load_model(args["tgt"], **kw)


def cache_and_pair(args: dict, src, tgt, out: Path):
    from xferlens.activations import cache_to_disk
    from xferlens.activations.pair_shards import pairs_to_disk

    texts = args["texts"]
    acts = cache_to_disk(
        src, texts, out / "acts", HOOKS, shard_rows=args["shard_rows"], dtype="float32",
        batch_size=1, progress=False,
    )  # fmt: skip
    pairs = pairs_to_disk(
        src, tgt, texts, SRC_LAYER, TGT_LAYER, out / "pairs", dtype="float32",
        chunk_texts=args["chunk_texts"], shard_rows=args["shard_rows"], batch_size=1, progress=False,
    )  # fmt: skip
    return acts, pairs


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def job_fit(args: dict) -> None:
    from safetensors.torch import save_file

    from xferlens import distributed as xd
    from xferlens.mappers import fit_mapper

    out = Path(args["out"])
    src, tgt = load_pair(args)
    acts, pairs = cache_and_pair(args, src, tgt, out)
    seen: dict = {
        "rank": xd.rank(),
        "world": xd.world_size(),
        "acts_rows": len(acts),
        "pair_rows": len(pairs),
    }
    maps = {}
    for kind in FIT_KINDS:
        mapper, hist = fit_mapper(pairs, kind, FIT_CONFIGS[kind], progress=False)
        maps[kind] = mapper
        state = {k: v.detach().cpu().contiguous() for k, v in mapper.state_dict().items()}
        seen[kind] = {
            "digest": digest(state),
            "history": {k: v for k, v in hist.items() if isinstance(v, int | float | str) or v is None},
            "training": {
                k: v for k, v in mapper.meta["training"].items() if k.endswith(("_norm", "_spread"))
            },
        }
        if xd.is_main():
            save_file(state, out / f"{kind}.safetensors")
    # a multi-layer source (the runner's source.layers under torchrun): shards of joined rows
    from xferlens.activations.pair_shards import pairs_to_disk

    multi = pairs_to_disk(
        src, tgt, args["texts"], MULTI_LAYERS, TGT_LAYER, out / "pairs_multi", dtype="float32",
        chunk_texts=args["chunk_texts"], shard_rows=args["shard_rows"], batch_size=1, progress=False,
    )  # fmt: skip
    mapper, _ = fit_mapper(multi, "affine", FIT_CONFIGS["affine"], progress=False)
    seen["multi"] = {"rows": len(multi), "src_hook": mapper.src_hook, "d_src": mapper.d_src}
    if xd.is_main():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in mapper.state_dict().items()},
            out / "multi.safetensors",
        )
    if args.get("spec"):
        seen["runner"] = run_spec(args, out / "run")
    seen["library"] = split_and_alone(args, src, tgt, maps["affine"])
    (out / f"rank{xd.rank()}.json").write_text(json.dumps(seen))
    fail_on_rank_1(args, src, tgt, crash=False)


def run_spec(args: dict, folder: Path) -> dict:
    """``xferlens run spec.yaml`` on every rank, counting the model forward passes this rank
    makes in each step (``forwards``: a split step makes some on every rank), then once
    more: the rerun must find every step done and compute nothing on any rank (the step
    functions are replaced by ones that raise)."""
    from transformer_lens import HookedTransformer

    from xferlens import cli, load_model
    from xferlens import distributed as xd
    from xferlens.experiment import run as run_mod

    if xd.is_main():  # fill the model cache first, so ranks never convert into it at once
        for name in (args["src"], args["tgt"]):
            load_model(name, device="cpu", progress=False)
    xd.barrier()
    argv = ["run", args["spec"], "--out", str(folder), "--no-progress", "--device", "cpu"]
    forwards = dict.fromkeys(run_mod.STEPS, 0)
    current: list = [None]
    forward = HookedTransformer.forward

    def counted(self, *a, **kw):
        if current[0] is not None:
            forwards[current[0]] += 1
        return forward(self, *a, **kw)

    def in_step(step, fn):
        def run_step(*a, **kw):
            current[0] = step
            try:
                return fn(*a, **kw)
            finally:
                current[0] = None

        return run_step

    steps = dict(run_mod.STEP_FUNCS)
    run_mod.STEP_FUNCS = {step: in_step(step, fn) for step, fn in steps.items()}
    HookedTransformer.forward = counted
    try:
        first = cli.main(argv)
    finally:
        HookedTransformer.forward = forward
        run_mod.STEP_FUNCS = steps

    def recomputed(*a, **kw):
        raise AssertionError("a finished step was computed again")

    run_mod.STEP_FUNCS = dict.fromkeys(run_mod.STEP_FUNCS, recomputed)
    return {"first_rc": first, "rerun_rc": cli.main(argv), "forwards": forwards}


def split_and_alone(args: dict, src, tgt, mapper) -> dict:
    """Each library function that splits itself, called on every rank as it splits
    (``distributed`` left at None) and alone on this rank's own (``distributed=False``):
    what each returned, as JSON, and the forward passes of the split call on this rank."""
    from transformer_lens import HookedTransformer

    from xferlens.evaluation import evaluate_mappers, evaluate_steering, layer_pair_scores
    from xferlens.steering import diff_of_means

    texts = args["texts"]
    vector = diff_of_means(tgt, texts[:4], texts[4:8], hooks=TGT_LAYER)
    calls = {
        "layer_pair_scores": lambda **kw: layer_pair_scores(src, tgt, texts, progress=False, **kw),
        "evaluate_mappers": lambda **kw: evaluate_mappers(
            {"affine": mapper}, src, tgt, texts[8:], prompts=texts[:2], max_new_tokens=3, progress=False,
            **kw,
        ),
        "evaluate_steering": lambda **kw: evaluate_steering(
            tgt, texts[:5], {"v": vector}, alphas=(2.0,), judge="substring:cat", ppl_texts=texts[5:8],
            max_new_tokens=3, batch_size=1, progress=False, **kw,
        ),
    }  # fmt: skip
    out = {}
    forward = HookedTransformer.forward
    for name, call in calls.items():
        count = [0]

        def counted(self, *a, count=count, **kw):
            count[0] += 1
            return forward(self, *a, **kw)

        HookedTransformer.forward = counted
        try:
            split = call()
        finally:
            HookedTransformer.forward = forward
        alone = call(distributed=False)
        out[name] = {"split": as_json(split), "alone": as_json(alone), "forwards": count[0]}
    return out


def as_json(result):
    """A library result as JSON-like data (numpy arrays as lists)."""
    if isinstance(result, dict):
        return {k: as_json(v) for k, v in result.items()}
    if hasattr(result, "to_dict"):
        return json.loads(json.dumps(result.to_dict(), default=float))
    return {"scores": result.scores.tolist(), "n_rows": result.n_rows, "meta": result.meta}


def fail_on_rank_1(args: dict, src, tgt, *, crash: bool) -> None:
    import xferlens.activations.shards as shards
    from xferlens import distributed as xd

    if xd.rank() == 1:
        real = shards.iter_activations

        def broken(*a, **kw):
            for i, part in enumerate(real(*a, **kw)):
                if i == 1:
                    if crash:
                        os._exit(3)
                    raise RuntimeError("boom: rank 1 lost its disk")
                yield part

        shards.iter_activations = broken
    cache_and_pair(args, src, tgt, Path(args["out"]) / "failed")


def job_crash(args: dict) -> None:
    fail_on_rank_1(args, *load_pair(args), crash=True)


JOBS = {"fit": job_fit, "crash": job_crash}


def main() -> None:
    from xferlens import distributed as xd

    torch.set_num_threads(1)
    job, path = sys.argv[1], sys.argv[2]
    args = json.loads(Path(path).read_text())
    xd.run(JOBS[job], args, device="cpu", timeout_s=120)


if __name__ == "__main__":
    main()
