"""Every report has ``to_markdown()``, ``to_frame()`` and ``plot()``, and its frame holds the
markdown table's rows (same order, same labels, same figures)."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from xferlens.evaluation import DoseResponse, LayerScores, LayerSweep, MapperReport, SteeringReport
from xferlens.evaluation.diagnostics import TransferDiagnostics
from xferlens.features import FeatureTransfer
from xferlens.types import Report


def table_rows(md: str) -> list[list[str]]:
    """Cells of the markdown's first table (the rows under its ``|---|`` line)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("*") for c in line.strip().strip("|").split("|")])
    return rows


def steering_report() -> SteeringReport:
    rows = []
    for label, alpha, k in [("none", 0.0, 1), ("native", 2.0, 3), ("random", 2.0, 0), ("native", 4.0, 4)]:
        rows.append(
            {
                "label": label,
                "alpha": alpha,
                "norm": None if label == "none" else 3.5,
                "rate": k / 4,
                "ci": (max(0.0, k / 4 - 0.2), min(1.0, k / 4 + 0.2)),
                "n": 4,
                "hits": [i < k for i in range(4)],
                "completions": ["a", "b", "c", "d"],
                "perplexity": 10.0 + alpha,
            }
        )
    return SteeringReport(rows, {"model": "m", "mode": "add", "judge": "refusal", "n_prompts": 4})


def mapper_report() -> MapperReport:
    recon = {
        "mapped": {"mse": 0.1, "cosine": 0.9, "fvu": 0.2},
        "mean_ablation": {"mse": 0.5, "cosine": 0.4, "fvu": 1.0},
        "random_map": {"mse": 1.1, "cosine": 0.0, "fvu": 2.0},
    }
    patch = {
        "clean": {"ce": 3.0},
        "mapped": {"ce": 3.1, "kl": 0.2},
        "mean_ablation": {"ce": 3.6, "kl": 0.9},
        "random_map": {"ce": 4.0, "kl": 1.5},
    }
    meta = {"kind": "affine", "n_params": 10, "src": "a L1", "tgt": "b L2"}
    gens = [{"prompt": "p", "clean": "x y", "patched": "x z", "rouge_l": 0.5}]
    return MapperReport(meta, 3, 40, {"src": 1.0, "tgt": 1.0}, recon, patch, 1.0, 37, gens)


def dose_response() -> DoseResponse:
    rng = np.random.default_rng(0)
    alphas = [1.0, 2.0, 4.0]
    scores = {
        "native": rng.normal(size=(3, 20)) + np.array([[0.5], [1.0], [2.0]]),
        "random": rng.normal(size=(3, 20)),
    }
    return DoseResponse(alphas, rng.normal(size=20), scores, {"openings": "refusal", "model": "m"})


def feature_transfer() -> FeatureTransfer:
    g = torch.Generator().manual_seed(0)
    n = 12
    return FeatureTransfer(
        features=torch.arange(n),
        partner=torch.arange(n),
        cosine=torch.rand(n, generator=g),
        act_corr=torch.rand(n, generator=g),
        random_partner=torch.arange(n),
        random_cosine=torch.rand(n, generator=g) / 3,
        random_act_corr=torch.rand(n, generator=g) / 3,
        n_source_features=20,
    )


def diagnostics() -> TransferDiagnostics:
    return TransferDiagnostics(128.0, 0.8, 1.4, 0.9, round_trip_cosine=0.95, round_trip_length=0.7)


REPORTS = {
    "steering": steering_report,
    "sweep": lambda: LayerSweep([2, 4, 6], [0.25, 0.75, 0.5], 0.0, {"judge": "refusal", "alpha": 2}),
    "layers": lambda: LayerScores(
        np.array([[0.9, 0.5, 0.1], [0.4, 0.95, 0.3]]), [1, 3], [0, 2, 4], "cka", "a", "b", 100
    ),
    "mapper": mapper_report,
    "dose": dose_response,
    "features": feature_transfer,
    "feature_rates": lambda: feature_transfer().table(),
    "dose_difference": lambda: dose_response().difference("native", "random", n_boot=50),
    "diagnostics": diagnostics,
}


@pytest.mark.parametrize("name", list(REPORTS))
def test_every_report_has_markdown_frame_and_plot(name):
    report = REPORTS[name]()
    assert isinstance(report, Report)
    frame = report.to_frame()
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == len(table_rows(report.to_markdown()))
    fig = report.plot()
    assert isinstance(fig, matplotlib.figure.Figure)
    plt.close(fig)


