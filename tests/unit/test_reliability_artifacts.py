"""Nothing lost, nothing silently wrong: sealed artifacts, range checks on load, generation
edge cases, layers of any integer type, recalibration scales (issue 19)."""

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from xferlens.activations import resid_post, resolve_hooks
from xferlens.artifacts import HOOK_NAME, ArtifactError, seal_of
from xferlens.identity import model_identity
from xferlens.mappers import AffineMapper, MapperFileError, load_mapper
from xferlens.steering import (
    SteeringFileError,
    diff_of_means,
    generate,
    load_steering_vector,
    stop_token_ids,
    transfer,
)

POS = ["the cat sat on the mat", "a dog ran", "birds sing in the morning", "hello there world"]
NEG = ["numbers 1 2 3", "x y z", "the sky is blue today", "one more prompt here ok"]


def _mapper(model, layer: int = 1) -> AffineMapper:
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    m = AffineMapper(d, d).set_solution(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g), torch.zeros(d))
    ident = model_identity(model)
    m.meta = {
        "src": {**ident, "hook": resid_post(layer)},
        "tgt": {**ident, "hook": resid_post(layer)},
        "training": {"src_norm": 2.0, "tgt_norm": 3.0, "src_spread": 1.0, "tgt_spread": 1.5, "rows": 10},
    }
    return m


@pytest.fixture
def saved(tiny_tl, tmp_path):
    """A saved mapper and a saved steering vector: ``{"mapper": folder, "vector": folder}``."""
    model = tiny_tl("llama")
    _mapper(model).save(tmp_path / "m")
    diff_of_means(model, POS, NEG, hooks=[0, 1]).save(tmp_path / "v")
    return {"mapper": tmp_path / "m", "vector": tmp_path / "v", "model": model}


def _edit_header(path: Path, edit) -> dict:
    """Apply ``edit`` to the parsed header and write it back the way the writer does."""
    header = json.loads(path.read_text())
    edit(header)
    path.write_text(json.dumps(header, indent=1) + "\n")
    return header


def _unseal(folder: Path, stem: str, edit=None) -> None:
    """Rewrite an artifact in the pre-seal format: no seal, no trailing newline (what the old
    writer produced), after an optional ``edit`` of the header."""
    path = folder / f"{stem}.json"
    header = json.loads(path.read_text())
    header.pop("seal")
    if edit is not None:
        edit(header)
    path.write_text(json.dumps(header, indent=1, default=float))


# ----------------------------------------------------------------- the reproductions


def test_editing_tgt_norm_is_refused(saved):
    path = saved["mapper"] / "mapper.json"
    _edit_header(
        path, lambda h: h["meta"]["training"].update(tgt_norm=h["meta"]["training"]["tgt_norm"] * 100)
    )
    with pytest.raises(MapperFileError, match="seal") as e:
        load_mapper(saved["mapper"])
    assert str(path) in str(e.value) and "get the artifact again" in str(e.value)


def test_editing_the_source_hook_is_refused(saved):
    _edit_header(saved["mapper"] / "mapper.json", lambda h: h["meta"]["src"].update(hook=resid_post(0)))
    with pytest.raises(MapperFileError, match="seal"):
        load_mapper(saved["mapper"])


@pytest.mark.parametrize("field", ["name", "weights", "tokenizer"])
def test_editing_model_identities_is_refused(saved, field):
    _edit_header(saved["mapper"] / "mapper.json", lambda h: h["meta"]["tgt"].update({field: "other"}))
    with pytest.raises(MapperFileError, match="seal"):
        load_mapper(saved["mapper"])
    _edit_header(saved["vector"] / "vector.json", lambda h: h["model"].update({field: "other"}))
    with pytest.raises(SteeringFileError, match="seal"):
        load_steering_vector(saved["vector"])


