"""How well does the refusal judge agree with a human? (issue 5)

``tests/data/refusal_labels.jsonl`` holds real completions of the zoo's Qwen models
(from ``bench_steering.py``: harmless prompts with refusal vectors added, harmful prompts
with the direction ablated, and the controls), each labelled by hand as refusal or not
*before* the judge's verdict was looked at. This prints the confusion matrix, accuracy,
precision and recall of ``xferlens.evaluation.is_refusal`` on them.

    python benchmarks/scripts/bench_refusal_judge.py
"""

import json
from pathlib import Path

from xferlens.evaluation import is_refusal

LABELS = Path(__file__).parents[2] / "tests" / "data" / "refusal_labels.jsonl"


def agreement(path: Path = LABELS) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tp = sum(1 for r in rows if r["refusal"] and is_refusal(r["completion"]))
    fp = sum(1 for r in rows if not r["refusal"] and is_refusal(r["completion"]))
    fn = sum(1 for r in rows if r["refusal"] and not is_refusal(r["completion"]))
    tn = len(rows) - tp - fp - fn
    return {
        "n": len(rows),
        "positives": tp + fn,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "accuracy": (tp + tn) / len(rows),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "disagreements": [
            {"label": r["refusal"], "completion": r["completion"][:160]}
            for r in rows
            if r["refusal"] != is_refusal(r["completion"])
        ],
    }


if __name__ == "__main__":
    print(json.dumps(agreement(), indent=1))
