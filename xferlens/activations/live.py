"""Pairs computed afresh every time they are read: both models run on every pass.

This is how the paper's code trains a mapper (forward passes of both models for every
training batch). xferlens caches pairs once instead; ``LivePairs`` exists to measure what
that saves (``benchmarks/scripts/bench_train_speed.py``) and for corpora too large even for disk.
It is a :class:`~xferlens.mappers.base.PairSource`, so ``fit_mapper`` takes it unchanged.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.align import match_rows, paired_activations, same_tokenizer
from xferlens.activations.cache import texts_fingerprint, token_rows
from xferlens.activations.hooks import resolve_hooks
from xferlens.identity import ModelId


class LivePairs:
    """Paired rows of ``texts`` (or of the texts ``ids`` picks), recomputed on each pass."""

    def __init__(
        self,
        src: HookedTransformer,
        tgt: HookedTransformer,
        texts: Sequence[str],
        src_hook: int | str,
        tgt_hook: int | str,
        *,
        chunk_texts: int = 32,
        batch_size: int = 8,
        ids: Sequence[int] | None = None,
        _rows_per_text: list[int] | None = None,
    ):
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("texts must be a non-empty list of strings")
        self.src, self.tgt, self.texts = src, tgt, list(texts)
        (self.src_hook,) = resolve_hooks(src, src_hook)
        (self.tgt_hook,) = resolve_hooks(tgt, tgt_hook)
        self.alignment = "position" if same_tokenizer(src, tgt) else "char_end"
        self.chunk_texts, self.forward_batch = chunk_texts, batch_size
        if _rows_per_text is None:  # count pairs from the tokenizers alone (no forward pass)
            s_rows = token_rows(src, self.texts)
            si, _ = match_rows(s_rows, token_rows(tgt, self.texts), self.alignment)
            ti = s_rows.text_index[si]
            _rows_per_text = torch.bincount(ti, minlength=len(self.texts)).tolist()
        self.rows_per_text = _rows_per_text
        self.ids = list(range(len(self.texts))) if ids is None else list(ids)
        self.meta = {
            **ModelId.of(src).flat("src_"),
            **ModelId.of(tgt).flat("tgt_"),
            "src_hook": self.src_hook,
            "tgt_hook": self.tgt_hook,
            "n_texts": len(self.texts),
            "texts_fingerprint": texts_fingerprint(self.texts),
            "positions": "all",
        }

    @property
    def d_src(self) -> int:
        return self.src.cfg.d_model

    @property
    def d_tgt(self) -> int:
        return self.tgt.cfg.d_model

    def __len__(self) -> int:
        return sum(self.rows_per_text[i] for i in self.ids)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        order = [self.ids[i] for i in torch.randperm(len(self.ids), generator=g)] if shuffle else self.ids
        for c0 in range(0, len(order), self.chunk_texts):
            chunk = [self.texts[i] for i in order[c0 : c0 + self.chunk_texts]]
            p = paired_activations(
                self.src,
                self.tgt,
                chunk,
                self.src_hook,
                self.tgt_hook,
                alignment=self.alignment,
                batch_size=self.forward_batch,
                progress=False,
            )
            idx = torch.randperm(len(p), generator=g) if shuffle else torch.arange(len(p))
            for start in range(0, len(p), batch_size):
                sel = idx[start : start + batch_size]
                yield p.src[sel], p.tgt[sel]

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["LivePairs", "LivePairs"]:
        """By text, with the same rule as ``Pairs.split`` (so both see the same texts)."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        ids = torch.tensor([i for i in self.ids if self.rows_per_text[i] > 0])
        g = torch.Generator().manual_seed(seed)
        val = set(
            ids[torch.randperm(len(ids), generator=g)[: max(1, round(len(ids) * val_fraction))]].tolist()
        )

        def view(keep: list[int]) -> "LivePairs":
            return LivePairs(
                self.src,
                self.tgt,
                self.texts,
                self.src_hook,
                self.tgt_hook,
                chunk_texts=self.chunk_texts,
                batch_size=self.forward_batch,
                ids=keep,
                _rows_per_text=self.rows_per_text,
            )

        return view([i for i in ids.tolist() if i not in val]), view(sorted(val))
