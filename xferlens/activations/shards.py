"""Stream activations to disk as safetensors shards with a JSON manifest, and read them back.

Layout of a shard folder::

    manifest.json        what made it (model, fingerprint, hooks, dtype, positions), row
                         counts, and for every shard its file name, rows, bytes and sha256
    texts.jsonl          the texts, one JSON string per line (row ``text_index`` points here)
    shard-00000.safetensors ...

The manifest is written last, after every shard is complete, and the folder is renamed
into place, so a half-written folder is never taken for a finished one. ``overwrite=True``
replaces only a folder xferlens wrote (a recognised manifest, shards, texts: nothing else);
any other folder is refused, naming what it holds, and nothing is deleted.

Under ``torch.distributed`` (a process group of several ranks, see
:mod:`xferlens.distributed`) every rank calls ``cache_to_disk`` with the same texts and
folder, on a filesystem they share: each rank caches its contiguous share of the texts
into its own shards (``shard-r001-00000.safetensors``...), and rank 0 writes the one
manifest, listing every rank's shards with their sha256, only after all ranks succeeded.
If any rank fails, every rank raises and no manifest (no folder) appears. Readers check
each shard's size and tensor layout against the manifest when opening, and its sha256
when reading it: a missing, extra, swapped or altered shard is refused, never mixed in.
Peak memory while writing is one shard plus one batch, whatever the corpus size.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens import paths
from xferlens.activations.cache import (
    ActivationSet,
    iter_activations,
    model_meta,
    row_order,
    storage_dtype,
    texts_fingerprint,
)
from xferlens.activations.hooks import HookSpec, hook_names, resolve_hooks
from xferlens.activations.positions import Selector, describe
from xferlens.distributed import (
    active,
    agree,
    all_gather_objects,
    broadcast_object,
    is_main,
    rank,
    shard_indices,
)
from xferlens.distributed import world_size as _world_size
from xferlens.errors import XferlensError
from xferlens.safetensors_io import read_header, save_streaming

FORMAT = "xferlens.activation-shards/1"
INDEX_KEYS = ["text_index", "position", "token_ids", "char_spans"]


class ShardError(XferlensError, ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def read_manifest(folder: Path, fmt: str) -> dict:
    """The manifest of a finished shard folder, refusing a wrong format or a shard set on
    disk that differs from the one listed (missing or extra files are never mixed in)."""
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise ShardError(f"{folder} has no manifest.json: not a finished shard folder")
    m = json.loads(mpath.read_text())
    if m.get("format") != fmt:
        raise ShardError(f"{mpath}: format {m.get('format')!r}, expected {fmt!r}")
    listed = {s["file"] for s in m["shards"]}
    present = {p.name for p in folder.glob("shard-*.safetensors")}
    if listed != present:
        raise ShardError(
            f"{folder}: shards on disk do not match the manifest (missing: "
            f"{sorted(listed - present)}, not in manifest: {sorted(present - listed)}); refusing to mix"
        )
    return m


def read_verified_shard(folder: Path, entry: dict) -> dict[str, Tensor]:
    """One shard's tensors, after checking its sha256 against the manifest entry."""
    raw = (folder / entry["file"]).read_bytes()
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise ShardError(f"{folder / entry['file']}: sha256 differs from the manifest: altered or corrupted")
    return load_bytes(raw)


