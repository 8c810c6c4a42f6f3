"""SAE features: training through sae-lens, save/load, matching through a mapper."""

import pytest
import torch

from xferlens.activations import Pairs, positions, resid_post
from xferlens.activations.cache import cache_activations
from xferlens.features import (
    SAEMismatchError,
    feature_transfer,
    feature_vector,
    load_sae,
    map_directions,
    train_sae,
)
from xferlens.identity import model_identity
from xferlens.mappers import AffineMapper
from xferlens.steering import transfer

HOOK = "blocks.0.hook_resid_post"


def sparse_rows(n=3000, d=24, n_atoms=48, k=3, seed=0):
    """Rows that are sparse non-negative combinations of random unit atoms (plus an offset):
    the data an SAE should reconstruct well."""
    atoms = torch.randn(n_atoms, d, generator=torch.Generator().manual_seed(1234))  # one dictionary
    atoms /= atoms.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)  # codes differ per seed
    codes = torch.zeros(n, n_atoms)
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:k] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, k, generator=g) * 4 + 1)
    return codes @ atoms + 3.0


@pytest.fixture(scope="module")
def sae():
    return train_sae(
        sparse_rows(), hook=HOOK, expansion=4, k=4, steps=300, batch_size=128, lr=3e-3, progress=False
    )


def pairs_of(src, tgt):
    n = len(src)
    idx = torch.arange(n)
    return Pairs(src, tgt, idx, idx, idx, "same", {"src": 1.0, "tgt": 1.0})


def identity(d, hook=HOOK):
    m = AffineMapper(d, d).set_solution(torch.eye(d), torch.zeros(d))
    m.meta = {"src": {"hook": hook}, "tgt": {"hook": hook}, "training": {"src_norm": 1.0, "tgt_norm": 1.0}}
    return m


def test_sae_trains_and_reduces_reconstruction_error(sae):
    m = sae.metrics
    assert m["fvu"] < 0.25 < m["fvu_at_init"]
    assert m["l0"] <= 4 + 1e-6
    # the folded input scale is exact: the reported FVU is on raw (unscaled) rows
    x = sparse_rows(seed=1)[:500]
    with torch.no_grad():
        recon = sae.sae.decode(sae.encode(x))
    fvu = float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu < 0.3


def test_sae_save_load_roundtrip_and_model_check(sae, tmp_path, tiny_tl):
    sae.save(tmp_path / "sae")
    assert {p.name for p in (tmp_path / "sae").iterdir()} >= {
        "cfg.json",
        "sae_weights.safetensors",
        "xferlens.json",
    }
    back = load_sae(tmp_path / "sae")
    x = sparse_rows(seed=2)[:64]
    assert torch.equal(back.encode(x), sae.encode(x))
    assert back.hook == HOOK and back.metrics["fvu"] == pytest.approx(sae.metrics["fvu"])
    # an SAE that records a model refuses another one
    llama, qwen = tiny_tl("llama"), tiny_tl("qwen2")
    rows = cache_activations(llama, ["the cat sat on the mat"] * 40, [0], progress=False).rows(HOOK)
    own = train_sae(rows, hook=HOOK, model=llama, expansion=2, k=4, steps=20, batch_size=64, progress=False)
    own.save(tmp_path / "own")
    load_sae(tmp_path / "own", llama)
    with pytest.raises(SAEMismatchError, match="trained on"):
        load_sae(tmp_path / "own", qwen)


def test_a_feature_mapped_through_the_identity_finds_itself(sae):
    x = sparse_rows(seed=3)[:800]
    ft = feature_transfer(sae, sae, identity(24), pairs_of(x, x))
    assert len(ft.features) > 0
    assert torch.equal(ft.partner, ft.features)
    torch.testing.assert_close(ft.cosine, torch.ones_like(ft.cosine), atol=1e-5, rtol=0)
    torch.testing.assert_close(ft.act_corr, torch.ones_like(ft.act_corr), atol=1e-4, rtol=0)
    assert ft.rate(0.9) == 1.0
    assert ft.rate(0.9, control=True) < 0.5  # a random map rarely lands that close
    assert "random map" in ft.to_markdown()
    rates = ft.table((0.5, 0.9))  # a report; to_dict() is the list of rows it used to be
    assert rates.to_dict() == [
        {
            "threshold": t,
            "cosine": ft.rate(t),
            "cosine_random": ft.rate(t, control=True),
            "act_corr": ft.rate(t, by="act_corr"),
            "act_corr_random": ft.rate(t, control=True, by="act_corr"),
        }
        for t in (0.5, 0.9)
    ]
    assert rates.to_markdown() == ft.to_markdown((0.5, 0.9))


def test_map_directions_nonlinear_needs_rows_and_returns_unit_vectors():
    from xferlens.mappers import fit_mapper

    x = sparse_rows(n=600)
    y = torch.relu(x @ torch.randn(24, 16)) + 0.1 * x[:, :16]
    pairs = pairs_of(x, y)
    m, _ = fit_mapper(pairs, "autoencoder", {"max_epochs": 2}, progress=False)
    d = torch.randn(5, 24)
    with pytest.raises(ValueError, match="source_rows"):
        map_directions(d, m)
    out = map_directions(d, m, source_rows=x)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)


def test_feature_vector_is_the_decoder_direction_and_transfers(sae):
    x = sparse_rows(seed=4)[:400]
    live = int(torch.nonzero((sae.encode(x) > 0).any(0))[0])
    v = feature_vector(sae, live, rows=x)
    w = sae.sae.W_dec[live].detach()
    cos = torch.nn.functional.cosine_similarity(v.direction(), w, dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-6)
    acts = sae.encode(x)[:, live]
    assert v.norm() == pytest.approx(float(acts[acts > 0].mean() * w.norm()), rel=1e-5)
    t = transfer(v, identity(24))
    torch.testing.assert_close(t.direction(), v.direction())
    with pytest.raises(IndexError, match="out of range"):
        feature_vector(sae, sae.d_sae)


def test_train_sae_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        train_sae(torch.full((300, 8), float("nan")), hook=HOOK, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        train_sae(torch.zeros(0, 8), hook=HOOK, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_sae(torch.randn(100, 8), hook=HOOK, batch_size=512, progress=False)


def test_sae_on_a_tiny_model_reduces_reconstruction_error(tiny_tl):
    model = tiny_tl("llama")
    texts = [f"text number {i} about cats and dogs" for i in range(60)]
    rows = cache_activations(model, texts, [1], positions=positions.content(), progress=False).rows(
        resid_post(1)
    )
    s = train_sae(
        rows, hook=resid_post(1), model=model, expansion=4, k=8, steps=60, batch_size=64, progress=False
    )
    assert s.metrics["fvu"] < s.metrics["fvu_at_init"]
    assert s.model == model_identity(model)
