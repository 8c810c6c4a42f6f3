"""Tokenize texts the way a HookedTransformer does, keeping each token's character span.

Character spans are what let us (a) pick positions by text ("the tokens of |prod|") and
(b) pair tokens across models whose tokenizers cut the text differently.
"""

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)


class NoOffsetsError(ValueError):
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
