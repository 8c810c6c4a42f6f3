"""Data parallelism: 2 gloo ranks on CPU under torchrun, against one process.

Starting torchrun (two fresh interpreters importing torch and TransformerLens) costs more
than the work, so one launch runs the whole ``fit`` job (caching, pairing, three fits, a
tiny experiment spec through ``xferlens run`` and its resume, then a caching where rank 1
raises) and the tests below read what it left; a second launch has rank 1 die outright.
The single-process references are computed here, in the test process. Activations are
cached one text per forward pass (``batch_size=1``), so no padding differs between a
rank's share and the whole and the rows must be equal bit for bit.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import dist_workers as W
from tests.unit.test_experiment import tiny_spec
from xferlens import cli
from xferlens import distributed as xd
from xferlens.activations import ShardedActivations
from xferlens.activations.pair_shards import PairShards
from xferlens.experiment import run as run_mod
from xferlens.experiment import save_spec, spec_from_dict
from xferlens.mappers import fit_mapper
from xferlens.mappers.fit import rank_part

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [f"the cat {i} sat on the {'big ' * (i % 5)}hat" for i in range(22)] + ["an apple", "x"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def torchrun(job: str, args: dict, folder: Path) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "args.json"
    path.write_text(json.dumps(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env["XFERLENS_HOME"] = str(folder / "home")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tests.helpers.dist_workers", job, str(path)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def job_args(tiny_hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    src, tgt = str(tiny_hf_folder("llama")), str(tiny_hf_folder("qwen2"))
    # maps fitted on every content token (hundreds of rows for 64 dimensions): on fewer
    # rows than dimensions the orthogonal (Procrustes) map is not unique, and any rounding
    # (one process or several) picks another of the equally good solutions
    # enough texts and prompts (and batches of one prompt) that every split step hands
    # rank 1 whole batches of its own: 12 search texts are two caching batches, 9 report
    # texts two, the 3 confirmed prompts three; one report prompt is three completions
    spec = spec_from_dict(
        tiny_spec(
            source={"model": src},
            target={"model": tgt},
            search={"texts": 12},
            mapper={"fit_on": "content", "report_texts": 9, "report_prompts": 1},
            evaluation={"batch_size": 1},
        )
    )
    save_spec(spec, out / "spec.yaml")
    return {
        "src": src,
        "tgt": tgt,
        "texts": TEXTS,
        "shard_rows": 40,
        "chunk_texts": 5,
        "out": str(out),
        "spec": str(out / "spec.yaml"),
    }


@pytest.fixture(scope="module")
def two_ranks(job_args):
    """The ``fit`` job on 2 ranks: (completed process, output folder)."""
    out = Path(job_args["out"])
    return torchrun("fit", job_args, out), out


@pytest.fixture(scope="module")
def one_process(job_args, tmp_path_factory):
    """The same caching, pairing and fits in this one process (no process group)."""
    assert not xd.is_initialized()
    out = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same reduction order in every matmul
    try:
        src, tgt = W.load_pair(job_args)
        acts, pairs = W.cache_and_pair(job_args, src, tgt, out)
        maps = {}
        for kind in ("affine", "orthogonal", "lowrank"):
            mapper, hist = fit_mapper(pairs, kind, W.FIT_CONFIGS[kind], progress=False)
            maps[kind] = (mapper, hist)
    finally:
        torch.set_num_threads(threads)
    return acts, pairs, maps


def sorted_rows(tensors: dict, keys: list[str]) -> dict:
    """Rows in a canonical order (by the index keys), so a multiset compares as tensors."""
    key = torch.zeros(len(tensors[keys[0]]), dtype=torch.int64)
    for k in keys:
        key = key * 100_000 + tensors[k].to(torch.int64)
    order = torch.argsort(key)
    return {k: v[order] for k, v in tensors.items()}


def all_shards(store) -> dict:
    n = len(store.meta["shards"]) if isinstance(store, PairShards) else len(store.manifest["shards"])
    parts = [store.read_shard(i) for i in range(n)]  # each checked against its sha256
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_the_two_rank_job_ran(two_ranks):
    proc, out = two_ranks
    # the job ends with a caching where rank 1 raises, so it exits non-zero (tested below)
    assert all((out / f"rank{r}.json").is_file() for r in (0, 1)), proc.stderr[-6000:]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world"] for s in seen] == [2, 2], proc.stderr[-3000:]


def test_union_of_the_ranks_shards_equals_the_single_process_shards(two_ranks, one_process):
    _, out = two_ranks
    acts1, pairs1, _ = one_process
    acts2 = ShardedActivations(out / "acts")  # checks every shard's size and layout
    m = acts2.manifest
    assert m["ranks"] == 2 and m["n_rows"] == acts1.manifest["n_rows"]
    files = [s["file"] for s in m["shards"]]
    assert any(f.startswith("shard-r000-") for f in files) and any(f.startswith("shard-r001-") for f in files)
    assert sorted(p.name for p in (out / "acts").glob("shard-*")) == sorted(files)
    assert acts2.texts() == TEXTS == acts1.texts()  # texts.jsonl matches its sha256
    keys = ["text_index", "position"]
    a, b = sorted_rows(all_shards(acts2), keys), sorted_rows(all_shards(acts1), keys)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(acts2.load().text_index, acts1.load().text_index)

    pairs2 = PairShards(out / "pairs")
    m2, m1 = pairs2.meta, pairs1.meta
    assert m2["ranks"] == 2 and m2["rows_per_text"] == m1["rows_per_text"]
    assert m2["texts_fingerprint"] == m1["texts_fingerprint"] and m2["coverage"] == m1["coverage"]
    keys = ["text_index", "src_position", "tgt_position"]
    a, b = sorted_rows(all_shards(pairs2), keys), sorted_rows(all_shards(pairs1), keys)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for s in m2["shards"]:  # each shard's recorded text range holds its rows
        t = pairs2.read_shard(m2["shards"].index(s))["text_index"]
        assert s["texts"][0] <= int(t.min()) and int(t.max()) < s["texts"][1]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["affine", "orthogonal", "lowrank"])
def test_distributed_linear_maps_equal_the_single_process_maps(two_ranks, one_process, kind):
    _, out = two_ranks
    mapper, hist = one_process[2][kind]
    got = load_file(out / f"{kind}.safetensors")
    want = mapper.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert rel_diff(got[k], want[k]) <= 1e-6, k
    rec = json.loads((out / "rank0.json").read_text())[kind]
    for k in ("train_rows", "val_rows", "ridge", "rank"):
        if k in hist:
            assert rec["history"][k] == hist[k], k
    assert rec["history"]["ranks"] == 2
    for k, v in rec["training"].items():
        assert v == pytest.approx(mapper.meta["training"][k], rel=1e-9), k


def test_a_multi_layer_source_pairs_and_fits_on_two_ranks_as_in_one_process(two_ranks, job_args):
    """``pairs_to_disk`` with several source layers (what ``source.layers`` runs under
    torchrun): the joined rows and the affine map fitted on them equal one process's."""
    from xferlens.activations import paired_activations

    _, out = two_ranks
    seen = [json.loads((out / f"rank{r}.json").read_text())["multi"] for r in (0, 1)]
    assert seen[0] == seen[1]
    src, tgt = W.load_pair(job_args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs = paired_activations(
            src, tgt, job_args["texts"], W.MULTI_LAYERS, W.TGT_LAYER, batch_size=1, progress=False
        )
        want, _ = fit_mapper(pairs, "affine", W.FIT_CONFIGS["affine"], progress=False)
    finally:
        torch.set_num_threads(threads)
    assert seen[0]["rows"] == len(pairs) and seen[0]["d_src"] == 2 * src.cfg.d_model
    assert seen[0]["src_hook"] == want.src_hook == "blocks.0.hook_resid_post+blocks.2.hook_resid_post"
    got = load_file(out / "multi.safetensors")
    for k, v in want.state_dict().items():
        assert rel_diff(got[k], v) <= 1e-6, k


def test_every_rank_ends_with_the_same_maps(two_ranks):
    _, out = two_ranks
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    for kind in W.FIT_KINDS:
        assert r0[kind]["digest"] == r1[kind]["digest"], kind
    ae = r0["autoencoder"]["history"]
    # DDP: one early-stopping decision; starts from the affine map, so never worse on val
    assert ae["ranks"] == 2 and ae["steps"] > 0
    assert ae["best_val_mse"] <= ae["affine_val_mse"] * (1 + 1e-9)


def report_tables(folder: Path) -> list[str]:
    return [line for line in (folder / "report.md").read_text().splitlines() if line.startswith("|")]


def test_a_distributed_run_reports_the_single_process_tables_and_resumes(two_ranks, job_args, tmp_path):
    _, out = two_ranks
    runs = [json.loads((out / f"rank{r}.json").read_text())["runner"] for r in (0, 1)]
    # both ranks exit 0, and the rerun recomputed no step on any rank
    assert [(r["first_rc"], r["rerun_rc"]) for r in runs] == [(0, 0)] * 2
    # every split step ran the models on rank 1 too (its share); vectors on rank 0 alone
    for step in run_mod.STEPS:
        assert runs[0]["forwards"][step] > 0, step
        assert (runs[1]["forwards"][step] > 0) == (step in run_mod.SPLIT_STEPS), (step, runs[1]["forwards"])
    assert set(run_mod.SPLIT_STEPS) == set(run_mod.STEPS) - {"vectors"}
    dist = out / "run"
    assert json.loads((dist / "status.json").read_text())["complete"]
    assert json.loads((dist / "mappers.json").read_text())["ranks"] == 2
    assert json.loads((dist / "scores.json").read_text())["ranks"] == 2  # each rank scored its share
    assert not (dist / "mappers" / "pairs").exists()  # the pair shards are removed once fitted

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["run", job_args["spec"], "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    one = tmp_path / "run"
    assert len(report_tables(one)) > 10
    assert report_tables(dist) == report_tables(one)
    # the layer search: each rank cached whole batches of the one process's batching, so
    # the scores (and the layer pair chosen) are equal bit for bit
    assert json.loads((one / "layers.json").read_text())["searched"]
    assert (dist / "layers.json").read_text() == (one / "layers.json").read_text()
    # the maps (and all after them) agree to float rounding: the ranks batch other texts together
    m2, m1 = (json.loads((f / "mappers.json").read_text()) for f in (dist, one))
    assert (m2["rows"], m2["texts"], m2["coverage"]) == (m1["rows"], m1["texts"], m1["coverage"])
    for kind, h in m1["kinds"].items():
        assert m2["kinds"][kind]["val_mse"] == pytest.approx(h["val_mse"], rel=1e-5), kind
    # the scores the ranks computed on their shares, joined in prompt order, are the one process's
    d2, d1 = (json.loads((f / "scores.json").read_text())["dose_response"] for f in (dist, one))
    assert d2["meta"]["prompts_fingerprint"] == d1["meta"]["prompts_fingerprint"]
    assert d2["none"] == pytest.approx(d1["none"], abs=1e-4)
    for lab, rows in d1["scores"].items():
        assert torch.allclose(torch.tensor(d2["scores"][lab]), torch.tensor(rows), atol=1e-4), lab
    # the report cards: what does not depend on the maps is one process's (the clean runs,
    # the rows, the completions unpatched); the patching means to float rounding
    c2, c1 = (json.loads((f / "report_cards.json").read_text()) for f in (dist, one))
    assert c2.keys() == c1.keys() and c2["cards"].keys() == c1["cards"].keys() == {"affine", "orthogonal"}
    for kind, card in c1["cards"].items():
        got = c2["cards"][kind]
        for k in ("n_texts", "n_rows", "coverage", "n_positions", "patched_fraction", "mapper"):
            assert got[k] == card[k], (kind, k)
        assert got["patching"]["clean"]["ce"] == pytest.approx(card["patching"]["clean"]["ce"], rel=1e-12)
        assert [g["clean"] for g in got["generations"]] == [g["clean"] for g in card["generations"]]
        assert len(card["generations"]) == 1
    # the confirmation: rows whose vector does not depend on the maps (unsteered, native,
    # random of the native norm) are one process's exactly: replies, judgements, perplexities
    f2, f1 = (json.loads((f / "confirmation.json").read_text()) for f in (dist, one))
    assert f2["meta"] == f1["meta"] and f2["prompts"] == f1["prompts"]
    assert [(r["label"], r["alpha"]) for r in f2["rows"]] == [(r["label"], r["alpha"]) for r in f1["rows"]]
    fixed = [
        (r2, r1)
        for r2, r1 in zip(f2["rows"], f1["rows"], strict=True)
        if r1["label"] in ("none", "native", "random")
    ]
    assert len(fixed) == 3
    for r2, r1 in fixed:
        assert r2 == r1, r1["label"]
    assert f2["agreement"]["n_items"] == f1["agreement"]["n_items"] == 3 * len(f1["rows"])


def test_library_functions_split_themselves_and_equal_one_process(two_ranks):
    """``layer_pair_scores``, ``evaluate_mappers`` and ``evaluate_steering`` called on every
    rank split their work (rank 1 runs the models too) and every rank returns the same
    result, that of the same call alone (``distributed=False``, no collective): the layer
    scores and the judged replies exactly, the patching means to float rounding."""
    _, out = two_ranks
    libs = [json.loads((out / f"rank{r}.json").read_text())["library"] for r in (0, 1)]
    assert set(libs[0]) == {"layer_pair_scores", "evaluate_mappers", "evaluate_steering"}
    for name in libs[0]:
        for lib in libs:
            assert lib[name]["forwards"] > 0, name
        split, alone = libs[0][name]["split"], libs[0][name]["alone"]
        assert libs[1][name]["split"] == split, name  # every rank returns the same
        assert libs[1][name]["alone"] == alone, name
        if name != "evaluate_mappers":
            assert split == alone, name
    assert libs[0]["evaluate_steering"]["split"]["rows"][0]["perplexity"] is not None
    split, alone = (libs[0]["evaluate_mappers"][k]["affine"] for k in ("split", "alone"))
    assert split.keys() == alone.keys()
    for k, v in alone.items():
        if k == "patching":
            for cond, d in v.items():
                assert split[k][cond] == pytest.approx(d, rel=1e-9), cond
        elif k not in ("kl_ratio",):
            assert split[k] == v, k
    assert split["kl_ratio"] == pytest.approx(alone["kl_ratio"], rel=1e-9)


def test_a_rank_that_raises_fails_the_run_and_leaves_no_manifest(two_ranks):
    proc, out = two_ranks
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "RuntimeError: boom: rank 1 lost its disk" in log
    # torchrun names the rank that raised as the root cause, not rank 0's echo of it
    cause = log.split("Root Cause (first observed failure):")[-1]
    assert re.search(r"rank\s*:\s*1 ", cause) and "boom: rank 1 lost its disk" in cause
    assert "failed on rank 1 of 2" in log  # rank 0 says which rank failed
    assert list((out / "failed").iterdir()) == []  # no folder, no manifest, no staging left


def test_a_rank_that_dies_leaves_no_trusted_manifest(job_args, tmp_path):
    args = {**job_args, "out": str(tmp_path)}
    proc = torchrun("crash", args, tmp_path)
    assert proc.returncode != 0
    cause = (proc.stdout + proc.stderr).split("Root Cause (first observed failure):")[-1]
    assert re.search(r"rank\s*:\s*1 ", cause) and re.search(r"exitcode\s*:\s*3", cause)
    failed = tmp_path / "failed"
    assert not (failed / "acts").exists() and not (failed / "pairs").exists()
    # rank 0 was stopped in the middle: at most its staging folder is left, never a manifest
    assert all(p.name.startswith(".acts-partial-") for p in failed.iterdir())
    assert not list(failed.rglob("manifest.json"))


# ------------------------------------------------------------ single process, no launch


def test_shard_indices_cover_everything_once():
    for n in (0, 1, 5, 24):
        for w in (1, 2, 3, 7):
            for strided in (False, True):
                got = [i for r in range(w) for i in xd.shard_indices(n, r, w, strided=strided)]
                assert sorted(got) == list(range(n))
            sizes = [len(xd.shard_indices(n, r, w)) for r in range(w)]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        xd.shard_indices(3, 2, 2)


def test_rank_parts_split_by_text_and_cover_the_view(one_process):
    _, pairs, _ = one_process
    train, val = pairs.split(0.2, seed=0)
    for view in (train, val, pairs):
        masks = [rank_part(view, r, 2).text_mask for r in range(2)]
        want = torch.tensor(pairs.meta["rows_per_text"]) > 0
        if view.text_mask is not None:
            want &= view.text_mask
        assert not (masks[0] & masks[1]).any() and torch.equal(masks[0] | masks[1], want)
        assert sum(len(rank_part(view, r, 2)) for r in range(2)) == len(view)
    mem = pairs.load()
    parts = [rank_part(mem, r, 3) for r in range(3)]
    assert sum(len(p) for p in parts) == len(mem)
    ids = [set(p.text_index.tolist()) for p in parts]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])


