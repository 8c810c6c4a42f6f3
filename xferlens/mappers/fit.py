"""``fit_mapper``: one entry point for every mapper kind.

Data-parallel fitting: in a job started by torchrun (process group initialised, see
:mod:`xferlens.distributed`), every rank calls ``fit_mapper`` with the *same* full pair
source (e.g. ``PairShards`` of one shared folder). The train/validation split is made
identically on every rank, each rank reads only its share of the texts
(:func:`rank_part`), and the fit all-reduces what it accumulates; every rank returns the
same mapper as one process fitting all the rows (affine and orthogonal: equal up to
float64 rounding; autoencoder: trained with DistributedDataParallel).
"""

import inspect
import logging

import torch

from xferlens.distributed import active, all_reduce_, balanced_owner, collectively, is_main, world_size
from xferlens.distributed import rank as _rank
from xferlens.identity import ModelId
from xferlens.mappers.base import Mapper, MapperConfig, MapperMismatchError, PairSource, mapper_class

logger = logging.getLogger(__name__)


def _side_meta(meta: dict, role: str) -> dict:
    return {**ModelId.read(meta, role).to_dict(), "hook": meta.get(f"{role}_hook")}


def rank_part(source: PairSource, rank: int | None = None, world: int | None = None) -> PairSource:
    """This rank's share of ``source``: whole texts, contiguous runs of about equal rows,
    disjoint across ranks and together all of ``source``. Supports ``PairShards`` (opens
    only the shards holding its texts), in-memory ``Pairs`` and ``LivePairs`` (computes
    only its texts)."""
    r = _rank() if rank is None else rank
    w = world_size() if world is None else world
    if hasattr(source, "rank_part"):
        return source.rank_part(r, w)
    if hasattr(source, "text_index") and hasattr(source, "select"):  # Pairs
        ids, inverse = torch.unique(source.text_index, return_inverse=True)
        owner = balanced_owner(torch.bincount(inverse, minlength=len(ids)), w)
        return source.select(owner[inverse] == r)
    if hasattr(source, "ids") and hasattr(source, "rows_per_text"):  # LivePairs
        sizes = torch.tensor([source.rows_per_text[i] for i in source.ids], dtype=torch.int64)
        mine = [i for i, o in zip(source.ids, balanced_owner(sizes, w).tolist(), strict=True) if o == r]
        return type(source)(
            source.src,
            source.tgt,
            source.texts,
            source.src_hook,
            source.tgt_hook,
            chunk_texts=source.chunk_texts,
            batch_size=source.forward_batch,
            ids=mine,
            _rows_per_text=source.rows_per_text,
        )
    raise TypeError(
        f"cannot split a {type(source).__name__} over ranks: pass Pairs, PairShards or LivePairs, "
        "or fit with distributed=False"
    )


def row_norms(pairs: PairSource, batch_size: int = 8192, *, distributed: bool = False) -> dict:
    """The typical activation scale on each side, which ``transfer`` uses to recalibrate
    vector norms: the rows' mean L2 norm (``src_norm``, ``tgt_norm``) and their centred
    spread, the RMS distance to the mean row (``src_spread``, ``tgt_spread``), which leaves
    out the offset every row shares. ``distributed=True``: ``pairs`` is this rank's part,
    and the sums are all-reduced (call it on every rank)."""
    if distributed:
        return _row_norms_distributed(pairs, batch_size)
    n = 0
    sums = {"src": None, "tgt": None}
    norm = {"src": 0.0, "tgt": 0.0}
    sq = {"src": 0.0, "tgt": 0.0}
    for x, y in pairs.batches(batch_size):
        n += len(x)
        for side, rows in (("src", x), ("tgt", y)):
            r = rows.double()
            norm[side] += float(r.norm(dim=-1).sum())
            sq[side] += float(r.pow(2).sum())
            total = r.sum(0)
            sums[side] = total if sums[side] is None else sums[side] + total
    out = {}
    for side in ("src", "tgt"):
        out[f"{side}_norm"] = norm[side] / max(n, 1)
        mean_sq = float(sums[side].div(n).pow(2).sum()) if n else 0.0
        out[f"{side}_spread"] = max(sq[side] / max(n, 1) - mean_sq, 0.0) ** 0.5
    return out