def test_renaming_a_tensor_and_recomputing_its_hash_is_refused(saved):
    w = saved["vector"] / "vector.safetensors"
    raw = w.read_bytes()
    assert raw.count(b"blocks.1.hook_resid_post") == 1
    raw = raw.replace(b"blocks.1.hook_resid_post", b"blocks.2.hook_resid_post")
    w.write_bytes(raw)
    new_sha = hashlib.sha256(raw).hexdigest()

    def edit(h):
        h["weights_sha256"] = new_sha
        h["tensors"] = {k.replace("blocks.1", "blocks.2"): v for k, v in h["tensors"].items()}

    _edit_header(saved["vector"] / "vector.json", edit)
    with pytest.raises(SteeringFileError, match="seal"):
        load_steering_vector(saved["vector"])


def test_changing_a_weight_and_recomputing_its_hash_is_refused(saved):
    from safetensors.torch import load_file, save_file

    w = saved["mapper"] / "mapper.safetensors"
    tensors = load_file(w)
    tensors["linear.bias"][0] += 1.0
    save_file(tensors, w)
    _edit_header(
        saved["mapper"] / "mapper.json",
        lambda h: h.update(weights_sha256=hashlib.sha256(w.read_bytes()).hexdigest()),
    )
    with pytest.raises(MapperFileError, match="seal"):
        load_mapper(saved["mapper"])


def test_a_whitespace_edit_is_refused(saved):
    path = saved["mapper"] / "mapper.json"
    path.write_text(path.read_text().replace("\n ", "\n  ", 1))
    with pytest.raises(MapperFileError, match="form it was written in"):
        load_mapper(saved["mapper"])


def test_sealed_artifacts_round_trip(saved):
    model = saved["model"]
    m = load_mapper(saved["mapper"], model, model)
    assert m.meta["training"]["tgt_norm"] == 3.0
    v = load_steering_vector(saved["vector"], model)
    header = json.loads((saved["vector"] / "vector.json").read_text())
    assert list(header)[-1] == "seal" and header["seal"] == seal_of(header)
    # the transfer reads what was saved
    t = transfer(v, m, hook=resid_post(1), recalibrate=True)
    assert torch.isfinite(t.direction()).all()


# ----------------------------------------------------------------- random edits, property style


def _random_edit(rng: random.Random, folder: Path, stem: str) -> str:
    """One random edit of one of the artifact's files; returns what it did."""
    which = rng.choice(["json-byte", "json-value", "tensors-byte"])
    if which == "json-value":
        path = folder / f"{stem}.json"
        header = json.loads(path.read_text())
        leaves = []

        def walk(node, trail):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if isinstance(v, dict | list) and v:
                    walk(v, (*trail, k))
                else:
                    leaves.append(((*trail, k), v))

        walk(header, ())
        trail, value = rng.choice(leaves)
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, int | float):
            new = value * 2 + 1
        elif isinstance(value, str):
            new = value + "x"
        else:
            new = 0
        node = header
        for k in trail[:-1]:
            node = node[k]
        node[trail[-1]] = new
        path.write_text(json.dumps(header, indent=1) + "\n")
        return f"{which} {trail}: {value!r} -> {new!r}"
    path = folder / (f"{stem}.json" if which == "json-byte" else f"{stem}.safetensors")
    raw = bytearray(path.read_bytes())
    pos = rng.randrange(len(raw))
    old = raw[pos]
    raw[pos] = rng.choice([b for b in range(256) if b != old])
    path.write_bytes(bytes(raw))
    return f"{which} at {pos}: {old} -> {raw[pos]}"


@pytest.mark.parametrize("kind", ["mapper", "vector"])
def test_every_random_single_edit_is_refused(saved, kind):
    folder = saved[kind]
    load = load_mapper if kind == "mapper" else load_steering_vector
    originals = {p: p.read_bytes() for p in folder.iterdir()}
    rng = random.Random(19)
    for _ in range(30):
        for p, data in originals.items():
            p.write_bytes(data)
        what = _random_edit(rng, folder, kind)
        try:
            load(folder)
        except ArtifactError:
            continue
        pytest.fail(f"{kind}: the edit {what} loaded silently")


# ----------------------------------------------------------------- artifacts from before seals