def test_steering_frame_rows_are_the_markdown_rows():
    rep = steering_report()
    md, frame = table_rows(rep.to_markdown()), rep.to_frame()
    assert [r[0] for r in md] == frame["label"].tolist()
    assert [r[3] for r in md] == [f"{x:.1%}" for x in frame["rate"]]
    assert [r[6] for r in md] == [f"{x:.2f}" for x in frame["perplexity"]]
    assert frame["ci_low"].tolist() == [r["ci"][0] for r in rep.rows]
    assert frame.loc[0, "alpha"] == 0.0 and pd.isna(frame.loc[0, "norm"])


def test_sweep_and_layer_frames_are_the_markdown_rows():
    sweep = REPORTS["sweep"]()
    md, frame = table_rows(sweep.to_markdown()), sweep.to_frame()
    assert [r[0] for r in md] == ["2", "4", "6", "none"]
    assert frame["layer"].tolist()[:3] == [2, 4, 6] and pd.isna(frame["layer"].iloc[3])
    assert [r[1] for r in md] == [f"{x:.0%}" for x in frame["rate"]]
    ls = REPORTS["layers"]()
    md, frame = table_rows(ls.to_markdown()), ls.to_frame()
    assert [r[0] for r in md] == [str(x) for x in frame.index]
    assert [[float(c) for c in r[1:]] for r in md] == np.round(frame.to_numpy(), 3).tolist()
    assert frame.loc[3, 2] == ls.score(3, 2)
    assert "**0.950**" in ls.to_markdown()  # the best source for target layer 2


def test_mapper_frame_rows_are_the_markdown_rows():
    rep = mapper_report()
    md, frame = table_rows(rep.to_markdown()), rep.to_frame()
    assert [r[0] for r in md] == [c.replace("_", " ") for c in frame["replacement"]]
    for col, j in (("fvu", 1), ("cosine", 2), ("ce", 3), ("kl", 4)):
        assert [r[j] for r in md] == [f"{x:.3f}" for x in frame[col]]
    assert frame.set_index("replacement").loc["mapped", "mse"] == 0.1


def test_dose_frame_rows_are_the_markdown_rows():
    dr = dose_response()
    md, frame = table_rows(dr.to_markdown(n_boot=50)), dr.to_frame(n_boot=50)
    assert [r[0] for r in md] == frame.index.tolist() == ["none", "native", "random"]
    assert list(frame["mean"].columns) == dr.alphas
    np.testing.assert_array_equal(frame["mean"].loc["native"].to_numpy(), dr.curve("native")[1:])
    for r, lab in zip(md[1:], dr.labels, strict=True):
        row = frame.loc[lab]
        cells = [
            f"{row['mean', a]:.2f} [{row['ci_low', a]:.2f}, {row['ci_high', a]:.2f}] (P {row['p', a]:.2f})"
            for a in dr.alphas
        ]
        assert r[1:] == cells
    assert md[0][1].startswith(f"{frame.loc['none', ('mean', 1.0)]:.2f} [")


def test_feature_frame_rows_are_the_markdown_rows():
    ft = feature_transfer()
    md, frame = table_rows(ft.to_markdown()), ft.to_frame()
    assert [r[0] for r in md] == [f"{t:g}" for t in frame["threshold"]]
    assert [r[1] for r in md] == [f"{x:.1%}" for x in frame["cosine"]]
    assert frame.to_dict("records") == ft.table().to_dict()


def test_dose_difference_frame_rows_are_the_markdown_rows():
    dd = REPORTS["dose_difference"]()
    md, frame = table_rows(dd.to_markdown()), dd.to_frame()
    assert [r[0] for r in md] == [f"{a:g}" for a in frame["alpha"]]
    assert [r[1] for r in md] == [f"{x:.2f}" for x in frame["diff"]]
    ci = zip(frame["ci_low"], frame["ci_high"], strict=True)
    assert [r[2] for r in md] == [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in ci]
    assert [{"alpha": a, "diff": d, "ci": (lo, hi)} for a, d, lo, hi in frame.itertuples(index=False)] == (
        dd.to_dict()
    )


def test_diagnostics_frame_is_the_markdown_row():
    dg = diagnostics()
    (row,) = table_rows(dg.to_markdown())
    frame = dg.to_frame()
    assert row == ["0.950", "0.700", "0.800", "1.400", "0.900", "-", "-"]
    assert list(frame.columns) == list(dg.to_dict()) and len(frame) == 1
    assert frame[["cosine_to_native", "native_probe_spearman"]].isna().all(axis=None)
    assert frame.drop(columns=["cosine_to_native", "native_probe_spearman"]).iloc[0].to_dict() == {
        k: v for k, v in dg.to_dict().items() if k not in ("cosine_to_native", "native_probe_spearman")
    }