OWN_FILES = ("manifest.json", "texts.jsonl")


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_replaceable(folder: Path, overwrite: bool) -> None:
    """Refuse to write over ``folder`` unless it is absent, or ``overwrite`` is set and it
    is empty or a shard folder xferlens wrote: a manifest of a known xferlens format, shard
    files and texts, and nothing else. Raises ``FileExistsError`` naming what is there."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it or choose another folder")
    if folder.is_symlink() or not folder.is_dir():
        raise FileExistsError(
            f"{folder} is a {'link' if folder.is_symlink() else 'file'}, not a shard folder xferlens wrote; "
            "overwrite=True only replaces those: remove it yourself or choose another folder"
        )
    entries = sorted(folder.iterdir())
    if not entries:
        return
    names = [p.name for p in entries]
    foreign = [
        p.name + ("/" if p.is_dir() else "")
        for p in entries
        if not p.is_file()
        or not (p.name in OWN_FILES or (p.name.startswith("shard-") and p.name.endswith(".safetensors")))
    ]
    fmt = None
    if "manifest.json" in names:
        try:
            fmt = json.loads((folder / "manifest.json").read_text()).get("format")
        except (ValueError, OSError, AttributeError):
            fmt = None
    known = isinstance(fmt, str) and fmt.startswith("xferlens.") and "shards" in fmt
    if foreign or not known:
        why = (
            f"files xferlens did not write: {_listing(foreign)}"
            if foreign
            else "no xferlens manifest.json"
            if fmt is None
            else f"a manifest of format {fmt!r}, not an xferlens shard folder"
        )
        raise FileExistsError(
            f"{folder} holds {_listing(names)} ({why}); overwrite=True only replaces a shard folder "
            "xferlens wrote, so nothing was deleted: remove it yourself or choose another folder"
        )


def _swap_into_place(stage: Path, folder: Path, overwrite: bool) -> None:
    """Move the finished ``stage`` to ``folder``; an old folder (checked again) is moved
    aside first and deleted only once the new one is in place."""
    if not folder.exists() and not folder.is_symlink():
        os.replace(stage, folder)
        return
    check_replaceable(folder, overwrite)
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old-", dir=folder.parent)) / "old"
    os.replace(folder, old)
    try:
        os.replace(stage, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old.parent, ignore_errors=True)


def write_staged(folder: Path, overwrite: bool, work, finish, *, distributed: bool | None = None) -> None:
    """Write a shard folder through a staging folder, on one rank or on all.

    ``work(stage, prefix)`` runs on every rank and writes that rank's shards (file names
    starting with ``prefix``), returning a small JSON-like record; ``finish(stage,
    records)`` runs on rank 0 with every rank's record (rank order) and writes the
    manifest. The stage is renamed into place only after every rank succeeded; if any
    rank fails, every rank raises and the stage is removed.
    """
    spread = active(distributed)
    err: Exception | None = None
    stage_name = None
    claim = None  # the stage's lock (rank 0): a killed writer's stage is told from a live one's
    if not spread or is_main():
        try:
            check_replaceable(folder, overwrite)
            folder.parent.mkdir(parents=True, exist_ok=True)
            # stages of this folder whose writer was killed outright (no finally ran)
            paths.clean_dead_stages(folder.parent, f".{folder.name}-partial-*")
            stage_name = tempfile.mkdtemp(prefix=f".{folder.name}-partial-", dir=folder.parent)
            claim = paths.claim_stage(Path(stage_name))
        except Exception as e:  # noqa: BLE001 - agreed on below
            err = e
    if spread:
        agree(err, f"preparing {folder}")
        stage_name = broadcast_object(stage_name)
        unseen = None
        if not Path(stage_name).is_dir():  # a rank on another machine, without a shared disk
            unseen = FileNotFoundError(
                f"rank {rank()} cannot see {stage_name}, which rank 0 made: every rank must write "
                f"to one filesystem they all share (put {folder} there)"
            )
        try:
            agree(unseen, f"preparing {folder}")
        except Exception:
            if is_main():
                shutil.rmtree(stage_name, ignore_errors=True)
            raise
    elif err is not None:
        raise err
    stage = Path(stage_name)
    prefix = f"shard-r{rank():03d}-" if spread else "shard-"
    try:
        try:
            record = work(stage, prefix)
        except Exception as e:  # noqa: BLE001 - agreed on below
            agree(e, f"writing shards to {folder}")
            raise
        agree(None, f"writing shards to {folder}")
        records = all_gather_objects(record) if spread else [record]
        err = None
        if not spread or is_main():
            try:
                finish(stage, records)
                (stage / paths.STAGE_LOCK).unlink(missing_ok=True)  # not part of the result
                _swap_into_place(stage, folder, overwrite)
            except Exception as e:  # noqa: BLE001 - agreed on below
                err = e
        agree(err, f"finishing {folder}")  # also keeps other ranks until the folder is in place
    finally:
        if not spread or is_main():
            shutil.rmtree(stage, ignore_errors=True)  # only left if we failed before the rename
            if claim is not None:
                os.close(claim)


class ShardBuffer:
    """Rows gathered into one set of tensors allocated once and reused for every shard.

    ``add`` copies a batch's rows in place and yields a full shard (views into the block,
    valid until the next ``add``) each time ``rows`` rows have been gathered, so shards
    hold exactly ``rows`` rows and no shard-sized concatenation is made at flush time.
    (It was tried against the heap growth while streaming, benchmarks/RESULTS.md issue 3:
    it does not stop it.)
    """

    def __init__(self, rows: int):
        if rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {rows}")
        self.rows = rows
        self.n = 0
        self.store: dict[str, Tensor] | None = None

    def add(self, part: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
        if self.store is None:
            self.store = {k: torch.empty((self.rows, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
        n_in = len(next(iter(part.values())))
        start = 0
        while start < n_in:
            take = min(self.rows - self.n, n_in - start)
            for k, v in part.items():
                self.store[k][self.n : self.n + take] = v[start : start + take]
            self.n += take
            start += take
            if self.n == self.rows:
                yield self.filled()
                self.n = 0

    def filled(self) -> dict[str, Tensor]:
        assert self.store is not None
        return {k: v[: self.n] for k, v in self.store.items()}


def cache_to_disk(
    model: HookedTransformer,
    texts: Sequence[str],
    folder: str | os.PathLike,
    hooks: HookSpec,
    *,
    positions: Selector = "all",
    drop_special: bool = True,
    batch_size: int = 8,
    dtype: str | torch.dtype = "float16",
    shard_rows: int = 32768,
    max_length: int | None = None,
    truncate: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    max_batch_tokens: int | None = 1024,
    distributed: bool | None = None,
) -> "ShardedActivations":
    """Cache activations of ``texts`` into shards under ``folder``; return a reader.

    Same arguments as :func:`cache_activations`; rows are flushed to a new shard every
    ``shard_rows`` rows. Default storage is float16 (half the disk). Peak memory is one
    shard buffer plus one forward pass of at most ``max_batch_tokens`` padded tokens: it
    does not grow with the number of texts (it does with the longest text; cap that with
    ``max_length``).

    ``overwrite=True`` replaces only a shard folder xferlens wrote (see
    :func:`check_replaceable`). ``distributed``: ``None`` (default) splits the texts over
    the ranks when a process group of several ranks is initialised; ``False`` makes each
    process do all the work alone. Distributed, call it on every rank with the same
    arguments (each with its own copy of the model); every rank returns the same reader.
    """
    folder = Path(folder)
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    names = resolve_hooks(model, hooks)
    dt = storage_dtype(dtype)
    ShardBuffer(shard_rows)  # validates shard_rows before anything is written
    spread = active(distributed)
    mine = shard_indices(len(texts), rank(), _world_size()) if spread else range(len(texts))

    def work(stage: Path, prefix: str) -> dict:
        shards: list[dict] = []
        buffer = ShardBuffer(shard_rows)

        def write(rows: dict[str, Tensor]) -> None:
            name = f"{prefix}{len(shards):05d}.safetensors"
            save_streaming(rows, stage / name)
            n = len(rows["text_index"])
            shards.append(
                {
                    "file": name,
                    "rows": n,
                    "bytes": (stage / name).stat().st_size,
                    "sha256": _sha256(stage / name),
                }
            )

        d_of: dict[str, list[int]] = {}
        if len(mine):
            for part in iter_activations(
                model,
                texts[mine.start : mine.stop] if spread else texts,
                names,
                positions=positions,
                drop_special=drop_special,
                batch_size=batch_size,
                dtype=dt,
                max_length=max_length,
                truncate=truncate,
                progress=progress and is_main(),
                max_batch_tokens=max_batch_tokens,
            ):
                if mine.start:
                    part["text_index"] = part["text_index"] + mine.start
                d_of = {h: list(a.shape[1:]) for h, a in part["acts"].items()}
                flat = {f"acts/{h}": a for h, a in part["acts"].items()} | {k: part[k] for k in INDEX_KEYS}
                for full in buffer.add(flat):
                    write(full)
        if buffer.n:
            write(buffer.filled())
        return {"shards": shards, "shape": d_of}

    def finish(stage: Path, records: list[dict]) -> None:
        with open(stage / "texts.jsonl", "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps(t) + "\n")
        shards = [s for r in records for s in r["shards"]]
        manifest = {
            "format": FORMAT,
            **model_meta(model),
            "hooks": names,
            "shape": next((r["shape"] for r in records if r["shape"]), {}),
            "dtype": str(dt).removeprefix("torch."),
            "positions": describe(positions),
            "drop_special": drop_special,
            "n_texts": len(texts),
            "texts_fingerprint": texts_fingerprint(texts),
            "texts_sha256": _sha256(stage / "texts.jsonl"),
            "n_rows": sum(s["rows"] for s in shards),
            "shards": shards,
        }
        if spread:
            manifest["ranks"] = len(records)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1))

    write_staged(folder, overwrite, work, finish, distributed=distributed)
    return ShardedActivations(folder)


class ShardedActivations:
    """Reader for a shard folder: validated on open, streamed in batches.

    Example:
        >>> store = ShardedActivations("runs/acts")  # doctest: +SKIP
        >>> for batch in store.batches(4096, shuffle=True, seed=0):  # doctest: +SKIP
        ...     x = batch["acts"]["blocks.12.hook_resid_post"]
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder, FORMAT)
        mpath = self.folder / "manifest.json"
        if sum(s["rows"] for s in m["shards"]) != m["n_rows"]:
            raise ShardError(f"{mpath}: shard row counts do not add up to n_rows={m['n_rows']}")
        for s in m["shards"]:
            self._check_layout(s)

    def _check_layout(self, s: dict) -> None:
        path = self.folder / s["file"]
        if path.stat().st_size != s["bytes"]:
            raise ShardError(
                f"{path}: {path.stat().st_size} bytes, manifest says {s['bytes']}: truncated or replaced"
            )
        header, _ = read_header(path)
        for h in self.hooks:
            info = header.get(f"acts/{h}")
            want = [s["rows"], *self.manifest["shape"][h]]
            if info is None or info["shape"] != want:
                raise ShardError(f"{path}: acts/{h} has shape {info and info['shape']}, manifest says {want}")

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ShardedActivations({m['model']}, {m['n_texts']} texts, {m['n_rows']} rows, "
            f"{len(m['shards'])} shards, {m['dtype']}; {', '.join(m['hooks'])})"
        )

    def texts(self) -> list[str]:
        path = self.folder / "texts.jsonl"
        if _sha256(path) != self.manifest["texts_sha256"]:
            raise ShardError(f"{path} does not match the manifest's sha256: the texts were altered")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def read_shard(self, i: int) -> dict[str, Tensor]:
        return read_verified_shard(self.folder, self.manifest["shards"][i])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, hooks: HookSpec | None = None
    ) -> Iterator[dict]:
        """Batches of rows: ``{"acts": {hook: rows}, "text_index": ..., ...}``.

        ``shuffle`` visits shards in a random order and rows within each shard in a random
        order (memory: one shard). Ordered reading returns rows as written.
        """
        names = hook_names(hooks) if hooks is not None else self.hooks
        missing = [h for h in names if h not in self.hooks]
        if missing:
            raise KeyError(f"hook(s) {missing} not in these shards; stored: {', '.join(self.hooks)}")
        g = torch.Generator().manual_seed(seed)
        order = (
            torch.randperm(len(self.manifest["shards"]), generator=g).tolist()
            if shuffle
            else range(len(self.manifest["shards"]))
        )
        for i in order:
            t = self.read_shard(i)
            n = t["text_index"].shape[0]
            idx = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                sel = idx[start : start + batch_size]
                yield {"acts": {h: t[f"acts/{h}"][sel] for h in names}, **{k: t[k][sel] for k in INDEX_KEYS}}

    def load(self) -> ActivationSet:
        """Everything in memory, as an :class:`ActivationSet` (for sets that fit)."""
        parts = [self.read_shard(i) for i in range(len(self.manifest["shards"]))]
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        order = row_order(cat["text_index"], cat["position"])
        cat = {k: v[order] for k, v in cat.items()}
        meta = {k: v for k, v in self.manifest.items() if k not in ("shards", "format")}
        return ActivationSet(
            {h: cat[f"acts/{h}"] for h in self.hooks}, *(cat[k] for k in INDEX_KEYS), self.texts(), meta
        )
