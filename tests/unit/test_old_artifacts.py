"""Artifacts written before ``ModelId`` (tests/data/old_artifacts, see
tests/helpers/old_artifacts.py) still load, still belong to the models that made them,
and still refuse other models."""

import warnings

import pytest
import torch

from tests.helpers.old_artifacts import FOLDER, HOOK, TEXTS, fixture_model, fixture_models
from xferlens.activations import PairShards, ShardedActivations, align_sets, cache_activations
from xferlens.activations.cache import load_activation_set, model_meta
from xferlens.errors import ModelMismatchError
from xferlens.features import SAEMismatchError, load_sae
from xferlens.identity import ModelId, check, loaded_from, remember_source
from xferlens.mappers import MapperMismatchError, fit_mapper, load_mapper
from xferlens.steering import SteeringMismatchError, load_steering_vector, transfer


@pytest.fixture(scope="module")
def models():
    a, b = fixture_models()
    impostor = fixture_model(salt=0.5)  # a's name, shapes and tokenizer; other weights
    return a, b, impostor


def test_the_fixture_models_are_the_ones_that_wrote_the_artifacts(models):
    a, b, impostor = models
    header = (FOLDER / "vector" / "vector.json").read_text()
    assert ModelId.of(a).weights in header and ModelId.of(a).tokenizer in header
    assert ModelId.of(impostor).weights != ModelId.of(a).weights
    assert ModelId.of(impostor).name == ModelId.of(a).name


def test_old_mapper_loads_and_refuses_other_weights(models):
    a, b, impostor = models
    mapper = load_mapper(FOLDER / "mapper", a, b)
    assert ModelId.read(mapper.meta, "src") == ModelId.of(a)
    assert ModelId.read(mapper.meta, "tgt") == ModelId.of(b)
    with pytest.raises(MapperMismatchError, match="source weights.*Pass force=True") as e:
        load_mapper(FOLDER / "mapper", impostor, b)
    assert isinstance(e.value, ModelMismatchError) and isinstance(e.value, ValueError)
    with pytest.warns(UserWarning, match="NOT FITTED FOR"):
        load_mapper(FOLDER / "mapper", impostor, b, force=True)


def test_old_vector_loads_refuses_and_transfers_with_the_old_mapper(models):
    a, b, impostor = models
    v = load_steering_vector(FOLDER / "vector", a)
    assert ModelId.read(v.model) == ModelId.of(a)
    with pytest.raises(SteeringMismatchError, match="model weights: recorded 'params:"):
        load_steering_vector(FOLDER / "vector", impostor)
    with pytest.warns(UserWarning, match="ANOTHER MODEL"):
        load_steering_vector(FOLDER / "vector", impostor, force=True)
    moved = transfer(v, load_mapper(FOLDER / "mapper"))
    assert moved.direction(HOOK).shape == (24,) and ModelId.read(moved.model).name == "old-fixture-b"
    foreign = load_steering_vector(FOLDER / "vector")
    foreign.model["weights"] = "params:someone-else"
    with pytest.raises(SteeringMismatchError, match="source model weights"):
        transfer(foreign, load_mapper(FOLDER / "mapper"))


def test_old_sae_loads_and_refuses_other_weights(models):
    a, _, impostor = models
    sae = load_sae(FOLDER / "sae", a)
    assert ModelId.read(sae.model) == ModelId.of(a)
    with pytest.raises(SAEMismatchError, match="trained on old-fixture-a"):
        load_sae(FOLDER / "sae", impostor)


def test_old_activations_and_pairs_keep_their_identity(models):
    a, b, impostor = models
    sets = {
        "activation set": load_activation_set(FOLDER / "activation_set"),
        "shards": ShardedActivations(FOLDER / "shards").load(),
    }
    for what, acts in sets.items():
        assert "fingerprint" in acts.meta  # the old spelling, read as the weights
        recorded = ModelId.read(acts.meta)
        assert recorded == ModelId.of(a), what
        recorded.check(a, what=what)
        with pytest.raises(ModelMismatchError, match="model weights"):
            recorded.check(impostor, what=what)
    pairs = PairShards(FOLDER / "pairs").load()
    src, tgt = ModelId.read(pairs.meta, "src"), ModelId.read(pairs.meta, "tgt")
    assert src == ModelId.of(a) and tgt == ModelId.of(b)
    with pytest.raises(ModelMismatchError, match="source weights.*target name"):
        check("these pairs", [("source", src, impostor), ("target", tgt, a)])
    # pairs from old sets, and a mapper fitted on old pairs, carry the same identities
    again = align_sets(sets["activation set"], sets["shards"], HOOK, HOOK, "position")
    assert ModelId.read(again.meta, "src") == ModelId.of(a)
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    assert mapper.meta["src"] == {**ModelId.of(a).to_dict(), "hook": HOOK}
    mapper.check_models(a, b)
    with pytest.raises(MapperMismatchError, match="source weights"):
        mapper.check_models(impostor, b)


def test_new_activations_write_one_spelling_and_match_the_old(models):
    a, *_ = models
    meta = model_meta(a)
    assert "weights" in meta and "fingerprint" not in meta
    new = cache_activations(a, TEXTS, HOOK, progress=False)
    old = load_activation_set(FOLDER / "activation_set")
    assert ModelId.read(new.meta) == ModelId.read(old.meta)
    torch.testing.assert_close(new.acts[HOOK], old.acts[HOOK])


def test_identity_lives_in_side_tables_not_on_the_objects(models):
    a, *_ = models
    probe = fixture_model("old-fixture-probe")
    assert loaded_from(probe) == {}
    remember_source(probe, "folder:test", folder="/nowhere")
    assert ModelId.of(probe).weights == "folder:test" and loaded_from(probe)["folder"] == "/nowhere"
    assert not any(k.startswith(("xferlens", "_xferlens")) for k in vars(probe))
    assert not any(k.startswith("_xferlens") for k in vars(probe.tokenizer))
    ModelId.of(a)  # fills the tables for a; nothing is set on it either
    assert not any(k.startswith(("xferlens", "_xferlens")) for k in vars(a))


def test_unrecorded_fields_are_not_compared_and_force_is_offered_only_where_asked(models):
    a, *_ = models
    ModelId(name="old-fixture-a").check(a, what="x")  # weights etc. unknown: not compared
    with pytest.raises(ModelMismatchError) as e:
        ModelId(name="other").check(a, what="x")
    assert "force" not in str(e.value)
    with pytest.raises(ModelMismatchError, match="Pass force=True"):
        ModelId(name="other").check(a, what="x", force=False)
    with pytest.raises(ModelMismatchError, match="hook"):  # blocking: force cannot override
        ModelId(name="old-fixture-a").check(a, what="x", blocking=["hook missing"], force=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ModelId(name="other").check(a, what="x", force=True)
    assert len(caught) == 1 and "x: model name" in str(caught[0].message)