def test_helpers_are_no_ops_in_a_single_process():
    assert (xd.rank(), xd.world_size(), xd.is_main(), xd.active()) == (0, 1, True, False)
    t = torch.ones(3)
    xd.all_reduce_(t)
    assert torch.equal(t, torch.ones(3)) and xd.all_gather_objects({"a": 1}) == [{"a": 1}]
    xd.agree(None, "nothing")
    with pytest.raises(KeyError):
        xd.agree(KeyError("mine"), "something")
    assert xd.backend_for("cpu") == "gloo" and xd.backend_for("cuda") == "cpu:gloo,cuda:nccl"
    assert xd.balanced_owner(torch.tensor([5, 1, 1, 1, 1, 1]), 2).tolist() == [0, 1, 1, 1, 1, 1]
    assert xd.gather_objects({"a": 1}) == [{"a": 1}]
    assert xd.balanced_share([3, 1, 2]) == range(3) and xd.balanced_share([]) == range(0)


def test_cache_shares_join_into_the_one_process_set(tiny_tl):
    """Each rank's ``cache_share`` (whole batches of the one-process batching) joined in any
    world size is ``cache_activations`` over all the texts, bit for bit; so are the tokens
    alone, and ``batch_share`` deals out every batch once, in order."""
    from xferlens.activations import cache_activations
    from xferlens.activations.positions import from_token
    from xferlens.activations.shares import cache_share, joined_set, without_acts

    model = tiny_tl("llama")
    want = cache_activations(model, TEXTS, [1, 2], positions=from_token(1), progress=False)
    for w in (1, 2, 3):
        shares = [
            cache_share(model, TEXTS, [1, 2], positions=from_token(1), rank=r, world=w) for r in range(w)
        ]
        assert sorted(t for sh in shares for t in sh["rows"]) == list(range(len(TEXTS)))
        got = joined_set(shares, TEXTS)
        bare = joined_set([without_acts(sh) for sh in shares], TEXTS)
        for k in ("text_index", "position", "token_ids", "char_spans"):
            assert torch.equal(getattr(got, k), getattr(want, k)), k
            assert torch.equal(getattr(bare, k), getattr(want, k)), k
        assert got.acts.keys() == want.acts.keys() and bare.acts == {}
        for h in want.acts:
            assert torch.equal(got.acts[h], want.acts[h]), h
        assert got.meta == want.meta and got.texts == want.texts
    batches = [[3, 0], [1], [2, 4]]
    lengths = [5, 4, 2, 9, 1]
    for w in (1, 2, 4):
        dealt = [xd.batch_share(batches, lengths, rank=r, world=w) for r in range(w)]
        assert [b for d in dealt for b in d] == batches


