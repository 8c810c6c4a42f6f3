"""Paired activations streamed to disk, for mapper fits on more text than fits in memory.

``pairs_to_disk`` pairs the two models chunk by chunk of texts (alignment needs whole
texts, so chunks are texts, never token ranges) and writes safetensors shards of
``src``/``tgt`` rows plus a manifest, the same way as :mod:`xferlens.activations.shards`:
staged, hashed, renamed into place. :class:`PairShards` reads them back as a
:class:`~xferlens.mappers.base.PairSource`: batches in order or shuffled, a split by
text, or everything in memory as :class:`~xferlens.activations.Pairs`.

Under ``torch.distributed`` each rank pairs its contiguous share of the texts into its own
shards and rank 0 writes the one manifest once all succeeded (as ``cache_to_disk``); every
shard entry records the range of texts it holds (``texts: [first, end)``), so a rank's
view (:meth:`PairShards.rank_part`) opens only the shards that hold its texts.
"""

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from xferlens.activations.align import Pairs, paired_activations
from xferlens.activations.cache import storage_dtype, texts_fingerprint
from xferlens.activations.hooks import HookSpec
from xferlens.activations.positions import Selector
from xferlens.activations.shards import ShardError, _sha256, read_manifest, read_verified_shard, write_staged
from xferlens.distributed import active, balanced_owner, is_main, shard_indices, world_size
from xferlens.distributed import rank as _rank
from xferlens.safetensors_io import save_streaming

FORMAT = "xferlens.pair-shards/1"
KEYS = ["src", "tgt", "text_index", "src_position", "tgt_position"]


