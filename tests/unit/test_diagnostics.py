"""Transfer diagnostics on synthetic maps with a known answer, against numpy / scipy."""

import json
import math

import numpy as np
import pytest
import torch

from xferlens.activations.align import Pairs
from xferlens.evaluation.diagnostics import (
    probe_agreement,
    round_trip,
    subspace_fidelity,
    transfer_diagnostics,
)
from xferlens.mappers import fit_mapper


def _pairs(x: torch.Tensor, y: torch.Tensor) -> Pairs:
    n = len(x)
    idx = torch.arange(n)
    meta = {"src_model": "a", "tgt_model": "b", "src_hook": "h.a", "tgt_hook": "h.b", "src_rows": n}
    return Pairs(x, y, idx, idx, idx, "position", {"src": 1.0, "tgt": 1.0}, meta)


def _linear_world(rank: int | None = None, noise: float = 0.01, n: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    a = torch.randn(8, 12, generator=g)
    if rank is not None:  # the map keeps only the first `rank` source directions
        a[rank:] = 0
    y = x @ a + 0.3 + noise * torch.randn(n, 12, generator=g)
    return x, y, a


def test_reversed_pairs_swap_every_side():
    x, y, _ = _linear_world()
    p = _pairs(x, y)
    r = p.reversed()
    assert torch.equal(r.src, p.tgt) and torch.equal(r.tgt, p.src)
    assert r.meta["src_model"] == "b" and r.meta["tgt_hook"] == "h.a" and r.meta["tgt_rows"] == len(x)
    assert torch.equal(r.reversed().src, p.src)


def test_round_trip_keeps_a_direction_the_map_carries_and_loses_one_it_drops():
    x, y, _ = _linear_world(rank=5)
    pairs = _pairs(x, y)
    # every row trains (val given, ridge fixed), as in the numpy reference below
    fwd = fit_mapper(pairs, "affine", {"ridge": 0.0}, val=pairs, progress=False)[0]
    bwd = fit_mapper(pairs.reversed(), "affine", {"ridge": 0.0}, val=pairs.reversed(), progress=False)[0]
    kept = torch.zeros(8)
    kept[1] = 1.0
    dropped = torch.zeros(8)
    dropped[6] = 1.0
    rt = round_trip(kept, fwd, bwd)
    assert rt["cosine"] > 0.99 and rt["length"] == pytest.approx(1.0, abs=0.05)
    assert round_trip(dropped, fwd, bwd)["length"] < 0.05
    # numpy reference: the two least-squares maps' linear parts composed
    xs, ys = x.double().numpy(), y.double().numpy()
    one = np.ones((len(xs), 1))
    wf = np.linalg.lstsq(np.hstack([xs, one]), ys, rcond=None)[0][:-1]
    wb = np.linalg.lstsq(np.hstack([ys, one]), xs, rcond=None)[0][:-1]
    back = kept.double().numpy() @ wf @ wb
    ref_cos = back @ kept.double().numpy() / np.linalg.norm(back)
    assert rt["cosine"] == pytest.approx(ref_cos, abs=1e-4)
    with pytest.raises(ValueError, match="backward must map"):
        round_trip(kept, fwd, fwd)


def test_subspace_fidelity_equals_numpy():
    g = np.random.default_rng(0)
    t = g.normal(size=(200, 6))
    m = 0.5 * t + 0.1 * g.normal(size=(200, 6))  # squeezed to half along every direction
    u = g.normal(size=6)
    got = subspace_fidelity(torch.tensor(m), torch.tensor(t), torch.tensor(u))
    uu = u / np.linalg.norm(u)
    pm, pt = m @ uu, t @ uu
    assert got["r2"] == pytest.approx(1 - np.mean((pt - pm) ** 2) / np.var(pt), rel=1e-9)
    assert got["spread_ratio"] == pytest.approx(np.std(pt) / np.std(pm), rel=1e-9)
    assert got["spread_ratio"] > 1.8  # the squeeze shows
    assert got["correlation"] == pytest.approx(np.corrcoef(pm, pt)[0, 1], rel=1e-9)
    unchecked = getattr(subspace_fidelity, "__wrapped__", subspace_fidelity)  # past the type check
    with pytest.raises(ValueError, match="same"):
        unchecked(torch.tensor(m[:5]), torch.tensor(t), torch.tensor(u))


def test_probe_agreement_is_spearman_over_prompts():
    from scipy.stats import rankdata

    g = np.random.default_rng(1)
    hs, ht = g.normal(size=(50, 4)), g.normal(size=(50, 3))
    vs, vt = g.normal(size=4), g.normal(size=3)
    got = probe_agreement(torch.tensor(hs), torch.tensor(ht), torch.tensor(vs), torch.tensor(vt))
    ra, rb = rankdata(hs @ vs), rankdata(ht @ vt)
    assert got["spearman"] == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-9)
    same = probe_agreement(torch.tensor(hs), torch.tensor(hs * 2), torch.tensor(vs), torch.tensor(vs))
    assert same["spearman"] == pytest.approx(1.0)


