"""Report card, layer search and text scores on tiny random models."""

import numpy as np
import pytest
import torch

from xferlens.activations import cache_activations, paired_activations
from xferlens.evaluation import evaluate_mapper, layer_pair_scores, rank_agreement, rouge_l
from xferlens.identity import model_identity
from xferlens.mappers import AffineMapper, MapperMismatchError, fit_mapper

TEXTS = [
    f"the {w} sat on the mat and then the {v} ate {i} apples"
    for i, (w, v) in enumerate(
        zip(["cat", "dog", "hat", "owl", "fox", "bee"] * 3, ["rat", "cow", "pig"] * 6, strict=True)
    )
]
HELD_OUT = [
    "an owl and a cat sat in the hat",
    "the fox ate the apple then the bee",
    "a dog, a pig and 12 cows",
]


def identity_mapper(model, layer: int) -> AffineMapper:
    d = model.cfg.d_model
    m = AffineMapper(d, d).set_solution(
        torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    )
    hook = f"blocks.{layer}.hook_resid_post"
    m.meta = {"src": {**model_identity(model), "hook": hook}, "tgt": {**model_identity(model), "hook": hook}}
    return m


def test_patching_the_targets_own_activations_gives_kl_zero(tiny_tl):
    model = tiny_tl("llama")
    report = evaluate_mapper(
        identity_mapper(model, 1),
        model,
        model,
        HELD_OUT,
        prompts=["the cat"],
        max_new_tokens=4,
        progress=False,
    )
    assert report.patching["mapped"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report.patching["mapped"]["ce"] == pytest.approx(report.patching["clean"]["ce"], abs=1e-5)
    assert report.reconstruction["mapped"]["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert report.patching["mean_ablation"]["kl"] > 1e-3 and report.patching["random_map"]["kl"] > 1e-3
    assert report.kl_ratio < 1e-3
    assert report.patched_fraction == 1.0  # every text token (BOS excluded) was patched
    g = report.generations[0]
    assert g["clean"] == g["patched"] and g["rouge_l"] == 1.0
    md = report.to_markdown()
    assert "| mapped |" in md and "KL ratio" in md
    fig = report.plot()
    assert len(fig.axes) == 2


def test_patching_hook_replaces_exactly_the_paired_positions(tiny_tl):
    """A hand-written reference: patch by hand at each text token, compare the KL."""
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, 1, 1, progress=False)
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    report = evaluate_mapper(mapper, src, tgt, HELD_OUT[:1], progress=False)
    text = HELD_OUT[0]
    tokens = tgt.to_tokens(text)
    real = torch.tensor([int(t) not in tgt.tokenizer.all_special_ids for t in tokens[0]])
    s = cache_activations(src, [text], 1, progress=False).rows()
    repl = mapper(s)
    assert int(real.sum()) == len(repl) and real[1:].all()  # same tokenizer: one row per text token

    def patch(act, hook):
        act = act.clone()
        act[0, real] = repl
        return act

    first = int(torch.nonzero(real)[0])  # score patched positions that have a next token
    with torch.no_grad():
        clean = tgt(tokens).log_softmax(-1)[0, first:-1]
        patched = tgt.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", patch)])
        patched = patched.log_softmax(-1)[0, first:-1]
    kl = float((clean.exp() * (clean - patched)).sum(-1).mean())
    assert report.patching["mapped"]["kl"] == pytest.approx(kl, rel=1e-4)
    nxt = tokens[0, first + 1 :]
    ce = float(-patched.gather(-1, nxt[:, None]).mean())
    assert report.patching["mapped"]["ce"] == pytest.approx(ce, rel=1e-4)


def test_evaluation_refuses_wrong_models_and_training_texts(tiny_tl):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, 1, 1, progress=False)
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    with pytest.raises(MapperMismatchError):
        evaluate_mapper(mapper, tgt, src, HELD_OUT, progress=False)
    with pytest.raises(ValueError, match="held-out"):
        evaluate_mapper(mapper, src, tgt, TEXTS, progress=False)


def test_layer_search_finds_the_diagonal_of_a_model_with_itself(tiny_tl):
    model = tiny_tl("llama")
    ls = layer_pair_scores(model, model, TEXTS, progress=False)
    assert ls.scores.shape == (3, 3)
    np.testing.assert_allclose(np.diag(ls.scores), 1.0, atol=1e-5)
    assert all(ls.best_source_for(t) == t for t in ls.tgt_layers)
    (best,) = ls.recommend(1, depth=(0, 1))
    assert best[0] == best[1]
    ridge = layer_pair_scores(model, model, TEXTS, method="ridge", progress=False)
    assert all(ridge.scores[i, i] > 0.99 for i in range(3))
    assert ls.plot(mark=[best[:2]]) is not None
    # the first token (an attention sink in real models) is left out unless asked for
    every = layer_pair_scores(model, model, TEXTS, positions="all", progress=False)
    assert every.n_rows - ls.n_rows == len(TEXTS)


def test_rank_agreement_is_spearman():
    cheap = {(0, 0): 0.9, (1, 1): 0.8, (2, 2): 0.5, (3, 3): 0.1}
    kl = {(0, 0): 1.0, (1, 1): 2.0, (2, 2): 3.0, (3, 3): 4.0}
    agree = rank_agreement(cheap, kl)
    assert agree.rho == pytest.approx(1.0) and agree.to_dict()["rho"] == agree.rho
    frame = agree.to_frame()
    assert list(frame["cheap_rank"]) == list(frame["expensive_rank"])  # same ranking, pair by pair
    assert agree.to_markdown().count("\n| ") == len(agree.pairs) + 1 and agree.plot() is not None
    assert rank_agreement(cheap, {k: -v for k, v in kl.items()}).rho == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 3"):
        rank_agreement({(0, 0): 1.0}, {(0, 0): 1.0})


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat sat", "a dog ran") == 0.0
    assert 0 < rouge_l("the cat sat on the mat", "the cat lay on a mat") < 1


