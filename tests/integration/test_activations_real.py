"""Activations on the real zoo models: cross-tokenizer alignment and the offline corpus."""

import gc

import pytest
import torch

from xferlens import data, load_model
from xferlens.activations import cache_activations, paired_activations
from xferlens.activations.align import align_sets
from xferlens.activations.tokens import tokenize

pytestmark = pytest.mark.slow

HARD = [
    "Prices rose 3.5% in 2024 — naïve café owners said «très cher» 🙂",
    "Numbers: 1234567890, 3.14159, -42, 1e-9 and 0x1F.",
    "Whitespace   runs\t\ttabs\n\n\nnewlines    and  more   spaces",
    "日本語のテキストと English mixed, with emoji 👩‍👩‍👧 and accents: Ærøskøbing.",
]


@pytest.fixture(scope="module")
def smol():
    m = load_model("smollm2-135m-instruct", device="cpu", progress=False)
    yield m
    del m
    gc.collect()


@pytest.fixture(scope="module")
def qwen():
    m = load_model("qwen2.5-coder-0.5b-instruct", device="cpu", progress=False)
    yield m
    del m
    gc.collect()


def test_offsets_cover_the_text_exactly(smol, qwen):
    """Every character of a text lies in some token's span, for both tokenizers."""
    for model in (smol, qwen):
        tk = tokenize(model, HARD)
        for text, spans, special in zip(HARD, tk.spans, tk.special, strict=True):
            covered = set()
            for (a, b), s in zip(spans, special, strict=True):
                if not s:
                    covered.update(range(a, b))
            assert covered == set(range(len(text))), (model.cfg.model_name, text)


def test_alignment_on_unicode_numbers_whitespace(smol, qwen):
    a = cache_activations(smol, HARD, 3, progress=False)
    b = cache_activations(qwen, HARD, 3, progress=False)
    pairs = align_sets(a, b, a.hooks[0], b.hooks[0], "char_end")
    assert pairs.coverage["src"] > 0.6 and pairs.coverage["tgt"] > 0.6, pairs.coverage
    # each pair's tokens end at the same character: the two models have read the same text
    ends_a = {
        (int(t), int(p)): int(e) for t, p, e in zip(a.text_index, a.position, a.char_spans[:, 1], strict=True)
    }
    ends_b = {
        (int(t), int(p)): int(e) for t, p, e in zip(b.text_index, b.position, b.char_spans[:, 1], strict=True)
    }
    for t, ps, pt in zip(pairs.text_index, pairs.src_position, pairs.tgt_position, strict=True):
        assert ends_a[(int(t), int(ps))] == ends_b[(int(t), int(pt))]
    # and pairs hold the right rows
    first = (a.text_index == pairs.text_index[0]) & (a.position == pairs.src_position[0])
    assert torch.equal(pairs.src[0], a.rows()[first][0])


def test_cross_tokenizer_coverage_on_default_corpus(smol, qwen):
    corpus = data.default_corpus(60)
    pairs = paired_activations(smol, qwen, corpus.texts, 15, 12, progress=False)
    print(pairs)
    assert pairs.alignment == "char_end"
    assert pairs.coverage["src"] > 0.8 and pairs.coverage["tgt"] > 0.8, pairs.coverage
    assert pairs.src.shape[1] == 576 and pairs.tgt.shape[1] == 896


def test_same_tokenizer_qwen_pair_uses_positions(qwen):
    big = load_model("qwen2.5-coder-1.5b-instruct", device="cpu", progress=False)
    pairs = paired_activations(qwen, big, HARD[:2], 12, 14, progress=False)
    assert pairs.alignment == "position" and pairs.coverage == {"src": 1.0, "tgt": 1.0}
    assert pairs.tgt.shape[1] == 1536
    del big
    gc.collect()


def test_prompt_sets_have_provenance_and_disjoint_splits():
    corpus = data.default_corpus(500)
    assert len(corpus) == 500 and corpus.license and corpus.source
    assert data.default_corpus(500).texts == corpus.texts  # deterministic
    harmful, harmless = data.harmful_prompts(), data.harmless_prompts(300)
    assert len(harmful) > 900 and len(harmless) == 300
    assert not set(harmful.texts) & set(harmless.texts)
    train, test = harmful.split(0.5, seed=0)
    assert not set(train.texts) & set(test.texts) and len(train) + len(test) == len(harmful)
    assert "HarmBench" in harmful.license
    # the map's extra fit sources never draw a prompt of the task's pools
    pool = set(data.harmless_prompts(None).texts) | set(harmful.texts)
    for name in data.FIT_SOURCES:
        extra = data.fit_source_prompts(name, 500, max_chars=300)
        assert len(extra) == 500 and extra.license and not set(extra.texts) & pool
        assert max(len(t) for t in extra.texts) <= 300
    short = data.fit_source_prompts("chat", max_chars=150)  # a cut below the harmless pool's 200
    assert len(short) > 500 and not set(short.texts) & pool
    with pytest.raises(ValueError, match="'wiki': no such source"):
        data.fit_source_prompts("wiki")