def test_balanced_shares_are_contiguous_and_cover_everything_once():
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 2, 7, 30):
        sizes = torch.randint(0, 9, (n,), generator=g).tolist()
        for w in (1, 2, 3, 5):
            shares = [xd.balanced_share(sizes, r, w) for r in range(w)]
            assert [i for s in shares for i in s] == list(range(n))
    with pytest.raises(ValueError):
        xd.balanced_share([1], 2, 2)


@pytest.mark.parametrize("max_tokens", [None, 40])
def test_a_run_of_whole_batches_is_batched_the_same_way_again(max_tokens):
    """What the split steps rely on for results equal bit for bit: a rank handed a
    contiguous run of the batches ``length_batches`` forms over all texts, batching its
    texts again with the same function, forms those very batches (same texts, same order)."""
    from xferlens.activations.tokens import length_batches

    g = torch.Generator().manual_seed(1)
    for n in (1, 5, 17, 40):
        lengths = torch.randint(1, 12, (n,), generator=g).tolist()  # ties: the stable order counts
        batches = list(length_batches(lengths, 4, max_tokens))
        cost = [len(b) * max(lengths[i] for i in b) for b in batches]
        for w in (2, 3):
            for r in range(w):
                mine = [batches[i] for i in xd.balanced_share(cost, r, w)]
                idx = sorted(i for b in mine for i in b)  # the texts, in their order
                again = list(length_batches([lengths[i] for i in idx], 4, max_tokens))
                assert [[idx[j] for j in b] for b in again] == mine
