"""Mapper kinds against independent references (numpy, scipy), artifacts, bad input."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from xferlens.activations import Pairs, PairShards, ShardError, paired_activations, pairs_to_disk
from xferlens.mappers import (
    MAPPERS,
    AffineMapper,
    MapperFileError,
    MapperMismatchError,
    NonFiniteError,
    fit_mapper,
    load_mapper,
)
from xferlens.mappers.moments import Moments


def make_pairs(x: torch.Tensor, y: torch.Tensor, rows_per_text: int = 10, meta: dict | None = None) -> Pairs:
    n = x.shape[0]
    ti = torch.arange(n) // rows_per_text
    zeros = torch.zeros(n, dtype=torch.long)
    return Pairs(x, y, ti, zeros, zeros, "position", {"src": 1.0, "tgt": 1.0}, meta or {})


@pytest.fixture(scope="module")
def linear_data():
    g = torch.Generator().manual_seed(0)
    n, ds, dt = 2000, 12, 20
    x = torch.randn(n, ds, generator=g) * 3 + 5  # a large mean, like residual streams
    w = torch.randn(ds, dt, generator=g)
    b = torch.randn(dt, generator=g)
    y = x @ w + b + 0.1 * torch.randn(n, dt, generator=g)
    return x, y


def test_affine_equals_numpy_lstsq(linear_data):
    x, y = linear_data
    p = make_pairs(x, y)
    mapper, hist = fit_mapper(p, "affine", {"ridge": 0.0, "batch_size": 77}, val=p, progress=False)
    X = np.c_[x.double().numpy(), np.ones(len(x))]
    ref = np.linalg.lstsq(X, y.double().numpy(), rcond=None)[0]
    np.testing.assert_allclose(mapper.linear.weight.detach().double().numpy().T, ref[:-1], atol=1e-5)
    np.testing.assert_allclose(mapper.linear.bias.detach().double().numpy(), ref[-1], atol=1e-5)
    assert hist["train_rows"] == len(x)


def test_affine_ridge_equals_closed_form(linear_data):
    x, y = linear_data
    ridge = 0.3
    mapper, _ = fit_mapper(
        make_pairs(x, y),
        "affine",
        {"ridge": ridge, "batch_size": 500},
        val=make_pairs(x[:50], y[:50]),
        progress=False,
    )
    X, Y = x.double().numpy(), y.double().numpy()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    lam = ridge * np.trace(Xc.T @ Xc) / X.shape[1]  # relative penalty, intercept unpenalised
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ Yc)
    b = Y.mean(0) - X.mean(0) @ w
    np.testing.assert_allclose(mapper.linear.weight.detach().double().numpy().T, w, atol=1e-5)
    np.testing.assert_allclose(mapper.linear.bias.detach().double().numpy(), b, atol=1e-5)


def test_moments_sse_equals_direct_residuals(linear_data):
    x, y = linear_data
    m = Moments.of(make_pairs(x, y), batch_size=333)
    g = torch.Generator().manual_seed(1)
    w, b = (
        torch.randn(12, 20, generator=g, dtype=torch.float64),
        torch.randn(20, generator=g, dtype=torch.float64),
    )
    direct = float(((y.double() - x.double() @ w - b) ** 2).sum())
    assert m.sse(w, b) == pytest.approx(direct, rel=1e-9)


def test_ridge_is_chosen_on_validation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 40, generator=g)  # few rows, many dims: least squares overfits
    y = x @ torch.randn(40, 5, generator=g) * 0.1 + torch.randn(60, 5, generator=g)
    xv = torch.randn(400, 40, generator=g)
    yv = xv @ torch.zeros(40, 5) + torch.randn(400, 5, generator=g)
    _, hist = fit_mapper(make_pairs(x, y), "affine", val=make_pairs(xv, yv), progress=False)
    best = min(hist["candidates"], key=lambda c: c["val_mse"])
    assert hist["ridge"] == best["ridge"] > 0
    assert best["val_mse"] < next(c for c in hist["candidates"] if c["ridge"] == 0)["val_mse"]


@pytest.mark.parametrize("ds,dt", [(16, 16), (10, 16), (16, 10)])
def test_orthogonal_equals_scipy_procrustes(ds, dt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, ds, generator=g, dtype=torch.float64) + 2
    q = torch.linalg.qr(torch.randn(max(ds, dt), max(ds, dt), generator=g, dtype=torch.float64))[0][:ds, :dt]
    y = 0.7 * x @ q + 0.05 * torch.randn(1500, dt, generator=g, dtype=torch.float64) - 1
    mapper, hist = fit_mapper(
        make_pairs(x, y), "orthogonal", val=make_pairs(x[:100], y[:100]), progress=False
    )
    X, Y = x.numpy() - x.numpy().mean(0), y.numpy() - y.numpy().mean(0)
    d = max(ds, dt)
    Xp, Yp = np.zeros((len(X), d)), np.zeros((len(Y), d))
    Xp[:, :ds], Yp[:, :dt] = X, Y
    r, sv_sum = scipy.linalg.orthogonal_procrustes(Xp, Yp)
    np.testing.assert_allclose(mapper.rotation.double().numpy(), r[:ds, :dt], atol=1e-5)
    assert float(mapper.scale) == pytest.approx(sv_sum / (X**2).sum(), rel=1e-5)
    # the fitted rotation has orthonormal rows or columns
    rot = mapper.rotation.double()
    small = rot.T @ rot if ds >= dt else rot @ rot.T
    np.testing.assert_allclose(small.numpy(), np.eye(min(ds, dt)), atol=1e-5)


def _val_mse(mapper, x, y):
    with torch.no_grad():
        return float(((mapper(x) - y) ** 2).mean())


def test_autoencoder_beats_affine_on_a_nonlinear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 8, generator=g)
    y = torch.relu(x @ torch.randn(8, 16, generator=g)) @ torch.randn(16, 8, generator=g)
    p = make_pairs(x[:5000], y[:5000])
    xv, yv = x[5000:], y[5000:]
    aff, _ = fit_mapper(p, "affine", progress=False)
    ae, hist = fit_mapper(p, "autoencoder", {"hidden": 64, "max_epochs": 40, "seed": 0}, progress=False)
    assert _val_mse(ae, xv, yv) < 0.5 * _val_mse(aff, xv, yv)
    assert hist["best_val_mse"] < hist["affine_val_mse"]
    vals = [r["val_mse"] for r in hist["records"]]
    assert hist["best_val_mse"] == min(vals)


def test_autoencoder_loses_nothing_on_a_linear_map(linear_data):
    x, y = linear_data
    p = make_pairs(x[:1600], y[:1600])
    xv, yv = x[1600:], y[1600:]
    aff, _ = fit_mapper(p, "affine", progress=False)
    ae, _ = fit_mapper(p, "autoencoder", {"max_epochs": 5}, progress=False)
    assert _val_mse(ae, xv, yv) <= _val_mse(aff, xv, yv) * 1.02


def test_paper_autoencoder_trains_and_is_seedable(linear_data):
    x, y = linear_data
    p = make_pairs(x, y)
    cfg = {"affine_skip": False, "max_epochs": 4, "seed": 3}
    a, ha = fit_mapper(p, "autoencoder", cfg, progress=False)
    b, _ = fit_mapper(p, "autoencoder", cfg, progress=False)
    assert a.skip is None and a.hidden == round((12 * 20) ** 0.5)
    assert ha["records"][-1]["val_mse"] < ha["records"][0]["val_mse"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("kind", sorted(MAPPERS))
def test_save_load_round_trip_is_bit_exact(kind, linear_data, tmp_path):
    x, y = linear_data
    mapper, _ = fit_mapper(
        make_pairs(x, y), kind, {"max_epochs": 1} if kind == "autoencoder" else None, progress=False
    )
    mapper.meta["report"] = {"kl_ratio": 0.5}
    mapper.save(tmp_path / "m")
    back = load_mapper(tmp_path / "m")
    assert (
        type(back) is type(mapper)
        and back.config == mapper.config
        and back.meta["report"] == {"kl_ratio": 0.5}
    )
    for k, v in mapper.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert torch.equal(mapper(x[:5]), back(x[:5]))


def test_tampered_or_truncated_artifacts_are_refused(linear_data, tmp_path):
    x, y = linear_data
    mapper, _ = fit_mapper(make_pairs(x, y), "affine", progress=False)
    mapper.save(tmp_path / "m")
    w = tmp_path / "m" / "mapper.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(MapperFileError, match="sha256"):
        load_mapper(tmp_path / "m")
    w.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(MapperFileError, match="truncated or altered"):
        load_mapper(tmp_path / "m")
    h = tmp_path / "m" / "mapper.json"
    header = json.loads(h.read_text())
    header["kind"] = "no-such-kind"
    h.write_text(json.dumps(header))
    with pytest.raises((MapperFileError, ValueError)):
        load_mapper(tmp_path / "m")
    with pytest.raises(MapperFileError, match="not a mapper folder"):
        load_mapper(tmp_path / "nothing")


def test_bad_input_is_named(linear_data):
    x, y = linear_data
    p = make_pairs(x, y)
    p.tgt = y[:-1]  # (the test-time jaxtyping check would stop the constructor before our own)
    with pytest.raises(ValueError, match="src has 2000 rows but tgt has 1999"):
        p.__post_init__()
    bad = x.clone()
    bad[1234, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="row 1234"):
        fit_mapper(make_pairs(bad, y), "autoencoder", progress=False, val=make_pairs(x[:10], y[:10]))
    y_inf = y.clone()
    y_inf[7] = float("inf")
    with pytest.raises(NonFiniteError, match="inf.*row 7"):
        fit_mapper(make_pairs(x, y_inf), "affine", val=make_pairs(x[:10], y[:10]), progress=False)
    with pytest.raises(ValueError, match="registered kinds: affine, autoencoder, lowrank, orthogonal"):
        fit_mapper(make_pairs(x, y), "mlp-9000")
    with pytest.raises(ValueError, match="unknown AffineConfig field"):
        fit_mapper(make_pairs(x, y), "affine", {"ridgee": 1.0})
    mapper, _ = fit_mapper(make_pairs(x, y), "affine", progress=False)
    with pytest.raises(MapperMismatchError, match="last dimension 20 but .* d_src=12"):
        mapper(y)
    with pytest.raises(MapperMismatchError, match="validation pairs are 20 -> 12"):
        fit_mapper(make_pairs(x, y), "affine", val=make_pairs(y, x))


# ------------------------------------------------------- real (tiny) models, shards, checks

TEXTS = [
    f"the {w} sat on the mat and the {v} ate an apple number {i}"
    for i, (w, v) in enumerate(
        zip(["cat", "dog", "hat", "owl", "fox", "bee"] * 4, ["rat", "cow", "pig", "ant"] * 6, strict=True)
    )
]


def test_pairs_on_disk_equal_pairs_in_memory(tiny_tl, tmp_path):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    mem = paired_activations(src, tgt, TEXTS, 1, 2, progress=False)
    store = pairs_to_disk(
        src, tgt, TEXTS, 1, 2, tmp_path / "p", chunk_texts=5, shard_rows=40, dtype="float32", progress=False
    )
    assert len(store.meta["shards"]) > 1 and len(store) == len(mem)
    back = store.load()
    assert torch.equal(back.src, mem.src) and torch.equal(back.tgt, mem.tgt)
    assert torch.equal(back.text_index, mem.text_index)
    # streamed fit == in-memory fit
    val = paired_activations(src, tgt, TEXTS[:3], 1, 2, progress=False)
    a, _ = fit_mapper(mem, "affine", {"ridge": 1e-3}, val=val, progress=False)
    b, _ = fit_mapper(store, "affine", {"ridge": 1e-3, "batch_size": 17}, val=val, progress=False)
    torch.testing.assert_close(a.linear.weight, b.linear.weight, atol=1e-4, rtol=1e-4)
    train, v = store.split(0.25, seed=0)
    assert len(train) + len(v) == len(store)
    seen = {"train": set(), "val": set()}
    for name, view in (("train", train), ("val", v)):
        for i in range(len(store.meta["shards"])):
            seen[name] |= set(view.read_shard(i)["text_index"].tolist())
    assert not seen["train"] & seen["val"]
    ae, hist = fit_mapper(store, "autoencoder", {"max_epochs": 2}, progress=False)  # streamed training
    assert hist["train_rows"] == len(store.split(0.1, seed=0)[0]) < len(store)
    # a tampered shard is refused, never mixed in
    shard = tmp_path / "p" / store.meta["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="sha256"):
        PairShards(tmp_path / "p").load()


def test_mapper_refuses_other_models(tiny_tl, tmp_path):
    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    pairs = paired_activations(src, tgt, TEXTS, 1, 2, progress=False)
    mapper, _ = fit_mapper(pairs, "affine", progress=False)
    assert mapper.src_hook == "blocks.1.hook_resid_post" and mapper.meta["tgt"]["name"] == tgt.cfg.model_name
    mapper.check_models(src, tgt)  # the right ones pass
    with pytest.raises(MapperMismatchError, match="source name.*target name"):
        mapper.check_models(tgt, src)
    mapper.save(tmp_path / "m")
    with pytest.raises(MapperMismatchError, match="Pass force=True"):
        load_mapper(tmp_path / "m", src=tgt, tgt=src)
    with pytest.warns(UserWarning, match="NOT FITTED FOR"):
        load_mapper(tmp_path / "m", src=tgt, tgt=src, force=True)
    # same name and shapes, different weights: the fingerprint tells them apart
    mapper.meta["src"]["weights"] = "folder:0000"
    with pytest.raises(MapperMismatchError, match="source weights"):
        mapper.check_models(src, tgt)


def test_identity_affine_mapper_is_a_plain_linear():
    m = AffineMapper(4, 4).set_solution(
        torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    )
    x = torch.randn(2, 3, 4)
    assert torch.equal(m(x), x)


def test_live_pairs_equal_cached_pairs(tiny_tl):
    from xferlens.activations import LivePairs

    src, tgt = tiny_tl("llama"), tiny_tl("qwen2")
    mem = paired_activations(src, tgt, TEXTS, 1, 2, progress=False)
    live = LivePairs(src, tgt, TEXTS, 1, 2, chunk_texts=5)
    assert len(live) == len(mem) and (live.d_src, live.d_tgt) == (mem.d_src, mem.d_tgt)
    xs, ys = zip(*live.batches(50), strict=True)
    assert torch.equal(torch.cat(xs), mem.src) and torch.equal(torch.cat(ys), mem.tgt)
    (lt, lv), (mt, mv) = live.split(0.25, seed=1), mem.split(0.25, seed=1)
    assert sorted(lv.ids) == torch.unique(mv.text_index).tolist() and len(lt) == len(mt)
    shuffled = torch.cat([x for x, _ in live.batches(7, shuffle=True, seed=0)])
    assert shuffled.shape == mem.src.shape and not torch.equal(shuffled, mem.src)


def test_random_controls_are_seeded_and_shaped_like_what_they_control(linear_data):
    from xferlens.mappers import MAPPERS, RandomMapper, random_direction_like, random_map_like

    x, y = linear_data
    m, _ = fit_mapper(make_pairs(x, y, meta={"src": {"hook": "a"}, "tgt": {"hook": "b"}}), progress=False)
    r = random_map_like(m, seed=3)
    assert isinstance(r, RandomMapper) and r.is_linear and "random" not in MAPPERS
    assert (r.d_src, r.d_tgt, r.src_hook, r.tgt_hook) == (m.d_src, m.d_tgt, m.src_hook, m.tgt_hook)
    assert r.meta["control"] == {"random_like": m.kind, "seed": 3}
    # independent reference: a N(0, 1/d_src) matrix drawn from the seed, applied as x @ W
    w = torch.randn(m.d_src, m.d_tgt, generator=torch.Generator().manual_seed(3)) / m.d_src**0.5
    torch.testing.assert_close(r(x[:5]), x[:5] @ w)
    torch.testing.assert_close(r.map_direction(x[0]), x[0] @ w)  # linear: M(v) - M(0)
    assert torch.equal(random_map_like(m, seed=3).W, r.W) and not torch.equal(random_map_like(m, 4).W, r.W)
    # a random direction: Gaussian, with the given direction's norm; a generator is one stream
    v = torch.randn(m.d_src) * 7
    a = random_direction_like(v, seed=1)
    assert a.norm() == pytest.approx(float(v.norm()), rel=1e-6)
    assert torch.equal(a, random_direction_like(v, seed=1))
    assert not torch.equal(a, random_direction_like(v, seed=2))
    g = torch.Generator().manual_seed(1)
    first, second = random_direction_like(v, g), random_direction_like(v, g)
    assert torch.equal(first, a) and not torch.equal(second, a)
    h = torch.Generator().manual_seed(1)
    ref = [torch.randn(m.d_src, generator=h) for _ in range(2)][1]
    torch.testing.assert_close(second, ref / ref.norm() * v.norm())


def test_map_direction_step_and_max_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = torch.relu(x @ torch.randn(6, 5, generator=g))
    ae, _ = fit_mapper(make_pairs(x, y), "autoencoder", {"hidden": 16, "max_epochs": 2}, progress=False)
    v = torch.randn(6, generator=g)
    # defaults: the mean over every row of M(h + v) - M(h), as before
    with torch.no_grad():
        want = (ae(x + v) - ae(x)).double().mean(0).float()
        torch.testing.assert_close(ae.map_direction(v, x), want)
        # a push of step * v over the first rows, in units of v
        h = x[:10]
        want = ((ae(h + 0.3 * v) - ae(h)) / 0.3).double().mean(0).float()
    torch.testing.assert_close(ae.map_direction(v, x, step=0.3, max_rows=10), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="step"):
        ae.map_direction(v, x, step=0.0)
    with pytest.raises(ValueError, match="max_rows"):
        ae.map_direction(v, x, max_rows=0)


# ---------------------------------------------------------------- lowrank (reduced-rank ridge)


def _rrr_reference(
    x: torch.Tensor, y: torch.Tensor, rank: int, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """Reduced-rank ridge regression written out in numpy: ridge as least squares on the
    augmented rows, then the top right singular vectors of the augmented fitted values."""
    X, Y = x.double().numpy(), y.double().numpy()
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    n, d = Xc.shape
    s = np.trace(Xc.T @ Xc / n) / d
    Xa = np.vstack([Xc, np.sqrt(n * ridge * s) * np.eye(d)])
    Ya = np.vstack([Yc, np.zeros((d, Y.shape[1]))])
    W = np.linalg.lstsq(Xa, Ya, rcond=None)[0]
    vt = np.linalg.svd(Xa @ W, full_matrices=False)[2]
    vr = vt[:rank].T
    Wr = W @ vr @ vr.T
    return Wr, my - mx @ Wr


@pytest.fixture(scope="module")
def rank3_data():
    g = torch.Generator().manual_seed(1)
    n, ds, dt = 2000, 12, 20
    x = torch.randn(n, ds, generator=g) * 2 + 3
    w = torch.randn(ds, 3, generator=g) @ torch.randn(3, dt, generator=g)  # true rank 3
    y = x @ w + 1.0 + 0.3 * torch.randn(n, dt, generator=g)
    return x, y


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_lowrank_equals_numpy_reduced_rank_ridge(rank3_data, ridge):
    x, y = rank3_data
    p = make_pairs(x, y)
    mapper, hist = fit_mapper(
        p, "lowrank", {"rank": 2, "ridge": ridge, "batch_size": 300}, val=p, progress=False
    )
    Wr, br = _rrr_reference(x, y, 2, ridge)
    assert mapper.rank == 2 and hist["rank"] == 2 and mapper.config.rank == 2
    np.testing.assert_allclose(mapper.weight.detach().double().numpy(), Wr, atol=1e-4)
    np.testing.assert_allclose(mapper.bias.detach().double().numpy(), br, atol=1e-4)
    assert np.linalg.matrix_rank(mapper.weight.detach().double().numpy(), tol=1e-6) == 2
    # optimal among rank-2 maps: no worse in training error than truncating the full fit's SVD
    full, _ = fit_mapper(p, "affine", {"ridge": ridge}, val=p, progress=False)
    u, sv, vt = np.linalg.svd(full.linear.weight.detach().double().numpy().T, full_matrices=False)
    Wsvd = (u[:, :2] * sv[:2]) @ vt[:2]
    X, Y = x.double().numpy(), y.double().numpy()

    def sse(W):
        b = Y.mean(0) - X.mean(0) @ W
        return ((Y - X @ W - b) ** 2).sum()

    if ridge == 0.0:
        assert sse(Wr) <= sse(Wsvd) * (1 + 1e-9)


def test_lowrank_at_full_rank_is_the_affine_map(linear_data):
    x, y = linear_data
    p = make_pairs(x, y)
    low, _ = fit_mapper(p, "lowrank", {"rank": 64, "ridge": 0.0}, val=p, progress=False)
    aff, _ = fit_mapper(p, "affine", {"ridge": 0.0}, val=p, progress=False)
    assert low.rank == 12  # min(d_src, d_tgt)
    torch.testing.assert_close(low(x[:50]), aff(x[:50]), atol=1e-3, rtol=1e-4)


def test_lowrank_rank_is_chosen_on_validation(rank3_data):
    x, y = rank3_data
    mapper, hist = fit_mapper(make_pairs(x, y), "lowrank", {"rank_grid": [1, 2, 3, 4, 8, 12]}, progress=False)
    by = {r["rank"]: r["val_mse"] for r in hist["rank_candidates"]}
    assert sorted(by) == [1, 2, 3, 4, 8, 12]
    assert by[2] > 2 * by[3]  # below the true rank the error is large ...
    assert mapper.rank >= 3 and by[mapper.rank] <= by[3] * 1.01  # ... above it, nothing gained
    assert mapper.rank == min(by, key=by.get)
    assert mapper.meta["history"]["rank"] == mapper.rank


def test_lowrank_bad_input_is_named(rank3_data):
    x, y = rank3_data
    p = make_pairs(x, y)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        fit_mapper(p, "lowrank", {"rank": 0, "ridge": 0.0}, val=p, progress=False)
    from xferlens.mappers import LowRankConfig, LowRankMapper

    with pytest.raises(ValueError, match="built with a rank"):
        LowRankMapper(12, 20, LowRankConfig())
    with pytest.raises(ValueError, match="unknown LowRankConfig field"):
        fit_mapper(p, "lowrank", {"ranks": 3}, progress=False)
