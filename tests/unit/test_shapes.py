"""The documented layouts of the public outputs, said with einops beside the jaxtyping
annotations: ``parse_shape`` names every axis, and ``rearrange`` shows how the rows of one
output are the cells of another (a cached row is one ``[batch, pos]`` cell of the model's
own ``[batch, pos, d_model]`` activations)."""

import pytest
import torch
from einops import parse_shape, rearrange

from tests.unit.test_score import OPENINGS, PROMPTS
from xferlens.activations import cache_activations, paired_activations, resid_post
from xferlens.activations.tokens import tokenize
from xferlens.evaluation import dose_response, layer_pair_scores
from xferlens.evaluation.score import steering_scores
from xferlens.features import map_directions
from xferlens.mappers import fit_mapper
from xferlens.steering import diff_of_means, transfer

TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran after 12 birds in the morning",
    "hello there, world: numbers 1 2 3",
    "the sky is blue today and the sea is green",
    "one more text with a few more words in it",
    "owls, foxes and bees live in the old wood",
]
POS, NEG = TEXTS[:3], TEXTS[3:]


@pytest.fixture(scope="module")
def models(tiny_tl):
    return tiny_tl("llama"), tiny_tl("qwen2")


@pytest.fixture(scope="module")
def pairs(models):
    src, tgt = models
    return paired_activations(src, tgt, TEXTS, 1, 2, progress=False)


def test_cached_rows_are_cells_of_the_models_batch_pos_d_model(models):
    model = models[0]
    acts = cache_activations(model, TEXTS, [0, 2], progress=False)
    rows = len(acts)
    for h in acts.hooks:
        assert parse_shape(acts.acts[h], "rows d_model") == {"rows": rows, "d_model": model.cfg.d_model}
    for index in (acts.text_index, acts.position, acts.token_ids):
        assert parse_shape(index, "rows") == {"rows": rows}
    assert parse_shape(acts.char_spans, "rows two") == {"rows": rows, "two": 2}
    # row r is the cell [text_index[r], position[r]] of the [batch, pos, d_model] cache
    hook = resid_post(2)
    for t in (0, 3):
        ids = tokenize(model, [TEXTS[t]]).ids[0]
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=hook)
        cells = rearrange(cache[hook], "1 pos d_model -> pos d_model")
        mine = acts.text_index == t
        torch.testing.assert_close(acts.acts[hook][mine], cells[acts.position[mine]], atol=1e-5, rtol=1e-5)
        assert acts.token_ids[mine].tolist() == [ids[p] for p in acts.position[mine].tolist()]


def test_pairs_are_src_and_tgt_rows_of_the_same_tokens(models, pairs):
    src, tgt = models
    n = len(pairs)
    assert parse_shape(pairs.src, "rows d_src") == {"rows": n, "d_src": src.cfg.d_model}
    assert parse_shape(pairs.tgt, "rows d_tgt") == {"rows": n, "d_tgt": tgt.cfg.d_model}
    for index in (pairs.text_index, pairs.src_position, pairs.tgt_position):
        assert parse_shape(index, "rows") == {"rows": n}


@pytest.mark.parametrize("kind", ["affine", "orthogonal", "autoencoder"])
def test_a_mapper_maps_batch_pos_d_as_it_maps_rows(pairs, kind):
    config = {"max_epochs": 2} if kind == "autoencoder" else None
    mapper, _ = fit_mapper(pairs, kind, config, progress=False)
    x = torch.randn(3, 5, mapper.d_src, generator=torch.Generator().manual_seed(0))
    y = mapper(x)
    assert parse_shape(y, "b p d_tgt") == {"b": 3, "p": 5, "d_tgt": mapper.d_tgt}
    flat = mapper(rearrange(x, "b p d_src -> (b p) d_src"))
    assert parse_shape(flat, "rows d_tgt") == {"rows": 15, "d_tgt": mapper.d_tgt}
    torch.testing.assert_close(y, rearrange(flat, "(b p) d_tgt -> b p d_tgt", b=3), atol=1e-6, rtol=1e-5)
    # a single direction is one d_src vector in, one d_tgt vector out
    v = x[0, 0]
    out = mapper.map_direction(v, pairs.src)
    assert parse_shape(out, "d_tgt") == {"d_tgt": mapper.d_tgt}
    dirs = map_directions(rearrange(x, "b p d_src -> (b p) d_src")[:4], mapper, source_rows=pairs.src)
    assert parse_shape(dirs, "n d_tgt") == {"n": 4, "d_tgt": mapper.d_tgt}


def test_steering_vectors_are_one_d_model_direction_per_hook(models, pairs):
    src, tgt = models
    v = diff_of_means(src, POS, NEG, hooks=[1, 2])
    assert v.hooks == [resid_post(1), resid_post(2)]
    for d in v.directions.values():
        assert parse_shape(d, "d_model") == {"d_model": src.cfg.d_model}
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    moved = transfer(v.at(resid_post(1)), mapper)
    assert parse_shape(moved.direction(), "d_tgt") == {"d_tgt": tgt.cfg.d_model}


def test_dose_response_scores_are_alphas_by_prompts(models):
    model = models[0]
    v = diff_of_means(model, POS, NEG, hooks=1)
    alphas = [1.0, 4.0]
    dr = dose_response(model, PROMPTS, {"v": v}, alphas, OPENINGS, batch_size=2, progress=False)
    assert dr.labels == ["v", "random"]
    assert parse_shape(dr.none, "prompts") == {"prompts": len(PROMPTS)}
    for lab in dr.labels:
        assert parse_shape(dr.scores[lab], "alphas prompts") == {"alphas": 2, "prompts": len(PROMPTS)}
        assert parse_shape(dr.curve(lab), "alphas_and_none") == {"alphas_and_none": 3}
    # row j of a condition's scores is alpha j (each prompt scored on its own, as a reference)
    for j, a in enumerate(alphas):
        one = steering_scores(model, PROMPTS, OPENINGS, vector=v, alpha=a, batch_size=1)
        torch.testing.assert_close(torch.as_tensor(dr.scores["v"][j]), one.double(), atol=1e-4, rtol=1e-4)
    idx = dr._boot_idx(7, 0)
    assert parse_shape(dr.curve("v", idx), "boot alphas_and_none") == {"boot": 7, "alphas_and_none": 3}


def test_layer_scores_are_src_layers_by_tgt_layers(models):
    src, tgt = models
    ls = layer_pair_scores(src, tgt, TEXTS, src_layers=[0, 2], tgt_layers=[0, 1, 2], progress=False)
    assert parse_shape(ls.scores, "src_layers tgt_layers") == {"src_layers": 2, "tgt_layers": 3}
