"""Mappers on real zoo models: a cross-tokenizer map beats mean-ablation; artifacts refuse
the wrong models."""

import pytest
import torch

from xferlens import data, load_model
from xferlens.activations import paired_activations
from xferlens.evaluation import evaluate_mappers
from xferlens.mappers import MapperMismatchError, fit_mapper, load_mapper

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    return (
        load_model("smollm2-135m-instruct", device="cpu", progress=False),
        load_model("qwen2.5-coder-0.5b-instruct", device="cpu", progress=False),
    )


def test_cross_tokenizer_maps_beat_mean_ablation(models, tmp_path):
    smol, qwen = models
    corpus = data.default_corpus(None).texts
    pairs = paired_activations(smol, qwen, corpus[1000:1060], 15, 12, progress=False)
    mappers = {k: fit_mapper(pairs, k, progress=False)[0] for k in ("affine", "orthogonal")}
    reports = evaluate_mappers(mappers, smol, qwen, corpus[5000:5004], max_length=96, progress=False)
    for kind, r in reports.items():
        print(kind, r.summary())
        assert r.patching["mapped"]["kl"] < r.patching["random_map"]["kl"], kind
    assert reports["affine"].kl_ratio < 1
    mappers["affine"].save(tmp_path / "m")
    back = load_mapper(tmp_path / "m", smol, qwen)
    assert torch.equal(back(pairs.src[:3]), mappers["affine"](pairs.src[:3]))
    with pytest.raises(MapperMismatchError, match="source name"):
        load_mapper(tmp_path / "m", qwen, qwen)
