"""Multi-layer sources: several source layers side by side into one target layer (issue 21)."""

import pytest
import torch

from xferlens.activations import cache_activations, paired_activations
from xferlens.activations.hooks import joined_hook, split_hook
from xferlens.evaluation import evaluate_mappers
from xferlens.mappers import MapperMismatchError, fit_mapper, load_mapper
from xferlens.steering import diff_of_means, transfer
from xferlens.steering.transfer import SteeringMismatchError

TEXTS = [f"the {w} sat on the mat and the {v} ate {i} apples" for i, (w, v) in enumerate(
    [("cat", "rat"), ("dog", "cow"), ("hat", "pig"), ("owl", "cat"), ("fox", "dog"), ("bee", "hat")] * 3
)]  # fmt: skip
HELD_OUT = [
    "an owl and a cat sat in the hat",
    "the fox ate the apple then the bee",
    "a dog, a pig and 12 cows",
]


def test_joined_hook_names():
    assert joined_hook([1, 2]) == "blocks.1.hook_resid_post+blocks.2.hook_resid_post"
    assert joined_hook(2) == "blocks.2.hook_resid_post"
    assert split_hook(joined_hook([2, 1])) == ["blocks.2.hook_resid_post", "blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match="empty part"):
        split_hook("blocks.1.hook_resid_post+")


def test_multi_layer_pairs_are_the_single_layer_pairs_side_by_side(tiny_tl):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    both = paired_activations(src, tgt, TEXTS, [2, 1], 1, progress=False)
    one = {layer: paired_activations(src, tgt, TEXTS, layer, 1, progress=False) for layer in (1, 2)}
    assert both.meta["src_hook"] == "blocks.2.hook_resid_post+blocks.1.hook_resid_post"
    assert both.d_src == 2 * src.cfg.d_model
    torch.testing.assert_close(both.src, torch.cat([one[2].src, one[1].src], dim=-1))
    torch.testing.assert_close(both.tgt, one[1].tgt)
    assert torch.equal(both.text_index, one[1].text_index)


def test_a_multi_layer_map_carries_a_vector_at_both_layers(tiny_tl, tmp_path):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, [1, 2], 1, progress=False)
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    mapper.save(tmp_path / "m")
    mapper = load_mapper(tmp_path / "m", src, tgt)  # the source's width counts once per hook
    assert mapper.src_hook == "blocks.1.hook_resid_post+blocks.2.hook_resid_post"
    v = diff_of_means(src, TEXTS[:4], TEXTS[4:8], [1, 2])
    t = transfer(v, mapper)
    want = mapper.map_direction(torch.cat([v.direction(1), v.direction(2)]).float())
    torch.testing.assert_close(t.direction().float(), want)
    assert t.hook == "blocks.1.hook_resid_post"
    with pytest.raises(SteeringMismatchError, match="width|hook"):
        transfer(v.at(1), mapper)  # a direction at one of the two layers is not enough
    # the source width counts once per hook: a map claiming three hooks does not fit this model
    mapper.meta["src"]["hook"] = joined_hook([0, 1, 2])
    with pytest.raises(MapperMismatchError, match="at each of 3 hooks"):
        mapper.check_models(src, tgt)


def test_report_card_of_a_multi_layer_map_reads_both_layers(tiny_tl):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, [1, 2], 1, progress=False)
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    card = evaluate_mappers(
        {"two": mapper}, src, tgt, HELD_OUT, prompts=HELD_OUT[:1], max_new_tokens=2, progress=False
    )["two"]
    held = paired_activations(src, tgt, HELD_OUT, [1, 2], 1, progress=False)
    with torch.no_grad():
        pred = mapper(held.src)
    sse = float(((pred - held.tgt) ** 2).sum())
    sst = float(((held.tgt - held.tgt.mean(0)) ** 2).sum())
    assert card.reconstruction["mapped"]["fvu"] == pytest.approx(sse / sst, rel=1e-4)
    assert len(card.generations) == 1
    rows = cache_activations(src, HELD_OUT, [1, 2], progress=False)
    assert rows.hooks == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
