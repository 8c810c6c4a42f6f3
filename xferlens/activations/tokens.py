"""Tokenize texts the way a HookedTransformer does, keeping each token's character span,
and lay token rows of different lengths out as one padded batch.

Character spans are what let us (a) pick positions by text ("the tokens of |prod|") and
(b) pair tokens across models whose tokenizers cut the text differently.
"""

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.errors import XferlensError
from xferlens.types import Mask, Tokens

logger = logging.getLogger(__name__)


class NoOffsetsError(XferlensError, ValueError):
    pass


@dataclass
class Tokenized:
    """Token ids, character spans and special-token flags of a list of texts."""

    ids: list[list[int]]
    spans: list[list[tuple[int, int]]]
    special: list[list[bool]]
    truncated: list[int]  # indices of texts that were cut to the context length


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def tokenize(
    model: HookedTransformer,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    truncate: bool = True,
) -> Tokenized:
    """Tokenize like ``model.to_tokens`` (same BOS rule), with character offsets.

    Texts longer than ``max_length`` (default the model's ``n_ctx``) are cut with a logged
    warning when ``truncate`` is true, and refused with an error otherwise.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer; load it with xferlens.load_model")
    if not getattr(tok, "is_fast", False):
        raise NoOffsetsError(
            f"tokenizer {type(tok).__name__} of {model.cfg.model_name} is a slow tokenizer and cannot "
            "report character offsets, which position selection and cross-tokenizer alignment need. "
            "Load a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True)) and assign it "
            "with model.set_tokenizer(...)."
        )
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if len(texts) == 0:
        raise ValueError("texts is empty: pass at least one text")
    limit = max_length or model.cfg.n_ctx
    enc = tok(list(texts), add_special_tokens=True, return_offsets_mapping=True)
    prepend = bool(model.cfg.default_prepend_bos)
    tok_adds_bos = bool(getattr(model.cfg, "tokenizer_prepends_bos", False))
    specials = special_ids(tok)
    out = Tokenized([], [], [], [])
    for i, (ids, spans) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        ids, spans = list(ids), [tuple(s) for s in spans]
        if prepend and not tok_adds_bos:
            ids, spans = [tok.bos_token_id, *ids], [(0, 0), *spans]
        elif not prepend and tok_adds_bos and ids and ids[0] == tok.bos_token_id:
            ids, spans = ids[1:], spans[1:]
        if len(ids) > limit:
            if not truncate:
                raise ValueError(
                    f"text {i} is {len(ids)} tokens long, more than {limit} "
                    f"({model.cfg.model_name}'s context); shorten it or pass truncate=True"
                )
            logger.warning("text %d: %d tokens cut to %d", i, len(ids), limit)
            ids, spans = ids[:limit], spans[:limit]
            out.truncated.append(i)
        out.ids.append(ids)
        out.spans.append(spans)
        out.special.append([t in specials for t in ids])
    return out


def length_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little padding.

    ``max_tokens`` caps ``len(batch) * longest`` (the padded batch), so batches of long texts
    get fewer rows: a forward pass holds attention scores of size ``rows * heads * width**2``,
    and without a cap the peak memory is set by the longest texts met so far (it grows with
    the corpus). A text longer than ``max_tokens`` gets a batch of its own.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    start = 0
    while start < len(order):
        rows = batch_size
        if max_tokens is not None:  # the first index is the widest: sorted longest first
            rows = max(1, min(batch_size, max_tokens // max(1, lengths[order[start]])))
        yield order[start : start + rows]
        start += rows


def pad_id(tokenizer) -> int:
    """The id padding is written with: the tokenizer's pad id, else its EOS id, else 0.

    Which id fills the pads never changes a result: every batch carries its mask, and the
    pads are masked out (left padding) or come after every real token (right padding).
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class PaddedBatch:
    """Token rows of different lengths laid out as one ``[batch, pos]`` tensor.

    ``mask`` is 1 on real tokens and 0 on pads (the ``attention_mask`` HF and
    TransformerLens take); ``lengths`` counts each row's real tokens; ``side`` is where
    the pads went. Tensors are on the CPU.
    """

    tokens: Tokens
    mask: Mask
    lengths: Int[Tensor, " batch"]
    side: Literal["left", "right"]

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """Column of each row's last real token (-1 for an empty right-padded row)."""
        if self.side == "left":
            return torch.full_like(self.lengths, self.tokens.shape[1] - 1)
        return self.lengths - 1

    def pad_like(self, values: Sequence[Sequence], fill=0, dtype: torch.dtype | None = None) -> Tensor:
        """Per-token ``values`` of the same rows (one entry per token, e.g. position flags or
        ``(start, end)`` character spans), laid out like ``tokens``; pads hold ``fill``.

        Example:
            >>> b = pad_batch(tok, [[5, 6, 7], [8]], "left")  # doctest: +SKIP
            >>> b.pad_like([[True, False, True], [True]], fill=False)  # doctest: +SKIP
            tensor([[ True, False,  True], [False, False,  True]])
        """
        counts = [len(v) for v in values]
        if counts != self.lengths.tolist():
            raise ValueError(
                f"values have {counts} entries per row; the rows have {self.lengths.tolist()} tokens"
            )
        flat = torch.tensor(list(itertools.chain.from_iterable(values)), dtype=dtype)
        out = torch.full((*self.tokens.shape, *flat.shape[1:]), fill, dtype=flat.dtype)
        out[self.mask.bool()] = flat
        return out


def pad_batch(
    tokenizer, rows: Sequence[Sequence[int]], side: Literal["left", "right"] = "right"
) -> PaddedBatch:
    """Token ``rows`` as one padded batch, pads on ``side`` written with :func:`pad_id`.

    Right padding suits one forward pass (causal attention keeps the pads after a row out
    of its real positions); left padding suits generation (every row's next token is at
    the last column). Pass ``mask`` as the attention mask either way.

    Example:
        >>> b = pad_batch(model.tokenizer, [[1, 5, 6], [1, 7]], "left")  # doctest: +SKIP
        >>> b.tokens, b.mask  # doctest: +SKIP
        (tensor([[1, 5, 6], [0, 1, 7]]), tensor([[1, 1, 1], [0, 1, 1]]))
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    if isinstance(rows, str) or len(rows) == 0:
        raise ValueError("rows must be a non-empty list of token id lists")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max())
    start = (width - lengths if side == "left" else torch.zeros_like(lengths)).unsqueeze(1)
    cols = torch.arange(width).unsqueeze(0)
    real = (cols >= start) & (cols < start + lengths.unsqueeze(1))
    tokens = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    tokens[real] = torch.tensor([int(t) for t in itertools.chain.from_iterable(rows)], dtype=torch.long)
    return PaddedBatch(tokens, real.long(), lengths, side)


@contextlib.contextmanager
def padding_side(tokenizer, side: Literal["left", "right"]) -> Iterator[None]:
    """Tell ``tokenizer`` how the batch in flight is padded, for the duration of the block.

    TransformerLens reads ``tokenizer.padding_side`` when it builds a mask itself (a forward
    pass without ``attention_mask``): a tokenizer set to ``"left"`` would mask the leading
    pad-id tokens of a right-padded batch, BOS included where BOS is the pad id.
    """
    if tokenizer is None:
        yield
        return
    saved = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = saved
