"""Caching in shares over torchrun ranks, for library functions that split themselves.

A library function that holds its activations in memory (the layer search, the report
cards) caches under torchrun like this: each rank caches whole batches of the batching
one process uses (:func:`cache_share`; :func:`xferlens.distributed.batch_share` picks
them), so every row is computed in the very padded batch it gets in one process and equals
it bit for bit. The ranks then join their parts into the :class:`ActivationSet` that
``cache_activations`` returns (:func:`joined_set`; without the activations, see
:func:`without_acts`, when only the tokens are needed everywhere), or send only the rows
one rank needs to it (:func:`rows_on_main`).
"""

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from xferlens import distributed as xd
from xferlens.activations.cache import ActivationSet, cache_activations, iter_activations, texts_fingerprint
from xferlens.activations.hooks import HookSpec
from xferlens.activations.positions import Selector
from xferlens.activations.tokens import length_batches, tokenize


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def cache_share(
    model: HookedTransformer,
    texts: Sequence[str],
    hooks: HookSpec,
    *,
    positions: Selector = "all",
    max_length: int | None = None,
    progress: bool = False,
    rank: int | None = None,
    world: int | None = None,
) -> dict:
    """This rank's part of ``cache_activations(model, texts, hooks, positions=...,
    max_length=...)`` (the rest at its defaults): ``{"rows": {text index: its rows},
    "meta": the set's meta or None}``, every batch cached as one process caches it (texts
    are batched ``chunk_texts`` at a time, as ``iter_activations`` does)."""
    texts = list(texts)
    batch_size = _default(cache_activations, "batch_size")
    max_tokens = _default(cache_activations, "max_batch_tokens")
    chunk = _default(iter_activations, "chunk_texts")
    mine = []
    for c0 in range(0, len(texts), chunk):
        lengths = [len(x) for x in tokenize(model, texts[c0 : c0 + chunk], max_length=max_length).ids]
        batches = xd.batch_share(
            list(length_batches(lengths, batch_size, max_tokens)), lengths, rank=rank, world=world
        )
        mine += [[c0 + i for i in sorted(b)] for b in batches]
    rows, meta = {}, None
    for idx in tqdm(mine, desc=f"cache {model.cfg.model_name}", unit="batch", disable=not progress):
        acts = cache_activations(
            model,
            [texts[i] for i in idx],
            hooks,
            positions=positions,
            max_length=max_length,
            batch_size=batch_size,
            max_batch_tokens=max_tokens,
            progress=False,
        )
        meta = acts.meta
        bounds = torch.searchsorted(acts.text_index, torch.arange(len(idx) + 1)).tolist()
        for j, t in enumerate(idx):
            s = slice(bounds[j], bounds[j + 1])
            rows[t] = {
                "position": acts.position[s],
                "token_ids": acts.token_ids[s],
                "char_spans": acts.char_spans[s],
                "acts": {h: a[s] for h, a in acts.acts.items()},
            }
    return {"rows": rows, "meta": meta}


def without_acts(share: dict) -> dict:
    """``share`` (a :func:`cache_share` part) with its tokens and positions only."""
    rows = {t: {k: v for k, v in r.items() if k != "acts"} for t, r in share["rows"].items()}
    return {"rows": rows, "meta": share["meta"]}


def joined_set(shares: list[dict], texts: Sequence[str]) -> ActivationSet:
    """The ranks' :func:`cache_share` parts as the one :class:`ActivationSet` over ``texts``
    that ``cache_activations`` returns (no activations where the shares carry none)."""
    rows = {t: r for sh in shares for t, r in sh["rows"].items()}
    assert sorted(rows) == list(range(len(texts))), "the ranks' shares do not cover the texts"
    meta = next(sh["meta"] for sh in shares if sh["meta"] is not None)
    per_text = [rows[t] for t in range(len(texts))]

    def cat(key):
        return torch.cat([r[key] for r in per_text])

    acts = (
        {h: torch.cat([r["acts"][h] for r in per_text]) for h in meta["hooks"]}
        if "acts" in per_text[0]
        else {}
    )
    return ActivationSet(
        acts=acts,
        text_index=torch.cat(
            [torch.full((len(r["position"]),), t, dtype=torch.long) for t, r in enumerate(per_text)]
        ),
        position=cat("position"),
        token_ids=cat("token_ids"),
        char_spans=cat("char_spans").reshape(-1, 2),
        texts=list(texts),
        meta={**meta, "n_texts": len(texts), "texts_fingerprint": texts_fingerprint(texts)},
    )


def cache_split(model: HookedTransformer, texts: Sequence[str], hooks: HookSpec, **kw) -> ActivationSet:
    """``cache_activations(model, texts, hooks, **kw)`` on every rank, each rank caching its
    share (:func:`cache_share`, same keywords) and every rank getting all the rows. Call it
    on every rank; a failure on one fails all."""
    with xd.collectively(f"caching {model.cfg.model_name}"):
        share = cache_share(model, texts, hooks, **kw)
    return joined_set(xd.all_gather_objects(share), texts)


def rows_on_main(share: dict, full: ActivationSet, idx: torch.Tensor, hooks: list[str]) -> list | None:
    """Rows ``idx`` of ``full`` (every rank's rows, without activations) at ``hooks``, from the
    ranks that cached them (``share``: this rank's), gathered on rank 0; None elsewhere."""
    bounds = torch.searchsorted(full.text_index, torch.arange(len(full.texts) + 1)).tolist()
    mine = sorted(share["rows"])
    at = torch.full((len(full),), -1, dtype=torch.long)  # a row of full -> its place in this rank's rows
    start = 0
    for t in mine:
        n = bounds[t + 1] - bounds[t]
        at[bounds[t] : bounds[t + 1]] = torch.arange(start, start + n)
        start += n
    local = at[idx]
    ks = torch.nonzero(local >= 0).flatten()
    sent = None
    if mine:
        sent = {h: torch.cat([share["rows"][t]["acts"][h] for t in mine])[local[ks]] for h in hooks}
    got = xd.gather_objects((ks, sent))
    if got is None:
        return None
    got = [(k, r) for k, r in got if r is not None]
    assert sum(len(k) for k, _ in got) == len(idx), "the ranks' rows do not cover the rows asked for"
    out = []
    for h in hooks:
        first = got[0][1][h]
        rows = torch.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        for k, r in got:
            rows[k] = r[h]
        out.append(rows)
    return out