def test_transfer_diagnostics_tell_a_good_map_from_a_blind_one():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(8, generator=g)
    # prompts differ mostly in how strongly they carry v (as prompts do along a refusal
    # direction); the target is a linear image of the source
    x = torch.randn(600, 8, generator=g) + 3 * torch.randn(600, 1, generator=g) * v
    a = torch.randn(8, 12, generator=g)
    y = x @ a + 0.05 * torch.randn(600, 12, generator=g)
    train, held = _pairs(x[:400], y[:400]), (x[400:], y[400:])
    fwd = fit_mapper(train, "affine", progress=False)[0]
    bwd = fit_mapper(train.reversed(), "affine", progress=False)[0]
    good = transfer_diagnostics(v, fwd, *held, backward=bwd, native=v @ a)
    assert good["subspace_r2"] > 0.95 and good["probe_spearman"] > 0.95
    assert good["round_trip_cosine"] > 0.95 and good["cosine_to_native"] > 0.99
    # a map fitted on shuffled pairs has learned nothing: every diagnostic says so
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    blind = fit_mapper(_pairs(x[:400], y[:400][perm]), "affine", progress=False)[0]
    bad = transfer_diagnostics(v, blind, *held)
    assert bad["subspace_r2"] < 0.2 and bad["spread_ratio"] > 5
    # (its probe still ranks prompts: any direction with a component along the target's
    # dominant variation does, which is why the probe is read beside the fidelity)
    assert np.isnan(bad["round_trip_cosine"]) and np.isnan(bad["cosine_to_native"])
    # a report whose to_dict() is the flat dict of floats it used to be, keys in that order
    assert list(good.to_dict()) == [
        "n_rows",
        "subspace_r2",
        "spread_ratio",
        "probe_spearman",
        "round_trip_cosine",
        "round_trip_length",
        "cosine_to_native",
        "native_probe_spearman",
    ]
    assert good.to_dict()["n_rows"] == 200.0 and good.subspace_r2 == good["subspace_r2"]
    assert json.dumps({**bad, "where": "last"}) == json.dumps({**bad.to_dict(), "where": "last"})
    assert all(isinstance(x, float) for x in bad.to_dict().values()) and math.isnan(bad.cosine_to_native)
    with pytest.raises(KeyError):
        bad["nope"]


def test_shrinkage_recalibration_undoes_the_squeeze_along_the_vector():
    """A noisy least-squares map shrinks what it predicts; ``recalibrate='shrinkage'``
    lengthens the transferred vector by std(target)/std(mapped) along it (numpy reference)."""
    from xferlens.steering import transfer
    from xferlens.steering.vector import SteeringVector

    g = torch.Generator().manual_seed(5)
    x = torch.randn(800, 8, generator=g)
    a = torch.randn(8, 12, generator=g)
    y = x @ a + 2.0 * torch.randn(800, 12, generator=g)  # much the map cannot predict
    train = _pairs(x[:500], y[:500])
    mapper = fit_mapper(train, "affine", progress=False)[0]
    mapper.meta["src"] = {"hook": "h.a"}
    mapper.meta["tgt"] = {"hook": "h.b", "d_model": 12}
    v = SteeringVector({"h.a": torch.randn(8, generator=g)}, {"d_model": 8})
    raw = transfer(v, mapper)
    fixed = transfer(v, mapper, source_rows=x[500:], target_rows=y[500:], recalibrate="shrinkage")
    u = raw.direction().double().numpy()
    u = u / np.linalg.norm(u)
    mapped = mapper(x[500:]).double().detach().numpy() @ u
    want = np.std(y[500:].double().numpy() @ u, ddof=1) / np.std(mapped, ddof=1)
    assert want > 1.02
    assert fixed.norm() / raw.norm() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(fixed.direction() / fixed.norm(), raw.direction() / raw.norm(), atol=1e-6)
    with pytest.raises(ValueError, match="needs source_rows and target_rows"):
        transfer(v, mapper, recalibrate="shrinkage")
