"""Judged confirmation for a finished run that was made without one.

    python benchmarks/scripts/confirm_run.py benchmarks/results/refusal_qwen_shrinkage --prompts 100 --alpha 1

Runs the runner's own confirmation step (``xferlens.experiment.run._confirmation``: greedy
generations judged by the spec's judge, none / every target vector / random, on the first
``--prompts`` of the run's held-out prompts) with the run's spec, models and vectors, and
writes ``confirmation_extra.json`` beside the run's files (the run folder itself is left as
it was, so its fingerprint and report still describe the run).
"""

import argparse
import dataclasses
import json
from pathlib import Path

from xferlens.experiment import load_spec
from xferlens.experiment import run as r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=1.0)
    args = ap.parse_args()
    spec = load_spec(args.folder / "spec.yaml")
    sets = r._prompt_sets(spec)
    spec = dataclasses.replace(
        spec,
        evaluation=dataclasses.replace(
            spec.evaluation, confirm_prompts=args.prompts, confirm_alphas=[args.alpha]
        ),
    )
    results = {"scores": json.loads((args.folder / "scores.json").read_text())}
    out = r._confirmation(spec, args.folder, r._Models(spec, None), results, sets, set(sets["eval"]), True)
    (args.folder / "confirmation_extra.json").write_text(json.dumps(out, indent=1, default=float))
    for row in out["rows"]:
        print(row["label"], row.get("alpha"), f"{row['rate']:.0%}", row.get("ci"), row.get("n"))
    print("agreement", out["agreement"])


if __name__ == "__main__":
    main()