def pairs_to_disk(
    src: HookedTransformer,
    tgt: HookedTransformer,
    texts: Sequence[str],
    src_hook: HookSpec,
    tgt_hook: int | str,
    folder: str | os.PathLike,
    *,
    positions: Selector = "all",
    alignment: str = "auto",
    dtype: str | torch.dtype = "float16",
    chunk_texts: int = 128,
    shard_rows: int = 32768,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    max_batch_tokens: int | None = 1024,
    distributed: bool | None = None,
) -> "PairShards":
    """Pair ``src`` and ``tgt`` activations over ``texts`` into shards under ``folder``.

    ``overwrite=True`` replaces only a shard folder xferlens wrote. ``distributed``:
    ``None`` (default) splits the texts over the ranks when a process group of several
    ranks is initialised (call it on every rank with the same arguments); ``False`` never.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    folder = Path(folder)
    dt = storage_dtype(dtype)
    spread = active(distributed)
    mine = shard_indices(len(texts), _rank(), world_size()) if spread else range(len(texts))

    def work(stage: Path, prefix: str) -> dict:
        shards: list[dict] = []
        buffer: list[Pairs] = []
        rows_per_text = [0] * len(mine)
        counts = {"src_rows": 0, "tgt_rows": 0, "pairs": 0}
        out: dict = {"meta": None}

        def flush() -> None:
            nonlocal buffer
            if not buffer:
                return
            name = f"{prefix}{len(shards):05d}.safetensors"
            tensors = {k: torch.cat([getattr(p, k) for p in buffer]).contiguous() for k in KEYS}
            save_streaming(tensors, stage / name)
            shards.append(
                {
                    "file": name,
                    "rows": int(tensors["src"].shape[0]),
                    "bytes": (stage / name).stat().st_size,
                    "sha256": _sha256(stage / name),
                    "texts": [int(tensors["text_index"].min()), int(tensors["text_index"].max()) + 1]
                    if len(tensors["text_index"])
                    else [0, 0],
                }
            )
            buffer = []

        bar = tqdm(total=len(mine), unit="text", desc="pairs to disk", disable=not (progress and is_main()))
        for c0 in range(mine.start, mine.stop, chunk_texts):
            chunk = list(texts[c0 : min(c0 + chunk_texts, mine.stop)])
            p = paired_activations(
                src,
                tgt,
                chunk,
                src_hook,
                tgt_hook,
                positions=positions,
                alignment=alignment,
                batch_size=batch_size,
                dtype=dt,
                progress=False,
                max_batch_tokens=max_batch_tokens,
            )
            p.text_index = p.text_index + c0
            for t, c in zip(*torch.unique(p.text_index, return_counts=True), strict=True):
                rows_per_text[int(t) - mine.start] = int(c)
            out.update(meta=p.meta, alignment=p.alignment, d_src=p.d_src, d_tgt=p.d_tgt)
            counts["src_rows"] += p.meta["src_rows"]
            counts["tgt_rows"] += p.meta["tgt_rows"]
            counts["pairs"] += len(p)
            buffer.append(p)
            if sum(len(b) for b in buffer) >= shard_rows:
                flush()
            bar.update(len(chunk))
        flush()
        bar.close()
        return {**out, "shards": shards, "rows_per_text": rows_per_text, "counts": counts}

    def finish(stage: Path, records: list[dict]) -> None:
        first = next(r for r in records if r["meta"] is not None)
        counts = {k: sum(r["counts"][k] for r in records) for k in ("src_rows", "tgt_rows", "pairs")}
        manifest = {
            "format": FORMAT,
            **{
                k: v
                for k, v in first["meta"].items()
                if k not in ("n_texts", "texts_fingerprint", "src_rows", "tgt_rows")
            },
            "alignment": first["alignment"],
            "coverage": {
                "src": counts["pairs"] / max(1, counts["src_rows"]),
                "tgt": counts["pairs"] / max(1, counts["tgt_rows"]),
            },
            "dtype": str(dt).removeprefix("torch."),
            "d_src": first["d_src"],
            "d_tgt": first["d_tgt"],
            "n_texts": len(texts),
            "texts_fingerprint": texts_fingerprint(texts),
            "n_rows": counts["pairs"],
            "rows_per_text": [n for r in records for n in r["rows_per_text"]],
            "shards": [s for r in records for s in r["shards"]],
        }
        if spread:
            manifest["ranks"] = len(records)
        (stage / "manifest.json").write_text(json.dumps(manifest))

    write_staged(folder, overwrite, work, finish, distributed=distributed)
    return PairShards(folder)


class PairShards:
    """Reader of a ``pairs_to_disk`` folder (optionally restricted to some texts).

    Example:
        >>> store = PairShards("runs/pairs")  # doctest: +SKIP
        >>> mapper, history = fit_mapper(store, "autoencoder")  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike, *, texts: Tensor | None = None):
        self.folder = Path(folder)
        m = read_manifest(self.folder, FORMAT)
        for s in m["shards"]:
            size = (self.folder / s["file"]).stat().st_size
            if size != s["bytes"]:
                raise ShardError(f"{self.folder / s['file']}: {size} bytes, manifest says {s['bytes']}")
        self.meta = m
        #: boolean per text: which texts this view returns (``None``: all)
        self.text_mask = texts
        counts = torch.tensor(m["rows_per_text"])
        self._len = int(counts.sum() if texts is None else counts[texts].sum())
        self._skip_unused = False  # rank views skip shards that hold none of their texts

    @property
    def d_src(self) -> int:
        return int(self.meta["d_src"])

    @property
    def d_tgt(self) -> int:
        return int(self.meta["d_tgt"])

    @property
    def alignment(self) -> str:
        return self.meta["alignment"]

    @property
    def coverage(self) -> dict:
        return self.meta["coverage"]

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        m = self.meta
        part = "" if self.text_mask is None else f" ({int(self.text_mask.sum())} of {m['n_texts']} texts)"
        return (
            f"PairShards({m['src_model']} {m['src_hook']} -> {m['tgt_model']} {m['tgt_hook']}: "
            f"{len(self)} rows{part}, {len(m['shards'])} shards, {m['dtype']})"
        )

    def read_shard(self, i: int) -> dict[str, Tensor]:
        t = read_verified_shard(self.folder, self.meta["shards"][i])
        if self.text_mask is not None:
            keep = self.text_mask[t["text_index"]]
            t = {k: v[keep] for k, v in t.items()}
        return t

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(src rows, tgt rows)``; shuffled = shards in random order, rows shuffled within each."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.meta["shards"])
        for i in torch.randperm(n, generator=g).tolist() if shuffle else range(n):
            if self._skip_unused and not self._holds_texts(i):
                continue
            t = self.read_shard(i)
            rows = t["src"].shape[0]
            idx = torch.randperm(rows, generator=g) if shuffle else torch.arange(rows)
            for start in range(0, rows, batch_size):
                sel = idx[start : start + batch_size]
                yield t["src"][sel], t["tgt"][sel]

    def _holds_texts(self, i: int) -> bool:
        span = self.meta["shards"][i].get("texts")
        return self.text_mask is None or span is None or bool(self.text_mask[span[0] : span[1]].any())

    def rank_part(self, rank: int | None = None, world: int | None = None) -> "PairShards":
        """This rank's share of the view: contiguous runs of texts holding about equal
        rows, disjoint across ranks and together the whole view. Reading it opens only
        the shards that hold its texts (when the manifest records them)."""
        r = _rank() if rank is None else rank
        w = world_size() if world is None else world
        counts = torch.tensor(self.meta["rows_per_text"])
        present = counts > 0 if self.text_mask is None else (counts > 0) & self.text_mask
        ids = torch.nonzero(present).flatten()
        keep = torch.zeros(len(counts), dtype=torch.bool)
        keep[ids[balanced_owner(counts[ids], w) == r]] = True
        view = PairShards(self.folder, texts=keep)
        view._skip_unused = True
        return view

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["PairShards", "PairShards"]:
        """Train/validation views split *by text* (the same rule as ``Pairs.split``)."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        counts = torch.tensor(self.meta["rows_per_text"])
        ids = torch.nonzero(counts > 0).flatten()
        if self.text_mask is not None:
            ids = ids[self.text_mask[ids]]
        g = torch.Generator().manual_seed(seed)
        val_ids = ids[torch.randperm(len(ids), generator=g)[: max(1, round(len(ids) * val_fraction))]]
        val = torch.zeros(len(counts), dtype=torch.bool)
        val[val_ids] = True
        train = torch.zeros(len(counts), dtype=torch.bool)
        train[ids] = True
        train &= ~val
        return PairShards(self.folder, texts=train), PairShards(self.folder, texts=val)

    def load(self) -> Pairs:
        n = len(self.meta["shards"])
        parts = [self.read_shard(i) for i in range(n) if not self._skip_unused or self._holds_texts(i)]
        cat = {k: torch.cat([p[k] for p in parts]) for k in KEYS}
        return Pairs(
            cat["src"],
            cat["tgt"],
            cat["text_index"],
            cat["src_position"],
            cat["tgt_position"],
            self.alignment,
            dict(self.coverage),
            {k: v for k, v in self.meta.items() if k != "shards"},
        )
