"""Caching, positions, shards and pairing on tiny random models (no network)."""

import json
import logging

import pytest
import torch

from xferlens import load_model
from xferlens.activations import (
    ShardedActivations,
    ShardError,
    align_sets,
    cache_activations,
    cache_to_disk,
    paired_activations,
    positions,
)
from xferlens.activations.cache import ActivationSet
from xferlens.activations.tokens import NoOffsetsError, length_batches, pad_batch, pad_id

TEXTS = [
    "the cat in the hat",
    "an apple",
    "<|im_start|>user\nthe |prod| hat then the cat<|im_end|>\n",
    "x" * 3 + " then the other one in the hat ate an apple",
]


@pytest.fixture(scope="module")
def tiny(tiny_hf_folder, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    return load_model(tiny_hf_folder("llama"), device="cpu", progress=False, home=home)


@pytest.fixture(scope="module")
def tiny_qwen(tiny_hf_folder, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    return load_model(tiny_hf_folder("qwen2"), device="cpu", progress=False, home=home)


def hand_recorded(model, text, hook):
    """Reference: a plain hook on a full, unbatched forward pass."""
    seen = {}

    def rec(act, hook):
        seen["x"] = act[0].detach().clone()

    model.run_with_hooks(model.to_tokens(text), fwd_hooks=[(hook, rec)])
    return seen["x"]


@pytest.mark.parametrize(
    "hook", ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.2.hook_resid_pre"]
)
def test_cache_equals_hand_hook_and_padding_never_leaks(tiny, hook):
    acts = cache_activations(tiny, TEXTS, hook, batch_size=3, progress=False, drop_special=False)
    for i, text in enumerate(TEXTS):
        ref = hand_recorded(tiny, text, hook)
        rows = acts.rows(hook)[acts.text_index == i]
        assert rows.shape == ref.shape  # one row per real token: no padding rows
        torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-5)
        assert acts.position[acts.text_index == i].tolist() == list(range(ref.shape[0]))
    assert len(acts) == sum(tiny.to_tokens(t).shape[1] for t in TEXTS)


def test_stop_at_layer_is_used(tiny, monkeypatch):
    seen = []
    real_forward = tiny.forward

    def spy(*a, **kw):
        seen.append(kw.get("stop_at_layer"))
        return real_forward(*a, **kw)

    monkeypatch.setattr(tiny, "forward", spy)
    cache_activations(tiny, TEXTS, [0, "blocks.1.hook_resid_mid"], progress=False)
    assert set(seen) == {2}
    seen.clear()
    cache_activations(tiny, TEXTS, "ln_final.hook_normalized", progress=False)
    assert set(seen) == {None}


def test_positions_and_special_tokens(tiny):
    a = cache_activations(tiny, TEXTS, 1, progress=False)  # drop_special=True by default
    im_start = tiny.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start not in a.token_ids.tolist()
    last = cache_activations(tiny, TEXTS, 1, positions="last", progress=False)
    assert last.text_index.tolist() == [0, 1, 2, 3]
    assert last.position.tolist() == [tiny.to_tokens(t).shape[1] - 1 for t in TEXTS]
    trig = cache_activations(tiny, TEXTS, 1, positions=positions.substring("|prod|"), progress=False)
    assert set(trig.text_index.tolist()) == {2}
    covered = "".join(TEXTS[2][s:e] for s, e in trig.char_spans.tolist())
    assert "|prod|" in covered and len(covered) <= len("|prod|") + 2
    after = cache_activations(tiny, TEXTS, 1, positions=positions.after("user\n"), progress=False)
    assert set(after.text_index.tolist()) == {2}
    assert min(s for s, _ in after.char_spans.tolist()) >= TEXTS[2].index("user\n") + 5


def test_storage_dtypes(tiny):
    full = cache_activations(tiny, TEXTS, 1, progress=False)
    for dt in ["float16", "bfloat16"]:
        low = cache_activations(tiny, TEXTS, 1, dtype=dt, progress=False)
        assert low.rows().dtype == getattr(torch, dt)
        torch.testing.assert_close(low.rows().float(), full.rows(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="float8"):
        cache_activations(tiny, TEXTS, 1, dtype="float8", progress=False)


def test_bad_hooks_and_texts(tiny):
    with pytest.raises(ValueError, match=r"layer 7 out of range: .* has 3 layers \(0\.\.2\)"):
        cache_activations(tiny, TEXTS, 7, progress=False)
    with pytest.raises(ValueError, match=r"layer 9 out of range"):
        cache_activations(tiny, TEXTS, "blocks.9.hook_resid_post", progress=False)
    with pytest.raises(ValueError, match="does not exist.*valid layers 0..2"):
        cache_activations(tiny, TEXTS, "blocks.1.hook_resid_sideways", progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        cache_activations(tiny, [], 1, progress=False)


def test_too_long_texts(tiny, caplog):
    long = ["the cat " * 200]
    with pytest.raises(ValueError, match="text 0 is .* tokens long.*truncate=True"):
        cache_activations(tiny, long, 1, truncate=False, max_length=64, progress=False)
    with caplog.at_level(logging.WARNING, logger="xferlens"):
        a = cache_activations(tiny, long, 1, max_length=64, progress=False)
    assert len(a) == 64 and "cut to 64" in caplog.text


def test_slow_tokenizer_is_refused_when_offsets_are_needed(tiny, monkeypatch):
    monkeypatch.setattr(type(tiny.tokenizer), "is_fast", property(lambda self: False))
    with pytest.raises(NoOffsetsError, match="offsets"):
        cache_activations(tiny, TEXTS, 1, progress=False)


# ---------------------------------------------------------------------------------- shards


def test_shards_round_trip_and_batches(tiny, tmp_path):
    texts = [f"the cat {i} in the hat" for i in range(30)] + TEXTS
    store = cache_to_disk(
        tiny, texts, tmp_path / "acts", [1, 2], shard_rows=50, dtype="float32", progress=False
    )
    mem = cache_activations(tiny, texts, [1, 2], progress=False)
    assert len(store) == len(mem) and len(store.manifest["shards"]) > 2
    back = store.load()
    for h in mem.hooks:
        assert torch.equal(back.rows(h), mem.rows(h))
    assert back.texts == texts
    seen = torch.cat(
        [b["text_index"] * 10_000 + b["position"] for b in store.batches(17, shuffle=True, seed=1)]
    )
    assert sorted(seen.tolist()) == sorted((mem.text_index * 10_000 + mem.position).tolist())
    ordered = torch.cat([b["text_index"] for b in store.batches(17)])
    assert not torch.equal(seen, ordered)
    assert [p.name for p in tmp_path.iterdir()] == ["acts"]  # no staging left behind


def test_shards_refuse_tampering(tiny, tmp_path):
    folder = tmp_path / "acts"
    cache_to_disk(tiny, TEXTS * 5, folder, 1, shard_rows=40, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cache_to_disk(tiny, TEXTS, folder, 1, progress=False)
    shard = folder / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(raw))
    store = ShardedActivations(folder)
    with pytest.raises(ShardError, match="sha256"):
        list(store.batches(1000))
    (folder / "shard-00099.safetensors").write_bytes(b"x")
    with pytest.raises(ShardError, match="not in manifest"):
        ShardedActivations(folder)
    (folder / "shard-00099.safetensors").unlink()
    shard.write_bytes(bytes(raw[:-8]))
    with pytest.raises(ShardError, match="truncated"):
        ShardedActivations(folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["n_rows"] += 1
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="add up"):
        ShardedActivations(folder)
    with pytest.raises(ShardError, match="no manifest"):
        ShardedActivations(tmp_path)


# ---------------------------------------------------------------------------------- pairs


def test_same_tokenizer_pairs_by_position(tiny, tiny_qwen):
    pairs = paired_activations(tiny, tiny_qwen, TEXTS, 1, 2, progress=False)
    assert pairs.alignment == "position" and pairs.coverage == {"src": 1.0, "tgt": 1.0}
    a = cache_activations(tiny, TEXTS, 1, progress=False)
    b = cache_activations(tiny_qwen, TEXTS, 2, progress=False)
    assert torch.equal(pairs.src, a.rows()) and torch.equal(pairs.tgt, b.rows())
    train, val = pairs.split(0.25, seed=0)
    assert len(train) + len(val) == len(pairs)
    assert not set(train.text_index.tolist()) & set(val.text_index.tolist())


def _fake_set(texts, spans_per_text, d=2, name="m"):
    rows, ti, pos, sp = [], [], [], []
    for t, spans in enumerate(spans_per_text):
        for p, s in enumerate(spans):
            rows.append([float(t), float(p)] + [0.0] * (d - 2))
            ti.append(t)
            pos.append(p)
            sp.append(s)
    n = len(ti)
    return ActivationSet(
        {"h": torch.tensor(rows)},
        torch.tensor(ti),
        torch.tensor(pos),
        torch.zeros(n, dtype=torch.long),
        torch.tensor(sp),
        list(texts),
        {"model": name},
    )


def test_char_end_rule():
    texts = ["hello world 🙂"]
    # source: "hello" " world" " " + two byte tokens of the emoji (both spanning it)
    src = _fake_set(texts, [[(0, 5), (5, 11), (11, 12), (12, 13), (12, 13)]], name="s")
    # target: "hel" "lo wor" "ld" " 🙂"
    tgt = _fake_set(texts, [[(0, 3), (3, 9), (9, 11), (11, 13)]], name="t")
    pairs = align_sets(src, tgt, "h", "h", "char_end")
    assert pairs.src_position.tolist() == [1, 4]  # " world" and the emoji's last byte token
    assert pairs.tgt_position.tolist() == [2, 3]
    assert pairs.coverage == {"src": 2 / 5, "tgt": 2 / 4}
    with pytest.raises(ValueError, match="different texts"):
        align_sets(src, _fake_set(["other"], [[(0, 5)]]), "h", "h", "char_end")


def test_left_padding_tokenizer_does_not_mask_real_tokens(tiny):
    """A text that starts with the pad id must not be masked when the tokenizer pads left."""
    tok = tiny.tokenizer
    saved = (tok.padding_side, tok.pad_token)
    tok.padding_side, tok.pad_token = "left", "t"  # 't' is the first token of TEXTS[0]
    try:
        acts = cache_activations(tiny, TEXTS[:2], 1, batch_size=2, progress=False, drop_special=False)
        assert tok.padding_side == "left"  # restored after the forward pass
    finally:
        tok.padding_side, tok.pad_token = saved
    ref = hand_recorded(tiny, TEXTS[0], "blocks.1.hook_resid_post")
    torch.testing.assert_close(acts.rows()[acts.text_index == 0], ref, rtol=1e-4, atol=1e-5)


def test_cached_rows_carry_no_autograd_graph(tiny):
    """Rows must not keep the forward pass alive (that once cost 20 GB on 60 texts)."""
    assert torch.is_grad_enabled()
    a = cache_activations(tiny, TEXTS, 1, progress=False)
    assert not a.rows().requires_grad and a.rows().grad_fn is None


def test_activation_set_fields_share_their_row_count():
    """The shared jaxtyping aliases are checked at run time: n must agree across fields."""
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        ActivationSet(
            {"h": torch.zeros(3, 4)},
            torch.zeros(2, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3, 2, dtype=torch.long),
            ["t"],
            {},
        )


@pytest.mark.parametrize("max_tokens", [None, 1, 7, 20, 1000])
def test_length_batches_respect_the_token_budget(max_tokens):
    lengths = [3, 17, 5, 9, 9, 1, 12, 30, 2, 8]
    batches = list(length_batches(lengths, 4, max_tokens))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each once
    for b in batches:
        assert 1 <= len(b) <= 4
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or max_tokens is None or len(b) * width <= max_tokens
        assert lengths[b[0]] == width  # longest first, so the first row sets the width
    if max_tokens is None:
        assert [len(b) for b in batches] == [4, 4, 2]
    with pytest.raises(ValueError, match="max_tokens"):
        list(length_batches(lengths, 4, 0))


def test_token_budget_changes_batches_not_activations(tiny, monkeypatch):
    widths = []
    real_forward = tiny.forward

    def spy(tokens, *a, **kw):
        widths.append(tuple(tokens.shape))
        return real_forward(tokens, *a, **kw)

    monkeypatch.setattr(tiny, "forward", spy)
    free = cache_activations(tiny, TEXTS, 1, batch_size=4, progress=False, max_batch_tokens=None)
    assert len(widths) == 1
    widths.clear()
    capped = cache_activations(tiny, TEXTS, 1, batch_size=4, progress=False, max_batch_tokens=16)
    assert len(widths) > 1 and all(b * w <= 16 or b == 1 for b, w in widths)
    for i in range(len(TEXTS)):
        torch.testing.assert_close(
            capped.rows()[capped.text_index == i], free.rows()[free.text_index == i], rtol=1e-4, atol=1e-5
        )
    widths.clear()
    pairs = paired_activations(tiny, tiny, TEXTS, 1, 1, batch_size=4, progress=False, max_batch_tokens=16)
    assert widths and all(b * w <= 16 or b == 1 for b, w in widths)  # passed through to both models
    assert len(pairs) == len(free)


def test_overwrite_replaces_only_a_shard_folder(tiny, tmp_path):
    """Issue 19, finding 1: ``overwrite=True`` on a folder xferlens did not write refuses,
    naming what is there, and deletes nothing; a shard folder it wrote is replaced."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis.txt"):
        cache_to_disk(tiny, TEXTS, folder, 1, overwrite=True, progress=False)
    assert (folder / "thesis.txt").read_text() == "precious"
    shards = tmp_path / "acts"
    cache_to_disk(tiny, TEXTS, shards, 1, progress=False)
    (shards / "notes.md").write_text("mine")  # a shard folder with a user's file in it
    with pytest.raises(FileExistsError, match="notes.md"):
        cache_to_disk(tiny, TEXTS, shards, 1, overwrite=True, progress=False)
    (shards / "notes.md").unlink()
    store = cache_to_disk(tiny, TEXTS[:2], shards, 1, overwrite=True, progress=False)
    assert store.load().texts == TEXTS[:2]


def test_a_killed_writers_stage_is_removed_and_a_live_ones_kept(tiny, tmp_path):
    """A writer killed outright (SIGKILL: no ``finally``) leaves ``.NAME-partial-*``; the next
    write of that folder removes it when its owner is dead, and leaves a live writer's."""
    import fcntl
    import os
    import subprocess
    import sys

    from xferlens import paths

    out = tmp_path / "acts"
    dead = tmp_path / ".acts-partial-dead"
    dead.mkdir()
    (dead / "shard-00000.safetensors").write_bytes(b"half")
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (dead / paths.STAGE_LOCK).write_text(proc.stdout.strip())  # its writer's pid, now gone
    live = tmp_path / ".acts-partial-live"
    live.mkdir()
    fd = paths.claim_stage(live)  # a writer still running (this process holds the lock)
    try:
        store = cache_to_disk(tiny, TEXTS[:2], out, 1, progress=False)
        assert not dead.exists() and live.exists()
        assert store.load().texts == TEXTS[:2]
        assert not (out / paths.STAGE_LOCK).exists()  # the lock never lands in the result
        assert set(tmp_path.glob(".acts-partial-*")) == {live}  # no stage of this write left
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_pad_batch_lays_rows_out_on_either_side_with_one_pad_rule():
    from types import SimpleNamespace

    tok = SimpleNamespace(pad_token_id=9, eos_token_id=8)
    rows = [[1, 2, 3], [4], [5, 6]]
    right = pad_batch(tok, rows, "right")
    assert right.tokens.tolist() == [[1, 2, 3], [4, 9, 9], [5, 6, 9]]
    assert right.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert right.lengths.tolist() == [3, 1, 2] and right.last.tolist() == [2, 0, 1]
    left = pad_batch(tok, rows, "left")
    assert left.tokens.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert left.mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert left.last.tolist() == [2, 2, 2]
    # the real tokens of each row, read back through the mask, are the row
    for b in (right, left):
        assert [b.tokens[r][b.mask[r].bool()].tolist() for r in range(3)] == rows
    # per-token values follow the same layout
    spans = [[(0, 1), (1, 2), (2, 3)], [(0, 4)], [(0, 1), (1, 3)]]
    laid = left.pad_like(spans, 0, torch.long)
    assert laid.shape == (3, 3, 2) and laid[1].tolist() == [[0, 0], [0, 0], [0, 4]]
    flags = right.pad_like([[True, False, True], [True], [False, True]], False)
    assert flags.dtype == torch.bool and flags.tolist()[1] == [True, False, False]
    with pytest.raises(ValueError, match="entries per row"):
        right.pad_like([[1], [2], [3]])
    # pad id: the tokenizer's pad, else its EOS, else 0
    assert pad_id(tok) == 9
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=8)) == 8
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id(None) == 0
    assert pad_batch(None, [[7], [7, 7]], "left").tokens.tolist() == [[0, 7], [7, 7]]
    with pytest.raises(ValueError, match="non-empty"):
        pad_batch(tok, [], "left")
