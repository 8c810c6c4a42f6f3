"""The safety switch on tiny models: a "fine-tune" whose change is exactly undone by an
affine map at one hook, so switched logits must equal the base model's."""

import copy

import pytest
import torch

from xferlens.activations import paired_activations
from xferlens.identity import remember_source
from xferlens.mappers import MapperMismatchError, fit_mapper
from xferlens.steering import SafetySwitch, latency_per_token, load_switch

_rng = __import__("random").Random(0)
# varied characters, so the rows span the whole 64-dim space and the affine fit is exact
TEXTS = [
    "".join(
        _rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-()'\"")
        for _ in range(60)
    )
    for _ in range(40)
]
HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def base_and_finetuned(tiny_tl):
    base = tiny_tl("llama")
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(3)
    d = base.cfg.d_model
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d**0.5
    with torch.no_grad():  # the "fine-tune": an invertible linear change of the embedding
        ft.embed.W_E.copy_(base.embed.W_E @ mix)
    remember_source(ft, "finetuned-test")  # a fine-tune is other weights
    return base, ft


@pytest.fixture(scope="module")
def switch(base_and_finetuned):
    base, ft = base_and_finetuned
    pairs = paired_activations(ft, base, TEXTS, HOOK, HOOK, progress=False)
    mapper, _ = fit_mapper(pairs, "affine", {"ridge": 0.0}, progress=False)
    return SafetySwitch(mapper)


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_switch_turns_the_finetune_back_into_its_base(base_and_finetuned, switch):
    base, ft = base_and_finetuned
    tokens = base.to_tokens(["a sentence the map never saw, 12345"])
    want = base(tokens)
    plain = ft(tokens)
    assert (plain - want).abs().max() > 1e-2  # the fine-tune changed the model
    with switch.on(ft):
        got = ft(tokens)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    assert no_hooks_left(ft)
    torch.testing.assert_close(ft(tokens), plain)  # off again after the block


def test_switch_equals_a_hand_written_replacement_hook(base_and_finetuned, switch):
    _, ft = base_and_finetuned
    tokens = ft.to_tokens(["another one"])

    def replace(act, hook):
        return switch.mapper(act)

    want = ft.run_with_hooks(tokens, fwd_hooks=[(HOOK, replace)])
    with switch.on(ft):
        torch.testing.assert_close(ft(tokens), want)


def test_installed_switch_toggles_survives_reset_and_removes(base_and_finetuned, switch):
    base, ft = base_and_finetuned
    tokens = ft.to_tokens(["toggle me"])
    plain, want = ft(tokens), base(tokens)
    handle = switch.install(ft)
    try:
        ft.reset_hooks()  # a user's reset must not pull the switch out
        torch.testing.assert_close(ft(tokens), want, atol=2e-3, rtol=1e-3)
        switch.enabled = False
        torch.testing.assert_close(ft(tokens), plain)
        switch.enabled = True
        torch.testing.assert_close(ft(tokens), want, atol=2e-3, rtol=1e-3)
    finally:
        handle.remove()
    assert no_hooks_left(ft)
    torch.testing.assert_close(ft(tokens), plain)


def test_exception_inside_the_block_leaves_no_hook(base_and_finetuned, switch):
    _, ft = base_and_finetuned
    with pytest.raises(RuntimeError, match="boom"), switch.on(ft):
        raise RuntimeError("boom")
    assert no_hooks_left(ft)


def test_wrong_model_and_wrong_shape_are_refused(base_and_finetuned, switch, tiny_tl):
    base, _ = base_and_finetuned
    with pytest.raises(MapperMismatchError, match="weights"):
        switch.install(base)  # the map reads the fine-tune, not the base
    with pytest.raises(MapperMismatchError, match="d_src == d_tgt"):
        from xferlens.mappers import AffineMapper

        m = AffineMapper(64, 32)
        m.meta = {"src": {"hook": HOOK}, "tgt": {"hook": HOOK}}
        SafetySwitch(m)
    assert no_hooks_left(base)


def test_save_load_and_fit_round_trip(base_and_finetuned, switch, tmp_path):
    base, ft = base_and_finetuned
    switch.save(tmp_path / "sw")
    again = load_switch(tmp_path / "sw", ft)
    tokens = ft.to_tokens(["saved and loaded"])
    with switch.on(ft):
        a = ft(tokens)
    with again.on(ft):
        torch.testing.assert_close(ft(tokens), a)
    with pytest.raises(MapperMismatchError):
        load_switch(tmp_path / "sw", base)
    fitted, history = SafetySwitch.fit(ft, base, TEXTS, 1, kind="affine", progress=False)
    assert fitted.hook_name == "blocks.1.hook_resid_post" and fitted.n_params == 64 * 64 + 64
    assert repr(fitted).endswith(", on)")
    fitted.enabled = False
    assert repr(fitted).endswith(", off)")


def test_latency_per_token_is_measured_with_and_without(base_and_finetuned, switch):
    _, ft = base_and_finetuned
    off = latency_per_token(ft, ["one prompt", "two prompts here"], None, max_new_tokens=4, repeats=1)
    on = latency_per_token(ft, ["one prompt", "two prompts here"], switch, max_new_tokens=4, repeats=1)
    assert off > 0 and on > 0
    assert no_hooks_left(ft)
    with pytest.raises(ValueError, match="empty"):
        latency_per_token(ft, [], switch)
