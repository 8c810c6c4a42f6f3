"""`xferlens demo --quick`: the main job end to end on the real default models, smoke size."""

import json
import time

import pytest

from xferlens import cli
from xferlens.experiment import STEPS, demo_spec


@pytest.mark.slow
def test_quick_demo_writes_a_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo-quick"
    t0 = time.perf_counter()
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    first = time.perf_counter() - t0
    printed = capsys.readouterr().out
    for label in ("none", "native", "transferred", "random"):
        assert label in printed  # the summary table
    status = json.loads((out / "status.json").read_text())
    assert status["complete"] and status["done"] == list(STEPS)
    report = (out / "report.md").read_text()
    assert "qwen2.5-coder-0.5b-instruct" in report and "### Side-by-side completions" in report
    assert report.splitlines()[2].startswith("**Result.**") and "native-equivalent dose" in report
    for fig in ("layer_pairs", "report_card_affine", "dose_response", "confirmation_bars"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 5000
    spec = demo_spec(quick=True)
    scores = json.loads((out / "scores.json").read_text())
    dr = scores["dose_response"]
    assert len(dr["none"]) == spec.evaluation.prompts
    assert all(len(v) == len(spec.evaluation.alphas) for v in dr["scores"].values())
    # the native vector raises the refusal score over the unsteered model at the top alpha
    assert sum(dr["scores"]["native"][-1]) > sum(dr["none"])
    conf = json.loads((out / "confirmation.json").read_text())
    n = spec.evaluation.confirm_prompts
    # every condition generated for every confirmation prompt; a steered reply may be empty
    # (the model can end its turn at once), the unsteered model's replies are not
    assert all(len(r["completions"]) == n for r in conf["rows"])
    assert all(c.strip() for r in conf["rows"] if r["label"] == "none" for c in r["completions"])
    # a rerun resumes from the folder: no model is loaded, nothing recomputed
    t0 = time.perf_counter()
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "done earlier" in capsys.readouterr().out
    assert time.perf_counter() - t0 < min(20.0, first / 3)
