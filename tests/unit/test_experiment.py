"""Experiment specs and the resumable runner, on tiny models (a full run in seconds)."""

import json

import pytest
import yaml

import xferlens.experiment.run as run_mod
import xferlens.models as models
from xferlens import cli
from xferlens.experiment import (
    STEPS,
    RunFolderError,
    SpecError,
    demo_spec,
    load_spec,
    run_experiment,
    save_spec,
    spec_from_dict,
)

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "the",
    "quiet",
    "town",
    "and",
    "birds",
    "sang",
]
CORPUS = [" ".join(WORDS[i % 7 :] + WORDS[: i % 5]) + f" number {i}." for i in range(40)]


def tiny_spec(**over) -> dict:
    d = {
        "name": "tiny",
        "source": {"model": "tiny-src"},
        "target": {"model": "tiny-tgt"},
        "search": {"texts": 6, "depth": [0.0, 1.0]},
        "mapper": {
            "kinds": ["affine", "orthogonal"],
            "use": "affine",
            "fit_texts": 16,
            "report_texts": 3,
            "report_prompts": 0,
        },
        "vector": {
            "task": "custom",
            "train_prompts": 4,
            "chat": False,
            "positive": [f"I hate the rain {i}" for i in range(4)],
            "negative": [f"I love the sun {i}" for i in range(4)],
            "eval_prompts": [f"Tell me about the town {i}" for i in range(3)],
        },
        "evaluation": {
            "prompts": 3,
            "alphas": [1.0, 8.0],
            "max_new_tokens": 3,
            "judge": "substring:the",
            "ppl_texts": 2,
            "batch_size": 3,
        },
        "corpus": CORPUS,
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


@pytest.fixture
def pair(tiny_tl):
    return tiny_tl("qwen2"), tiny_tl("llama")


def test_full_tiny_run_writes_a_report_and_resumes_without_recomputing(pair, tmp_path, monkeypatch):
    spec = spec_from_dict(tiny_spec())
    run = run_experiment(spec, tmp_path / "run", models=pair, progress=False, log=None)
    assert run.complete
    folder = tmp_path / "run"
    status = json.loads((folder / "status.json").read_text())
    assert status["complete"] and status["done"] == list(STEPS)
    for fig in ("layer_pairs", "alpha_sweep", "success_bars", "report_card_affine", "report_card_orthogonal"):
        assert (folder / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    report = (folder / "report.md").read_text()
    for section in ("## Layer pair", "## Mappers", "### Report cards", "## Steering the target", "random"):
        assert section in report
    # the searched pair is the best-scoring one, and is what the mapper was fitted between
    lay = run.results["layers"]
    best = max(max(row) for row in lay["scores"])
    assert lay["score"] == pytest.approx(best)
    # every condition judged every prompt; the controls are there
    rows = run.results["steering"]["rows"]
    assert {r["label"] for r in rows} >= {"none", "native", "transferred", "random"}
    assert all(len(r["completions"]) == 3 for r in rows)
    # a rerun reads every step back: nothing recomputed, no model needed
    monkeypatch.setattr(run_mod, "STEP_FUNCS", {s: None for s in STEPS})
    again = run_experiment(spec, folder, progress=False, log=None)
    assert again.results["steering"] == run.results["steering"]
    assert (folder / "report.md").read_text().split("Steps took")[1] == report.split("Steps took")[1]


def test_an_interrupted_run_has_no_report_and_resumes_at_the_failed_step(pair, tmp_path, monkeypatch):
    spec = spec_from_dict(tiny_spec(name="cut", mapper={"kinds": ["affine"], "report_texts": 2}))
    folder = tmp_path / "cut"
    real = dict(run_mod.STEP_FUNCS)
    calls = []

    def boom(*a, **k):
        raise KeyboardInterrupt("stopped by the user")

    monkeypatch.setattr(run_mod, "STEP_FUNCS", {**real, "vectors": boom})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, folder, models=pair, progress=False, log=None)
    status = json.loads((folder / "status.json").read_text())
    assert status["done"] == ["layers", "mappers", "report_cards"] and not status["complete"]
    assert not (folder / "report.md").exists()  # half results are never reported as whole

    def counted(step):
        def f(*a, **k):
            calls.append(step)
            return real[step](*a, **k)

        return f

    monkeypatch.setattr(run_mod, "STEP_FUNCS", {s: counted(s) for s in STEPS})
    run = run_experiment(spec, folder, models=pair, progress=False, log=None)
    assert calls == ["vectors", "steering"] and run.complete and (folder / "report.md").is_file()


def test_another_spec_into_the_same_folder_is_refused(pair, tmp_path):
    folder = tmp_path / "r"
    run_experiment(
        spec_from_dict(tiny_spec(search={"texts": 0}, source={"layer": 1}, target={"layer": 1})),
        folder,
        models=pair,
        progress=False,
        log=None,
    )
    other = spec_from_dict(tiny_spec(search={"texts": 0}, source={"layer": 0}, target={"layer": 1}))
    with pytest.raises(RunFolderError, match="another spec"):
        run_experiment(other, folder, models=pair, progress=False, log=None)
    assert run_experiment(other, folder, models=pair, overwrite=True, progress=False, log=None).complete


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"mapper": {"kind": ["affine"]}}, "unknown key 'mapper.kind'"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"mapper": {"kinds": ["linear"], "use": "linear"}}, "unknown kind 'linear'.*affine"),
        ({"mapper": {"config": {"affine": {"ridge_grid": 1, "speed": 2}}}}, "mapper.config.affine.*speed"),
        ({"evaluation": {"alphas": ["big"]}}, r"evaluation.alphas\[0\]: expected a number"),
        ({"evaluation": {"judge": "vibes"}}, "evaluation.judge"),
        ({"search": {"texts": 0}}, "set source.layer and target.layer"),
        ({"corpus": CORPUS[:5]}, "corpus: 5 texts"),
        ({"vector": {"task": "sentiment"}}, "vector.task"),
        ({"name": "../up"}, "plain folder name"),
    ],
)
def test_bad_specs_name_the_key(patch, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(tiny_spec(**patch))


def test_impossible_layer_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = {
        "name": "x",
        "source": {"model": "qwen2.5-coder-0.5b-instruct", "layer": 30},
        "target": "qwen2.5-coder-1.5b-instruct",
    }
    with pytest.raises(SpecError, match=r"source.layer: 30 .* \(valid 0..23\)"):
        spec_from_dict(bad)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert cli.main(["run", str(path)]) == 1  # printed, not a traceback
    path.write_text(yaml.safe_dump({**bad, "source": {"model": "qwen2.5-coder-0.5b-instruct", "layr": 3}}))
    with pytest.raises(SpecError, match=f"{path}.*unknown key 'source.layr'"):
        load_spec(path)


def test_spec_yaml_round_trip(tmp_path):
    for spec in (demo_spec(), demo_spec(quick=True), spec_from_dict(tiny_spec())):
        save_spec(spec, tmp_path / "s.yaml")
        back = load_spec(tmp_path / "s.yaml")
        assert back == spec and back.fingerprint() == spec.fingerprint()


def test_cli_run_on_local_model_folders(tiny_hf_folder, tmp_path, capsys):
    """`xferlens run spec.yaml` through the real loading path (local HF folders)."""
    d = tiny_spec(
        name="cli",
        search={"texts": 0},
        mapper={"kinds": ["affine"], "report_texts": 0},
        evaluation={"alphas": [4.0], "ppl_texts": 0},
    )
    d["source"] = {"model": str(tiny_hf_folder("qwen2")), "layer": 1}
    d["target"] = {"model": str(tiny_hf_folder("llama")), "layer": 2}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "transferred" in out and "report:" in out and (tmp_path / "out" / "report.md").is_file()
    # a layer the local folder's config rules out is caught before loading
    d["target"]["layer"] = 9
    path.write_text(yaml.safe_dump(d))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out2")]) == 1
    assert "target.layer: 9 is not a layer" in capsys.readouterr().err


def test_readme_spec_examples_are_valid():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert blocks
    for block in blocks:
        spec_from_dict(yaml.safe_load(block))
