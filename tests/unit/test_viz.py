"""Token-level pictures: values against a hand-written hook, exports that open offline."""

import pytest
import torch

from xferlens.activations import resid_post
from xferlens.steering import diff_of_means
from xferlens.viz import next_token_shift, projection_view, side_by_side, token_projections

POS = ["the cat sat on the mat", "a dog ran"]
NEG = ["numbers 1 2 3", "x y z"]


def test_token_projections_equal_a_hand_hook(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    text = "birds sing in the morning"
    toks, vals = token_projections(model, text, v)
    seen = {}

    def record(x, hook):
        seen["x"] = x.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(model.to_tokens(text), fwd_hooks=[(resid_post(1), record)])
    d = v.direction() / v.direction().norm()
    torch.testing.assert_close(vals, seen["x"][0] @ d)
    assert toks == model.to_str_tokens(text)
    with pytest.raises(ValueError, match="hook="):
        token_projections(model, text, torch.ones(model.cfg.d_model))
    with pytest.raises(ValueError, match="does not exist"):
        token_projections(model, text, torch.ones(model.cfg.d_model), hook="blocks.1.hook_nothing")


def test_views_export_html_and_png(tiny_tl, tmp_path):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    vs, vt = diff_of_means(src, POS, NEG, hooks=1), diff_of_means(tgt, POS, NEG, hooks=1)
    view = side_by_side(src, tgt, "the cat sat", vs, vt)
    assert len(view.panels) == 2
    assert view.panels[0].tokens == src.to_str_tokens("the cat sat")[1:]  # first token dropped
    assert max(abs(x) for x in view.panels[1].values) == pytest.approx(1.0)
    page = view.save(tmp_path / "v.html").read_text()
    assert "ColoredTokens" in page and "CircuitsVis" in page and "cdn" not in page.split("<script")[0]
    assert (tmp_path / "v.png").exists() is False
    assert view.save(tmp_path / "v.png").stat().st_size > 1000
    assert "<div" in view._repr_html_()
    with pytest.raises(ValueError, match=".html"):
        view.save(tmp_path / "v.txt")
    single = projection_view(src, "a dog", vs)
    assert len(single.panels) == 1


def test_next_token_shift_is_zero_at_alpha_zero_and_sorted(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    flat = next_token_shift(model, "the cat", v, alpha=0.0, k=5)
    assert all(d == 0.0 for d in flat.meta["delta"])
    view = next_token_shift(model, "the cat", v, alpha=8.0, k=5)
    up, down = view.panels[0].values, view.panels[1].values
    assert up == sorted(up, reverse=True) and down == sorted(down)
    assert up[0] > 0 > down[0]
    b, a = view.meta["logprob_before"], view.meta["logprob_after"]
    assert view.meta["delta"] == pytest.approx([y - x for x, y in zip(b, a, strict=True)], abs=1e-5)