def test_several_mappers_share_baselines_and_match_single_reports(tiny_tl):
    from xferlens.evaluation import evaluate_mappers

    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, 1, 1, progress=False)
    mappers = {k: fit_mapper(pairs, k, progress=False)[0] for k in ("affine", "orthogonal")}
    both = evaluate_mappers(
        mappers, src, tgt, HELD_OUT, prompts=["the cat"], max_new_tokens=3, progress=False
    )
    for k, m in mappers.items():
        alone = evaluate_mapper(m, src, tgt, HELD_OUT, prompts=["the cat"], max_new_tokens=3, progress=False)
        for cond, figures in alone.patching.items():
            assert both[k].patching[cond] == pytest.approx(figures, rel=1e-6), cond
        assert both[k].generations == alone.generations
    assert both["affine"].patching["mean_ablation"] == both["orthogonal"].patching["mean_ablation"]
    assert both["affine"].reconstruction["mapped"] != both["orthogonal"].reconstruction["mapped"]


def test_cka_equals_numpy_reference():
    from xferlens.evaluation.layers import _cka

    g = np.random.default_rng(0)
    x, y = g.normal(size=(500, 12)) + 3, g.normal(size=(500, 7))
    y[:, :3] += x[:, :3]
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    got = _cka([torch.tensor(x)], [torch.tensor(y)], progress=False)[0, 0]
    assert got == pytest.approx(ref, rel=1e-5)


def test_last_position_report_card_equals_a_hand_written_loop(tiny_tl):
    """``positions="last"``: only each text's last token is patched, and the KL is that of
    the next-token distribution there; checked against a loop written out by hand."""
    from xferlens.activations.tokens import tokenize
    from xferlens.evaluation import evaluate_mappers

    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, 1, 1, progress=False)
    mapper = fit_mapper(pairs, "affine", progress=False)[0]
    card = evaluate_mappers({"affine": mapper}, src, tgt, HELD_OUT, positions="last", progress=False)[
        "affine"
    ]
    hook = "blocks.1.hook_resid_post"
    ids = tokenize(tgt, HELD_OUT).ids
    src_last, tgt_last, clean = [], [], []
    with torch.no_grad():
        for x in ids:
            t = torch.tensor([x])
            _, cs = src.run_with_cache(t, names_filter=hook)
            logits, ct = tgt.run_with_cache(t, names_filter=hook)
            src_last.append(cs[hook][0, -1])
            tgt_last.append(ct[hook][0, -1])
            clean.append(logits[0, -1].log_softmax(-1))
        mean = torch.stack(tgt_last).mean(0)
        kls = {"mapped": [], "mean_ablation": []}
        for x, s, c in zip(ids, src_last, clean, strict=True):
            for cond, row in (("mapped", mapper(s[None].float())[0]), ("mean_ablation", mean)):

                def put(act, hook, row=row):
                    act[:, -1] = row.to(act.dtype)
                    return act

                with tgt.hooks(fwd_hooks=[(hook, put)]):
                    lp = tgt(torch.tensor([x]))[0, -1].log_softmax(-1)
                kls[cond].append(float((c.exp() * (c - lp)).sum()))
    assert card.n_rows == len(HELD_OUT) and card.n_positions == len(HELD_OUT)
    for cond, values in kls.items():
        assert card.patching[cond]["kl"] == pytest.approx(np.mean(values), rel=1e-4, abs=1e-6), cond
    assert np.isnan(card.patching["mapped"]["ce"])
    unchecked = getattr(evaluate_mappers, "__wrapped__", evaluate_mappers)  # past the test-time type check
    with pytest.raises(ValueError, match="'all' or 'last'"):
        unchecked({"affine": mapper}, src, tgt, HELD_OUT, positions="first", progress=False)


def test_report_card_holds_the_transfer_diagnostics_of_a_given_vector(tiny_tl):
    """``vector=``: each card carries ``transfer_diagnostics`` of that vector on its own
    held-out rows, equal to calling it on the same rows by hand; the markdown shows them."""
    from xferlens.evaluation import evaluate_mappers, transfer_diagnostics

    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, 1, 1, progress=False)
    mapper = fit_mapper(pairs, "affine", progress=False)[0]
    backward = fit_mapper(pairs.reversed(), "affine", progress=False)[0]
    g = torch.Generator().manual_seed(3)
    v, native = torch.randn(src.cfg.d_model, generator=g), torch.randn(tgt.cfg.d_model, generator=g)
    card = evaluate_mappers(
        {"affine": mapper},
        src,
        tgt,
        HELD_OUT,
        positions="last",
        vector=v,
        native=native,
        backward=backward,
        progress=False,
    )["affine"]
    held = paired_activations(src, tgt, HELD_OUT, 1, 1, positions="last", progress=False)
    want = transfer_diagnostics(v, mapper, held.src, held.tgt, backward=backward, native=native).to_dict()
    assert card.diagnostics.keys() == want.keys()
    for k in want:
        assert card.diagnostics[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    assert "round-trip cosine" in card.to_markdown()
    assert card.summary()["diagnostics_spread_ratio"] == pytest.approx(want["spread_ratio"], rel=1e-5)
    plain = evaluate_mappers({"affine": mapper}, src, tgt, HELD_OUT, positions="last", progress=False)
    assert plain["affine"].diagnostics is None
    with pytest.raises(ValueError, match="direction or a SteeringVector"):
        evaluate_mappers({"affine": mapper}, src, tgt, HELD_OUT, vector=v[None], progress=False)
