"""Pair up two models' activations over the same texts, same tokenizer or not.

Row ``i`` of ``pairs.src`` and row ``i`` of ``pairs.tgt`` describe the same piece of text.

* **Same tokenizer** (identical vocabulary and BOS rule): tokens are paired position by
  position.
* **Different tokenizers**: a source token and a target token are paired when their
  character spans *end at the same character*. Both models have then read exactly the
  same text when they produce that residual vector, so the pair is causally matched.
  Where several tokens end at one character (a multi-byte character split over byte
  tokens), the last of them — the one that completes the character — is used. Tokens whose
  end falls inside the other model's token have no partner and are dropped; the fraction
  of each model's tokens that found a partner is reported as ``coverage``.

Special tokens (BOS, chat-template markers) and padding are dropped on both sides before
pairing, by the same rule, so they can never pair with text.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.cache import ActivationSet, cache_activations, texts_fingerprint
from xferlens.activations.hooks import HookSpec, Layer, hook_name, joined_hook, split_hook
from xferlens.activations.positions import Selector
from xferlens.identity import ModelId
from xferlens.types import RowIndex, SrcRows, TgtRows


@dataclass
class Pairs:
    """Aligned rows of source and target activations, with how they were aligned."""

    src: SrcRows
    tgt: TgtRows
    text_index: RowIndex
    src_position: RowIndex
    tgt_position: RowIndex
    alignment: str
    coverage: dict[str, float]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.src.shape[0]
        for name in ("tgt", "text_index", "src_position", "tgt_position"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"Pairs: src has {n} rows but {name} has {getattr(self, name).shape[0]}; "
                    "row i of every field must describe the same token"
                )
        if self.src.ndim != 2 or self.tgt.ndim != 2:
            raise ValueError(
                f"Pairs: src and tgt must be [rows, d], got {tuple(self.src.shape)} "
                f"and {tuple(self.tgt.shape)}"
            )

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @property
    def d_src(self) -> int:
        return int(self.src.shape[1])

    @property
    def d_tgt(self) -> int:
        return int(self.tgt.shape[1])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(src rows, tgt rows)`` in batches (what mapper fitting consumes)."""
        n = len(self)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        for start in range(0, n, batch_size):
            if idx is None:
                yield self.src[start : start + batch_size], self.tgt[start : start + batch_size]
            else:
                sel = idx[start : start + batch_size]
                yield self.src[sel], self.tgt[sel]

    def __repr__(self) -> str:
        return (
            f"Pairs({self.meta.get('src_model')} {self.meta.get('src_hook')} -> {self.meta.get('tgt_model')} "
            f"{self.meta.get('tgt_hook')}: {len(self)} rows, {self.alignment} alignment, coverage "
            f"src {self.coverage['src']:.1%} / tgt {self.coverage['tgt']:.1%})"
        )

    def reversed(self) -> "Pairs":
        """The same rows with source and target swapped (to fit a map the other way)."""

        def swap(key: str) -> str:
            for a, b in (("src", "tgt"), ("tgt", "src")):
                if key == a or key.startswith(a + "_"):
                    return b + key[len(a) :]
            return key

        return Pairs(
            self.tgt,
            self.src,
            self.text_index,
            self.tgt_position,
            self.src_position,
            self.alignment,
            {swap(k): v for k, v in self.coverage.items()},
            {swap(k): v for k, v in self.meta.items()},
        )

    def select(self, mask: Tensor) -> "Pairs":
        return Pairs(
            self.src[mask],
            self.tgt[mask],
            self.text_index[mask],
            self.src_position[mask],
            self.tgt_position[mask],
            self.alignment,
            dict(self.coverage),
            dict(self.meta),
        )

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["Pairs", "Pairs"]:
        """Train/validation split *by text*, so no text contributes rows to both parts."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        ids = torch.unique(self.text_index)
        g = torch.Generator().manual_seed(seed)
        val_ids = ids[torch.randperm(len(ids), generator=g)[: max(1, round(len(ids) * val_fraction))]]
        val = torch.isin(self.text_index, val_ids)
        return self.select(~val), self.select(val)


def same_tokenizer(a: HookedTransformer, b: HookedTransformer) -> bool:
    ta, tb = a.tokenizer, b.tokenizer
    return (
        ta.get_vocab() == tb.get_vocab()
        and bool(a.cfg.default_prepend_bos) == bool(b.cfg.default_prepend_bos)
        and ta.bos_token_id == tb.bos_token_id
    )


def _last_by_end(spans: list[tuple[int, int]]) -> dict[int, int]:
    """End character -> index of the last row ending there (rows are in position order)."""
    out: dict[int, int] = {}
    for i, (a, b) in enumerate(spans):
        if b > a:
            out[b] = i
    return out


def match_rows(src: ActivationSet, tgt: ActivationSet, alignment: str) -> tuple[RowIndex, RowIndex]:
    """Row indices ``(si, ti)``: row ``si[k]`` of ``src`` and ``ti[k]`` of ``tgt`` are partners.

    Only tokens, positions and character spans are used, so either set may hold no
    activations at all (see :func:`~xferlens.activations.cache.token_rows`).
    """
    if src.texts != tgt.texts:
        raise ValueError(
            "the two activation sets were made from different texts; pair sets of the same texts"
        )
    src_rows, tgt_rows = [], []
    n_texts = len(src.texts)
    s_bounds = torch.searchsorted(src.text_index, torch.arange(n_texts + 1))
    t_bounds = torch.searchsorted(tgt.text_index, torch.arange(n_texts + 1))
    for t in range(n_texts):
        s0, s1 = int(s_bounds[t]), int(s_bounds[t + 1])
        t0, t1 = int(t_bounds[t]), int(t_bounds[t + 1])
        if alignment == "position":
            sp, tp = src.position[s0:s1].tolist(), tgt.position[t0:t1].tolist()
            if sp != tp or not torch.equal(src.token_ids[s0:s1], tgt.token_ids[t0:t1]):
                raise ValueError(
                    f"text {t}: the two models tokenized it differently; use alignment='char_end'"
                )
            src_rows += range(s0, s1)
            tgt_rows += range(t0, t1)
        elif alignment == "char_end":
            s_end = _last_by_end([tuple(x) for x in src.char_spans[s0:s1].tolist()])
            t_end = _last_by_end([tuple(x) for x in tgt.char_spans[t0:t1].tolist()])
            for end in sorted(s_end.keys() & t_end.keys()):
                src_rows.append(s0 + s_end[end])
                tgt_rows.append(t0 + t_end[end])
        else:
            raise ValueError(f"alignment must be 'position' or 'char_end', not {alignment!r}")
    return torch.tensor(src_rows, dtype=torch.long), torch.tensor(tgt_rows, dtype=torch.long)


def align_sets(
    src: ActivationSet, tgt: ActivationSet, src_hook: HookSpec, tgt_hook: Layer | str, alignment: str
) -> Pairs:
    """Pair the rows of two activation sets over the same texts (see module docs); hooks
    by name or layer number. ``src_hook`` may be several hooks (a list, or a name joined by
    ``+``): the source rows are then theirs side by side, in order (a multi-layer source)."""
    src_hook = joined_hook(split_hook(src_hook) if isinstance(src_hook, str) else src_hook)
    tgt_hook = hook_name(tgt_hook)
    si, ti = match_rows(src, tgt, alignment)
    n_texts = len(src.texts)
    coverage = {"src": len(si) / max(1, len(src)), "tgt": len(ti) / max(1, len(tgt))}
    return Pairs(
        src=torch.cat([src.rows(h)[si] for h in split_hook(src_hook)], dim=-1),
        tgt=tgt.rows(tgt_hook)[ti],
        text_index=src.text_index[si],
        src_position=src.position[si],
        tgt_position=tgt.position[ti],
        alignment=alignment,
        coverage=coverage,
        meta={
            **ModelId.read(src.meta).flat("src_"),
            **ModelId.read(tgt.meta).flat("tgt_"),
            "src_hook": src_hook,
            "tgt_hook": tgt_hook,
            "n_texts": n_texts,
            "texts_fingerprint": texts_fingerprint(src.texts),
            "positions": src.meta.get("positions"),
            "src_rows": len(src),
            "tgt_rows": len(tgt),
        },
    )


def paired_activations(
    src: HookedTransformer,
    tgt: HookedTransformer,
    texts: Sequence[str],
    src_hook: HookSpec,
    tgt_hook: int | str,
    *,
    positions: Selector = "all",
    alignment: str = "auto",
    batch_size: int = 8,
    dtype: str | torch.dtype = "float32",
    max_length: int | None = None,
    truncate: bool = True,
    progress: bool = True,
    max_batch_tokens: int | None = 1024,
) -> Pairs:
    """Run ``texts`` through both models and pair their activations row by row.

    Args:
        src_hook, tgt_hook: layer numbers (``resid_post``) or hook names. ``src_hook`` may
            be several (e.g. ``[14, 15]``): each row is then those layers' activations side
            by side, and a map fitted on the pairs reads them all (its source hook is the
            joined name ``blocks.14.hook_resid_post+blocks.15.hook_resid_post``; a vector
            carried by it needs a direction at each of those hooks).
        positions: which tokens to use (see :mod:`xferlens.activations.positions`); a
            text-based selector picks the same text in both models.
        alignment: ``"auto"`` (``"position"`` when the tokenizers are identical, else
            ``"char_end"``), or either explicitly.
        max_batch_tokens: padded tokens per forward pass (see ``cache_activations``).

    Example:
        >>> pairs = paired_activations(small, big, corpus, 12, 14)  # doctest: +SKIP
        >>> pairs.coverage  # doctest: +SKIP
        {'src': 1.0, 'tgt': 1.0}
    """
    if alignment not in ("auto", "position", "char_end"):
        raise ValueError(f"alignment must be 'auto', 'position' or 'char_end', not {alignment!r}")
    if alignment == "auto":
        alignment = "position" if same_tokenizer(src, tgt) else "char_end"
    kw = dict(
        positions=positions,
        drop_special=True,
        batch_size=batch_size,
        dtype=dtype,
        max_length=max_length,
        truncate=truncate,
        progress=progress,
        max_batch_tokens=max_batch_tokens,
    )
    a = cache_activations(src, texts, src_hook, **kw)
    b = cache_activations(tgt, texts, tgt_hook, **kw)
    return align_sets(a, b, a.hooks, b.hooks[0], alignment)