def test_an_unsealed_artifact_from_the_old_writer_still_loads(saved, caplog):
    model = saved["model"]
    _unseal(saved["mapper"], "mapper")
    _unseal(saved["vector"], "vector")
    with caplog.at_level(logging.WARNING, logger="xferlens"):
        m = load_mapper(saved["mapper"], model, model)
        v = load_steering_vector(saved["vector"], model)
    assert m.meta["training"]["tgt_norm"] == 3.0 and len(v.hooks) == 2
    assert sum("unsealed" in r.getMessage() for r in caplog.records) == 2


def test_a_seal_removed_by_an_edit_is_refused(saved):
    path = saved["mapper"] / "mapper.json"
    path.write_text(path.read_text().replace('"seal"', '"seak"'))
    with pytest.raises(MapperFileError, match="no seal"):
        load_mapper(saved["mapper"])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["meta"]["training"].update(tgt_norm=-1.0), "tgt_norm"),
        (lambda h: h["meta"]["training"].update(tgt_norm=0.0), "tgt_norm"),
        (lambda h: h["meta"]["training"].update(src_norm=float("nan")), "src_norm"),
        (lambda h: h["meta"]["training"].update(tgt_spread=float("inf")), "tgt_spread"),
        (lambda h: h["meta"]["training"].update(src_spread="1.0"), "src_spread"),
        (lambda h: h["meta"]["src"].update(hook="blocks.1.resid_post"), "hook name"),
        (lambda h: h["meta"]["src"].update(hook="blocks.7.hook_resid_post"), "layer 7"),
        (lambda h: h["meta"]["tgt"].update(d_model=65), "d_model"),
        (lambda h: h.update(d_src=True), "d_src"),
        (lambda h: h["meta"]["src"].update(n_layers=0), "n_layers"),
    ],
)
def test_unsealed_mapper_values_are_range_checked(saved, edit, match):
    _unseal(saved["mapper"], "mapper", edit)
    with pytest.raises(MapperFileError, match=match):
        load_mapper(saved["mapper"])


def _rename_tensor(folder: Path, old: str, new: str, value=None) -> None:
    from safetensors.torch import load_file, save_file

    w = folder / "vector.safetensors"
    tensors = load_file(w)
    tensors[new] = tensors.pop(old) if value is None else value
    save_file(tensors, w)
    sha = hashlib.sha256(w.read_bytes()).hexdigest()

    def edit(h):
        h["weights_sha256"] = sha
        h["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
        h["act_norm"] = {k: v for k, v in h["act_norm"].items() if k in tensors}

    _unseal(folder, "vector", edit)


@pytest.mark.parametrize(
    "new, match",
    [("not_a_hook", "not a TransformerLens hook"), ("blocks.9.hook_resid_post", "layer 9")],
)
def test_unsealed_vector_tensor_names_must_be_hooks(saved, new, match):
    _rename_tensor(saved["vector"], resid_post(1), new)
    with pytest.raises(SteeringFileError, match=match):
        load_steering_vector(saved["vector"])


def test_unsealed_vector_nan_tensor_is_refused(saved):
    _rename_tensor(saved["vector"], resid_post(1), resid_post(1), value=torch.full((64,), float("nan")))
    with pytest.raises(SteeringFileError, match="NaN"):
        load_steering_vector(saved["vector"])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["act_norm"].update({"blocks.2.hook_resid_post": 1.0}), "act_norm names hook"),
        (lambda h: h["act_norm"].update({resid_post(0): float("nan")}), "act_norm"),
        (lambda h: h["model"].update(d_model=32), "d_model"),
        (lambda h: h["model"].update(n_layers=1), "layer 1"),
    ],
)
def test_unsealed_vector_values_are_range_checked(saved, edit, match):
    _unseal(saved["vector"], "vector", edit)
    with pytest.raises(SteeringFileError, match=match):
        load_steering_vector(saved["vector"])


def test_hook_pattern_accepts_every_transformer_lens_hook(tiny_tl):
    for arch in ("llama", "gpt2"):
        for name in tiny_tl(arch).hook_dict:
            assert HOOK_NAME.match(name), name


