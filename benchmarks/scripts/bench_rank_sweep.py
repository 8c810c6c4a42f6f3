"""Does a low-rank map carry the refusal vector better? (issue 21) A proxy read without
steering: re-pair the fit prompts of a finished ``fit_on: last`` run, fit ``lowrank`` maps
at fixed ranks beside the affine one, and compare each transferred vector with the target's
own (cosine, length ratio, projection on native's direction over native's length).

    python benchmarks/scripts/bench_rank_sweep.py benchmarks/results/refusal_smollm2_qwen05_variants
"""

import sys
from pathlib import Path

import torch

import xferlens.experiment.run as r
from xferlens.activations import paired_activations
from xferlens.experiment import load_spec
from xferlens.mappers import fit_mapper
from xferlens.steering import load_steering_vector, transfer

RANKS = (2, 4, 8, 16, 32)


def main(folder: Path) -> None:
    spec = load_spec(folder / "spec.yaml")
    torch.manual_seed(spec.seed)
    if spec.source.layers or spec.mapper.fit_sources:
        raise SystemExit(
            f"{spec.name}: a run with source.layers or mapper.fit_sources; give a one-layer, task-fit run"
        )
    sets = r._prompt_sets(spec)
    src, tgt = r._Models(spec, None).get()
    texts = r._chat(tgt, spec, sets["fit_positive"] + sets["fit_negative"])
    pairs = paired_activations(
        src, tgt, texts, spec.source.layer, spec.target.layer, positions="last", progress=False
    )
    v_src = load_steering_vector(folder / "vectors" / "source", src)
    nat = load_steering_vector(folder / "vectors" / "native", tgt)
    n = nat.direction().float()
    print(
        "| map | validation FVU | cosine to native | norm / native's | projection on native / native's norm |"
    )
    print("|---|---|---|---|---|")
    for kind, cfg in [("affine", {}), *[("lowrank", {"rank": k}) for k in RANKS]]:
        m, h = fit_mapper(pairs, kind, cfg, progress=False)
        fvu = (
            h["rank_candidates"][-1]["val_fvu"]
            if kind == "lowrank"
            else min(h["candidates"], key=lambda c: c["val_mse"])["val_fvu"]
        )
        d = transfer(v_src, m).direction().float()
        cos = float(torch.nn.functional.cosine_similarity(d, n, dim=0))
        name = kind if kind == "affine" else f"lowrank, rank {cfg['rank']}"
        print(
            f"| {name} | {fvu:.3f} | {cos:.3f} | {float(d.norm() / n.norm()):.3f} | "
            f"{float(d @ n / n.norm() ** 2):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