def _row_norms_distributed(pairs: PairSource, batch_size: int) -> dict:
    f64 = dict(dtype=torch.float64)
    scalars = torch.zeros(5, **f64)  # n, |x| sum, |x|^2 sum, |y| sum, |y|^2 sum
    sums = {"src": torch.zeros(pairs.d_src, **f64), "tgt": torch.zeros(pairs.d_tgt, **f64)}
    with collectively("row norms"):
        for x, y in pairs.batches(batch_size):
            scalars[0] += len(x)
            for i, (side, rows) in enumerate((("src", x), ("tgt", y))):
                r = rows.double()
                scalars[1 + 2 * i] += r.norm(dim=-1).sum()
                scalars[2 + 2 * i] += r.pow(2).sum()
                sums[side] += r.sum(0)
    all_reduce_(scalars, sums["src"], sums["tgt"])
    n = float(scalars[0])
    out = {}
    for i, side in enumerate(("src", "tgt")):
        out[f"{side}_norm"] = float(scalars[1 + 2 * i]) / max(n, 1)
        mean_sq = float(sums[side].div(n).pow(2).sum()) if n else 0.0
        out[f"{side}_spread"] = max(float(scalars[2 + 2 * i]) / max(n, 1) - mean_sq, 0.0) ** 0.5
    return out


def fit_mapper(
    pairs: PairSource,
    kind: str = "affine",
    config: MapperConfig | dict | None = None,
    *,
    val: PairSource | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> tuple[Mapper, dict]:
    """Fit a mapper of ``kind`` from paired activations; return ``(mapper, history)``.

    Args:
        pairs: :class:`~xferlens.activations.Pairs` (in memory) or
            :class:`~xferlens.activations.PairShards` (streamed from disk).
        kind: a registered kind: ``"affine"``, ``"orthogonal"``, ``"autoencoder"``, ...
        config: that kind's config dataclass (or a dict of its fields); defaults otherwise.
        val: validation pairs. If not given, ``val_fraction`` of the *texts* of ``pairs``
            is held out (so no text feeds both sides).
        distributed: ``None`` (default) fits data-parallel when a process group of
            several ranks is initialised; ``False`` never (each process fits alone). Data-
            parallel, every rank must pass the same full ``pairs`` (and ``val``); each reads
            its share and all get the same mapper. Single-process results are unchanged.

    The mapper's ``meta`` records both models' identities and hooks and a summary of the
    training data, so it can refuse to be used with other models later.

    Example:
        >>> mapper, history = fit_mapper(pairs, "affine")  # doctest: +SKIP
        >>> mapper(pairs.src[:3]).shape  # doctest: +SKIP
        torch.Size([3, 1536])
    """
    cls = mapper_class(kind)
    if isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    if config is None:
        config = cls.config_class()
    if not isinstance(config, cls.config_class):
        raise TypeError(f"{kind} mapper takes a {cls.config_class.__name__}, not {type(config).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: cache activations over at least one text")
    train = pairs
    if val is None:
        train, val = pairs.split(val_fraction, seed=seed)
    elif (val.d_src, val.d_tgt) != (pairs.d_src, pairs.d_tgt):
        raise MapperMismatchError(
            f"validation pairs are {val.d_src} -> {val.d_tgt} but training pairs are "
            f"{pairs.d_src} -> {pairs.d_tgt}"
        )
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"after the split there are {len(train)} training and {len(val)} validation rows; "
            "use more texts or pass val= explicitly"
        )
    spread = active(distributed)
    if spread:
        if "distributed" not in inspect.signature(cls.fit).parameters:
            raise ValueError(
                f"{kind} mappers cannot fit data-parallel: pass distributed=False (each rank then "
                "fits on all rows alone)"
            )
        train_part, val_part = rank_part(train), rank_part(val)
        mapper, history = cls.fit(
            train_part, val_part, config, progress=progress and is_main(), distributed=True
        )
        norms = row_norms(train_part, distributed=True)
        history["ranks"] = world_size()
    else:
        mapper, history = cls.fit(train, val, config, progress=progress)
        norms = row_norms(train)
    meta = pairs.meta
    mapper.meta = {
        "src": _side_meta(meta, "src"),
        "tgt": _side_meta(meta, "tgt"),
        "training": {
            "rows": len(train),
            "val_rows": len(val),
            "alignment": getattr(pairs, "alignment", meta.get("alignment")),
            "coverage": getattr(pairs, "coverage", meta.get("coverage")),
            **{k: meta.get(k) for k in ("n_texts", "texts_fingerprint", "positions")},
            **norms,
        },
        "history": {k: v for k, v in history.items() if k not in ("records", "candidates")},
    }
    logger.info("fitted %s mapper: %s", kind, mapper.meta["history"])
    return mapper, history
