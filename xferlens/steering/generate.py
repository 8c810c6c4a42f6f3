"""Batched greedy generation, optionally steered: left padding, KV cache, hooks that clean up.

Prompts are tokenized once (with character spans, so a text selector such as
``substring("|prod|")`` can choose the steered positions), grouped by length to waste
little padding, left-padded, and generated with TransformerLens's KV-cached ``generate``
inside :func:`~xferlens.steering.apply.steer`. Replies come back in the prompts' order.
"""

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from xferlens.activations.positions import Selector
from xferlens.activations.tokens import length_batches, tokenize
from xferlens.steering.apply import steer
from xferlens.steering.vector import SteeringVector

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>")


def stop_token_ids(model: HookedTransformer) -> list[int]:
    """The tokenizer's EOS plus the end-of-turn markers of common chat templates it knows."""
    tok = model.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in STOP_TOKENS if t in vocab]
    return list(dict.fromkeys(ids))


class _LeftPadding:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __enter__(self):
        self.saved = self.tok.padding_side
        self.tok.padding_side = "left"

    def __exit__(self, *exc):
        self.tok.padding_side = self.saved


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
    layers: Literal["all"] | Sequence[int] | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, special tokens dropped).

    Args:
        prompts: full prompt strings (chat-format them first with ``chat_prompts``).
        vector, alpha, mode, layers, force: as for :func:`~xferlens.steering.steer`;
            ``vector=None`` generates unsteered.
        positions: ``"all"`` (prompt and generated tokens), ``"prompt"`` (every prompt
            token, none generated), or a text selector (``positions.substring("|prod|")``):
            the prompt tokens it picks.

    Example:
        >>> generate(model, chat_prompts(model, ["Write a haiku"]), vector=v, alpha=4)  # doctest: +SKIP
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    tok = model.tokenizer
    tk = tokenize(model, prompts, truncate=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = stop_token_ids(model)
    device = model.cfg.device
    replies: list[str] = [""] * len(prompts)
    bar = tqdm(
        total=len(prompts), unit="prompt", desc=f"generate {model.cfg.model_name}", disable=not progress
    )
    for batch in length_batches([len(x) for x in tk.ids], batch_size):
        width = max(len(tk.ids[i]) for i in batch)
        tokens = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, i in enumerate(batch):
            n = len(tk.ids[i])
            tokens[r, width - n :] = torch.tensor(tk.ids[i])
            mask[r, width - n :] = torch.tensor(_flags(positions, prompts[i], tk.spans[i]))
        steering = (
            steer(
                model,
                vector,
                alpha,
                mode=mode,
                layers=layers,
                force=force,
                positions="all" if positions == "all" else mask,
            )
            if vector is not None
            else nullcontext()
        )
        with steering, _LeftPadding(tok):
            out = model.generate(
                tokens.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                stop_at_eos=True,
                eos_token_id=stops,
                use_past_kv_cache=True,
                verbose=False,
                return_type="tokens",
            )
        for r, i in enumerate(batch):
            new = out[r, width:].tolist()
            for j, t in enumerate(new):
                if t in stops:
                    new = new[:j]
                    break
            replies[i] = tok.decode(new, skip_special_tokens=True)
        bar.update(len(batch))
    bar.close()
    return replies


def _flags(positions, text: str, spans) -> list[bool]:
    if positions in ("all", "prompt"):
        return [True] * len(spans)
    if callable(positions):
        flags = [bool(f) for f in positions(text, spans)]
        if len(flags) != len(spans):
            raise ValueError(f"position selector returned {len(flags)} flags for {len(spans)} tokens")
        return flags
    raise ValueError(f"positions must be 'all', 'prompt' or a text selector, not {positions!r}")
