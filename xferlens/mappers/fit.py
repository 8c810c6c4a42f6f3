"""``fit_mapper``: one entry point for every mapper kind."""

import logging

from xferlens.mappers.base import Mapper, MapperConfig, MapperMismatchError, PairSource, mapper_class

logger = logging.getLogger(__name__)


def _side_meta(meta: dict, role: str) -> dict:
    return {
        "name": meta.get(f"{role}_model"),
        "weights": meta.get(f"{role}_fingerprint"),
        "tokenizer": meta.get(f"{role}_tokenizer"),
        "d_model": meta.get(f"{role}_d_model"),
        "n_layers": meta.get(f"{role}_n_layers"),
        "hook": meta.get(f"{role}_hook"),
    }


def row_norms(pairs: PairSource, batch_size: int = 8192) -> dict:
    """The typical activation scale on each side, which ``transfer`` uses to recalibrate
    vector norms: the rows' mean L2 norm (``src_norm``, ``tgt_norm``) and their centred
    spread, the RMS distance to the mean row (``src_spread``, ``tgt_spread``), which leaves
    out the offset every row shares."""
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


def fit_mapper(
    pairs: PairSource,
    kind: str = "affine",
    config: MapperConfig | dict | None = None,
    *,
    val: PairSource | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Mapper, dict]:
    """Fit a mapper of ``kind`` from paired activations; return ``(mapper, history)``.

    Args:
        pairs: :class:`~xferlens.activations.Pairs` (in memory) or
            :class:`~xferlens.activations.PairShards` (streamed from disk).
        kind: a registered kind: ``"affine"``, ``"orthogonal"``, ``"autoencoder"``, ...
        config: that kind's config dataclass (or a dict of its fields); defaults otherwise.
        val: validation pairs. If not given, ``val_fraction`` of the *texts* of ``pairs``
            is held out (so no text feeds both sides).

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
    mapper, history = cls.fit(train, val, config, progress=progress)
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
            **row_norms(train),
        },
        "history": {k: v for k, v in history.items() if k not in ("records", "candidates")},
    }
    logger.info("fitted %s mapper: %s", kind, mapper.meta["history"])
    return mapper, history
