"""One spelling for "where in the model": every public argument that names a location
(``hooks=``, ``hook=``, ``src_hook=``, ``layer=``, ``layers=``, ...) takes a layer number
(its ``blocks.{l}.hook_resid_post``) or a hook name, and both give the same result."""

import inspect

import numpy as np
import pytest
import torch
from beartype.door import is_bearable

import xferlens.activations
import xferlens.evaluation
import xferlens.features
import xferlens.mappers
import xferlens.steering
from xferlens.activations import ShardedActivations, cache_activations, cache_to_disk, paired_activations
from xferlens.activations.align import align_sets
from xferlens.activations.cache import ActivationSet
from xferlens.activations.hooks import hook_layer, hook_name, hook_names, resid_post
from xferlens.evaluation import layer_pair_scores, steerability_sweep, substring
from xferlens.mappers import fit_mapper
from xferlens.steering import SafetySwitch, SteeringVector, diff_of_means, steer, transfer

TEXTS = [
    "the cat sat on the mat",
    "a dog ran after the birds",
    "hello there world, one two three",
    "the sky is blue today",
]
POS, NEG = TEXTS[:2], TEXTS[2:]
LOCATION = {
    "hook",
    "hooks",
    "src_hook",
    "tgt_hook",
    "layer",
    "layers",
    "base_layer",
    "src_layers",
    "tgt_layers",
}
#: known exceptions, each with its reason
NOT_YET = {
    # the converter itself
    "resid_post",
}
METHODS = [
    SteeringVector.direction,
    SteeringVector.norm,
    SteeringVector.relative_norm,
    SteeringVector.at,
    ActivationSet.rows,
    ShardedActivations.batches,
    SafetySwitch.fit,
]


def _public_functions():
    for pkg in (
        xferlens.activations,
        xferlens.mappers,
        xferlens.steering,
        xferlens.evaluation,
        xferlens.features,
    ):
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if inspect.isfunction(obj) and name not in NOT_YET:
                yield name, obj
    for m in METHODS:
        yield m.__qualname__, getattr(m, "__func__", m)


def test_every_location_argument_takes_a_layer_number_and_a_hook_name():
    wrong = []
    for name, fn in _public_functions():
        for p in inspect.signature(fn).parameters.values():
            if p.name not in LOCATION or p.annotation is inspect.Parameter.empty:
                continue
            one = p.name.endswith("s")  # a list-taking argument also takes one location
            for value in (2, "blocks.2.hook_resid_pre", *([[1, "blocks.2.attn.hook_z"]] if one else [])):
                if not is_bearable(value, p.annotation):
                    wrong.append(f"{name}({p.name}={value!r}): {p.annotation}")
    assert not wrong, "\n".join(wrong)


def test_hook_name_spells_both():
    assert hook_name(3) == hook_name(np.int64(3)) == hook_name(torch.tensor(3)) == resid_post(3)
    assert hook_name("blocks.1.attn.hook_z") == "blocks.1.attn.hook_z"
    assert hook_names([1, resid_post(1), "hook_embed"]) == [resid_post(1), "hook_embed"]
    assert hook_names(2) == [resid_post(2)]
    assert hook_layer("blocks.12.ln2.hook_normalized") == 12 and hook_layer("hook_embed") is None
    with pytest.raises(ValueError, match="negative"):
        hook_name(-1)
    with pytest.raises(TypeError, match="bool"):
        hook_name(True)
    with pytest.raises(TypeError):  # the annotation refuses it (tests check them at run time)
        hook_name(1.0)


def test_activation_sets_and_pairs_by_number_or_name(tiny_tl, tmp_path):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    a = cache_activations(src, TEXTS, [1, "blocks.2.hook_resid_pre"], progress=False)
    assert torch.equal(a.rows(1), a.rows(resid_post(1)))
    b = cache_activations(tgt, TEXTS, 2, progress=False)
    by_number = align_sets(a, b, 1, 2, "char_end")
    by_name = align_sets(a, b, resid_post(1), resid_post(2), "char_end")
    assert torch.equal(by_number.src, by_name.src) and by_number.meta == by_name.meta
    store = cache_to_disk(src, TEXTS, tmp_path / "acts", [1, 2], shard_rows=20, progress=False)
    (first,) = [next(store.batches(8, hooks=h)) for h in (1,)]
    assert list(first["acts"]) == [resid_post(1)]
    assert torch.equal(
        first["acts"][resid_post(1)], next(store.batches(8, hooks=[resid_post(1)]))["acts"][resid_post(1)]
    )
    with pytest.raises(KeyError, match="not in these shards"):
        next(store.batches(8, hooks=0))


def test_vectors_and_steering_by_number_or_name(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=[1, 2])
    assert torch.equal(v.direction(1), v.direction(resid_post(1))) and v.norm(2) == v.norm(resid_post(2))
    assert v.at(1).hooks == [resid_post(1)]
    with pytest.raises(KeyError, match="no direction"):
        v.direction(0)
    one = v.at(1)
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    runs = []
    for layers in (2, [2], resid_post(2), [resid_post(2)]):
        with steer(model, one, 3.0, layers=layers):
            runs.append(model(tokens))
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    with steer(model, one, 3.0, layers="blocks.2.hook_resid_pre"):
        pre = model(tokens)
    with steer(model, one, 3.0, layers=1):
        post1 = model(tokens)
    torch.testing.assert_close(pre, post1)  # resid_pre of block 2 is resid_post of block 1
    # transfer: the vector's hook and the target hook by number or name
    pairs = paired_activations(model, tiny_tl("qwen2"), TEXTS, 1, 2, progress=False)
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    by_number = transfer(v, mapper, hook=1, tgt_hook=2)
    by_name = transfer(v, mapper, hook=resid_post(1), tgt_hook=resid_post(2))
    assert by_number.hooks == [resid_post(2)]
    assert torch.equal(by_number.direction(), by_name.direction())


def test_layer_search_and_sweep_by_number_or_name(tiny_tl):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    by_number = layer_pair_scores(src, tgt, TEXTS, src_layers=[0, 2], tgt_layers=1, progress=False)
    by_name = layer_pair_scores(
        src, tgt, TEXTS, src_layers=[resid_post(0), 2], tgt_layers=resid_post(1), progress=False
    )
    assert by_name.src_layers == [0, 2] and by_name.tgt_layers == [1]
    np.testing.assert_array_equal(by_number.scores, by_name.scores)
    with pytest.raises(ValueError, match="block outputs"):
        layer_pair_scores(src, tgt, TEXTS, src_layers=["blocks.1.hook_resid_pre"], progress=False)
    judge = substring("a")
    sweep = steerability_sweep(
        src, POS, NEG, ["the cat"], [resid_post(0), "blocks.2.hook_resid_mid"], judge=judge, max_new_tokens=2
    )
    assert sweep.layers == [0, 2] and sweep.meta["hooks"] == [resid_post(0), "blocks.2.hook_resid_mid"]
    with pytest.raises(ValueError, match="no layer"):
        steerability_sweep(src, POS, NEG, ["the cat"], ["hook_embed"], judge=judge, max_new_tokens=2)


def test_safety_switch_by_hook_name(tiny_tl):
    model = tiny_tl("llama")
    switch, _ = SafetySwitch.fit(model, model, TEXTS, resid_post(1), kind="affine", progress=False)
    assert switch.hook_name == resid_post(1)
