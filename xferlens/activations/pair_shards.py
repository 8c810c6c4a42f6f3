"""Paired activations streamed to disk, for mapper fits on more text than fits in memory.

``pairs_to_disk`` pairs the two models chunk by chunk of texts (alignment needs whole
texts, so chunks are texts, never token ranges) and writes safetensors shards of
``src``/``tgt`` rows plus a manifest, the same way as :mod:`xferlens.activations.shards`:
staged, hashed, renamed into place. :class:`PairShards` reads them back as a
:class:`~xferlens.mappers.base.PairSource`: batches in order or shuffled, a split by
text, or everything in memory as :class:`~xferlens.activations.Pairs`.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from xferlens.activations.align import Pairs, paired_activations
from xferlens.activations.cache import storage_dtype, texts_fingerprint
from xferlens.activations.positions import Selector
from xferlens.activations.shards import ShardError, _sha256, read_manifest, read_verified_shard
from xferlens.safetensors_io import save_streaming

FORMAT = "xferlens.pair-shards/1"
KEYS = ["src", "tgt", "text_index", "src_position", "tgt_position"]


def pairs_to_disk(
    src: HookedTransformer,
    tgt: HookedTransformer,
    texts: Sequence[str],
    src_hook: int | str,
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
) -> "PairShards":
    """Pair ``src`` and ``tgt`` activations over ``texts`` into shards under ``folder``."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it or choose another folder")
    dt = storage_dtype(dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}-partial-", dir=folder.parent))
    shards: list[dict] = []
    buffer: list[Pairs] = []
    rows_per_text = [0] * len(texts)
    counts = {"src_rows": 0, "tgt_rows": 0, "pairs": 0}
    meta: dict = {}

    def flush() -> None:
        nonlocal buffer
        if not buffer:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {k: torch.cat([getattr(p, k) for p in buffer]).contiguous() for k in KEYS}
        save_streaming(tensors, stage / name)
        shards.append(
            {
                "file": name,
                "rows": int(tensors["src"].shape[0]),
                "bytes": (stage / name).stat().st_size,
                "sha256": _sha256(stage / name),
            }
        )
        buffer = []

    try:
        bar = tqdm(total=len(texts), unit="text", desc="pairs to disk", disable=not progress)
        for c0 in range(0, len(texts), chunk_texts):
            chunk = list(texts[c0 : c0 + chunk_texts])
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
                rows_per_text[int(t)] = int(c)
            meta = p.meta
            counts["src_rows"] += meta["src_rows"]
            counts["tgt_rows"] += meta["tgt_rows"]
            counts["pairs"] += len(p)
            buffer.append(p)
            if sum(len(b) for b in buffer) >= shard_rows:
                flush()
            bar.update(len(chunk))
        flush()
        bar.close()
        manifest = {
            "format": FORMAT,
            **{
                k: v
                for k, v in meta.items()
                if k not in ("n_texts", "texts_fingerprint", "src_rows", "tgt_rows")
            },
            "alignment": p.alignment,
            "coverage": {
                "src": counts["pairs"] / max(1, counts["src_rows"]),
                "tgt": counts["pairs"] / max(1, counts["tgt_rows"]),
            },
            "dtype": str(dt).removeprefix("torch."),
            "d_src": p.d_src,
            "d_tgt": p.d_tgt,
            "n_texts": len(texts),
            "texts_fingerprint": texts_fingerprint(texts),
            "n_rows": counts["pairs"],
            "rows_per_text": rows_per_text,
            "shards": shards,
        }
        (stage / "manifest.json").write_text(json.dumps(manifest))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
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
            t = self.read_shard(i)
            rows = t["src"].shape[0]
            idx = torch.randperm(rows, generator=g) if shuffle else torch.arange(rows)
            for start in range(0, rows, batch_size):
                sel = idx[start : start + batch_size]
                yield t["src"][sel], t["tgt"][sel]

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
        parts = [self.read_shard(i) for i in range(len(self.meta["shards"]))]
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