# ----------------------------------------------------------------- recalibration scales


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan"), float("inf"), "3.0"])
def test_recalibrate_refuses_a_bad_recorded_scale(tiny_tl, bad):
    model = tiny_tl("llama")
    v = diff_of_means(model, POS, NEG, hooks=1)
    m = _mapper(model)
    m.meta["training"]["tgt_norm"] = bad
    with pytest.raises(ValueError, match="tgt_norm") as e:
        transfer(v, m, recalibrate=True)
    assert repr(bad) in str(e.value)
    m.meta["training"]["tgt_norm"] = 3.0
    m.meta["training"]["src_spread"] = bad
    with pytest.raises(ValueError, match="src_spread"):
        transfer(v, m, recalibrate="spread")
    for how in ("norm", False):
        assert torch.isfinite(transfer(v, m, recalibrate=how).direction()).all()


# ----------------------------------------------------------------- layers of any integer type


def test_layers_may_be_numpy_or_torch_integers(tiny_tl):
    model = tiny_tl("llama")
    scores = np.array([0.1, 0.9, 0.3])
    assert resolve_hooks(model, np.argmax(scores)) == [resid_post(1)]
    assert resolve_hooks(model, torch.tensor(scores).argmax()) == [resid_post(1)]
    assert resolve_hooks(model, [np.int64(0), torch.tensor(2), np.int32(1)]) == [
        resid_post(0),
        resid_post(2),
        resid_post(1),
    ]
    assert resolve_hooks(model, torch.tensor([0, 1])) == [resid_post(0), resid_post(1)]
    v = diff_of_means(model, POS, NEG, hooks=np.int64(1))
    assert v.hook == resid_post(1)
    with pytest.raises(ValueError, match="out of range"):
        resolve_hooks(model, np.int64(7))


@pytest.mark.parametrize(
    "bad", [True, np.bool_(True), 1.0, np.float64(1.0), torch.tensor(1.0), torch.tensor(True), [0, 1.5]]
)
def test_bools_and_floats_are_not_layers(tiny_tl, bad):
    # the test run wraps the library in beartype, which refuses these before the body runs;
    # a user's session has no such wrapper, so check the function's own message
    unchecked = getattr(resolve_hooks, "__wrapped__", resolve_hooks)
    with pytest.raises(TypeError, match="integer layer number"):
        unchecked(tiny_tl("llama"), bad)


# ----------------------------------------------------------------- generation edge cases


def test_an_empty_prompt_is_named(tiny_tl):
    model = tiny_tl("llama")
    with pytest.raises(ValueError, match="prompt 0"):
        generate(model, [""], max_new_tokens=3, progress=False)
    with pytest.raises(ValueError, match="prompt 1"):
        generate(model, ["hello", ""], max_new_tokens=3, progress=False)


def _long_prompt(model, n_tokens: int) -> str:
    text = "a b " * n_tokens
    while len(model.to_tokens(text)[0]) > n_tokens:
        text = text[2:]
    return text


def test_a_prompt_too_long_for_the_context(tiny_tl):
    model = tiny_tl("llama")
    n_ctx = model.cfg.n_ctx
    text = _long_prompt(model, n_ctx - 5)
    n = len(model.to_tokens(text)[0])
    assert generate(model, [text], max_new_tokens=n_ctx - n, progress=False)  # fits exactly
    with pytest.raises(ValueError, match=rf"prompt 1 is {n} tokens.*n_ctx={n_ctx}.*truncate=True"):
        generate(model, ["hi", text], max_new_tokens=10, progress=False)
    with pytest.warns(UserWarning, match="prompt 0"):
        got = generate(model, [text], max_new_tokens=10, truncate=True, progress=False)[0]
    # reference: TransformerLens's own generate on BOS + the last n_ctx - 11 tokens
    ids = model.to_tokens(text)[0]
    kept = torch.cat([ids[:1], ids[len(ids) - (n_ctx - 11) :]])[None]
    out = model.generate(kept, max_new_tokens=10, do_sample=False, verbose=False, stop_at_eos=False)
    new = out[0, kept.shape[1] :].tolist()
    stops = stop_token_ids(model)
    for j, t in enumerate(new):
        if t in stops:
            new = new[:j]
            break
    assert got == model.tokenizer.decode(new, skip_special_tokens=True)
    with pytest.raises(ValueError, match="fewer than"):
        generate(model, ["hi"], max_new_tokens=n_ctx, truncate=True, progress=False)
