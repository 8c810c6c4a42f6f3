"""Cache residual-stream (or any hook) activations of a HookedTransformer over texts.

Only what is asked for is computed: hooks are attached just to the requested points, and
the forward pass stops after the deepest requested block (``stop_at_layer``). Texts are
batched by length with right padding: under a causal mask real tokens never see the
padding, so no attention mask is needed and padded positions are simply never stored.
"""

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import repeat
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import HookSpec, Layer, hook_name, resolve_hooks, stop_layer
from xferlens.activations.positions import Selector, describe
from xferlens.activations.tokens import length_batches, pad_batch, padding_side, tokenize
from xferlens.identity import ModelId
from xferlens.types import CharSpans, HookRows, RowIndex

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values():
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} not supported; use one of {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[key]


@dataclass
class ActivationSet:
    """Activations at selected token positions, one row per (text, position).

    ``acts[hook]`` holds the rows for each hook point; the other fields say which text,
    position, token and character span each row comes from. Padding never appears.
    """

    acts: dict[str, HookRows]
    text_index: RowIndex
    position: RowIndex
    token_ids: RowIndex
    char_spans: CharSpans
    texts: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.text_index.shape[0])

    @property
    def hooks(self) -> list[str]:
        return list(self.acts)

    def rows(self, hook: Layer | str | None = None) -> HookRows:
        """The activation matrix of ``hook`` (a hook name or a layer number; the only hook
        when there is one)."""
        if hook is None:
            if len(self.acts) != 1:
                raise ValueError(f"this set holds {len(self.acts)} hooks ({', '.join(self.acts)}); name one")
            hook = next(iter(self.acts))
        hook = hook_name(hook)
        if hook not in self.acts:
            raise KeyError(f"hook {hook!r} not cached; cached: {', '.join(self.acts)}")
        return self.acts[hook]

    def __repr__(self) -> str:
        dims = ", ".join(
            f"{h}: {tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" for h, a in self.acts.items()
        )
        return (
            f"ActivationSet({self.meta.get('model', '?')}, {len(self.texts)} texts, {len(self)} rows; {dims})"
        )


def row_order(text_index: RowIndex, position: RowIndex) -> RowIndex:
    """Permutation that sorts rows by (text, position): the order every reader returns."""
    return torch.argsort(text_index * (1 << 32) + position)


def texts_fingerprint(texts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def _selection(text: str, spans, special, positions: Selector, drop_special: bool) -> list[bool]:
    n = len(spans)
    if positions == "last":
        return [i == n - 1 for i in range(n)]
    keep = [not s for s in special] if drop_special else [True] * n
    if positions == "all":
        return keep
    if callable(positions):
        chosen = list(positions(text, spans))
        if len(chosen) != n:
            raise ValueError(
                f"position selector {describe(positions)} returned {len(chosen)} flags for {n} tokens"
            )
        return [k and bool(c) for k, c in zip(keep, chosen, strict=True)]
    raise ValueError(
        f"positions must be 'all', 'last' or a function (text, spans) -> flags, not {positions!r}"
    )


def model_meta(model: HookedTransformer) -> dict:
    """The model's identity as activation sets and shards record it (``ModelId.flat``)."""
    return ModelId.of(model).flat()


def iter_activations(
    model: HookedTransformer,
    texts: Sequence[str],
    hooks: HookSpec,
    *,
    positions: Selector = "all",
    drop_special: bool = True,
    batch_size: int = 8,
    dtype: str | torch.dtype = "float32",
    max_length: int | None = None,
    truncate: bool = True,
    progress: bool = True,
    chunk_texts: int = 256,
    max_batch_tokens: int | None = 1024,
) -> Iterator[dict]:
    """Yield one dict of rows per batch (``acts``, ``text_index``, ``position``, ...).

    Texts are tokenized ``chunk_texts`` at a time, so memory does not grow with the number
    of texts; use :func:`cache_activations` to collect, or ``shards.cache_to_disk`` to stream.
    A batch holds at most ``batch_size`` texts and ``max_batch_tokens`` padded tokens (fewer
    rows for long texts), which bounds the attention scores a forward pass allocates; pass
    ``None`` for fixed-size batches.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = resolve_hooks(model, hooks)
    stop = stop_layer(model, names)
    dt = storage_dtype(dtype)
    device = model.cfg.device
    bar = tqdm(total=len(texts), unit="text", desc=f"cache {model.cfg.model_name}", disable=not progress)
    try:
        for c0 in range(0, len(texts), chunk_texts):
            chunk = list(texts[c0 : c0 + chunk_texts])
            tk = tokenize(model, chunk, max_length=max_length, truncate=truncate)
            for batch in length_batches([len(x) for x in tk.ids], batch_size, max_batch_tokens):
                # right padding: causal attention keeps the pads out of every real position
                padded = pad_batch(model.tokenizer, [tk.ids[i] for i in batch], "right")
                tokens, width = padded.tokens, padded.tokens.shape[1]
                spans = padded.pad_like([tk.spans[i] for i in batch], 0, torch.long)
                spans = spans.reshape(len(batch), width, 2)  # [b, w, 2] even when every row is empty
                flags = [
                    _selection(chunk[i], tk.spans[i], tk.special[i], positions, drop_special) for i in batch
                ]
                select = padded.pad_like(flags, False, torch.bool)
                sel_dev = select.to(device)
                captured: dict[str, Tensor] = {}

                def grab(act: Tensor, hook, captured=captured, sel=sel_dev) -> None:
                    captured[hook.name] = act.detach()[sel].to(dt).cpu()

                # no_grad inside the body (not as a decorator): a decorator on a generator is
                # easily lost when the function is wrapped (jaxtyping's import hook did), and
                # then every captured row kept its whole autograd graph alive.
                with (
                    torch.no_grad(),
                    model.hooks(fwd_hooks=[(h, grab) for h in names]),
                    padding_side(model.tokenizer, "right"),
                ):
                    model(tokens.to(device), stop_at_layer=stop, return_type=None)
                # select is [b, pos]: each selected cell is one row, with its text and column
                rows_text = repeat(torch.tensor([c0 + i for i in batch]), "b -> b pos", pos=width)[select]
                rows_pos = repeat(torch.arange(width), "pos -> b pos", b=len(batch))[select]
                yield {
                    "acts": {h: captured[h] for h in names},
                    "text_index": rows_text,
                    "position": rows_pos,
                    "token_ids": tokens[select],
                    "char_spans": spans[select],
                }
                bar.update(len(batch))
    finally:
        bar.close()


def cache_activations(
    model: HookedTransformer,
    texts: Sequence[str],
    hooks: HookSpec,
    *,
    positions: Selector = "all",
    drop_special: bool = True,
    batch_size: int = 8,
    dtype: str | torch.dtype = "float32",
    max_length: int | None = None,
    truncate: bool = True,
    progress: bool = True,
    max_batch_tokens: int | None = 1024,
) -> ActivationSet:
    """Activations of ``model`` at ``hooks`` over ``texts``, in memory.

    Args:
        hooks: a layer number (``blocks.{l}.hook_resid_post``), a TransformerLens hook
            name, or a list of either.
        positions: ``"all"`` real tokens, ``"last"`` token of each text, or a selector from
            :mod:`xferlens.activations.positions` (e.g. ``substring("|prod|")``).
        drop_special: leave out BOS and other special tokens (chat-template markers).
        dtype: storage dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        truncate: cut texts longer than the context with a warning (``False``: error).
        max_batch_tokens: at most this many padded tokens per forward pass (long texts get
            smaller batches); bounds peak memory. ``None``: always ``batch_size`` texts.

    Example:
        >>> acts = cache_activations(model, ["Hello world"], hooks=12)  # doctest: +SKIP
        >>> acts.rows().shape  # doctest: +SKIP
        torch.Size([2, 896])
    """
    parts = list(
        iter_activations(
            model,
            texts,
            hooks,
            positions=positions,
            drop_special=drop_special,
            batch_size=batch_size,
            dtype=dtype,
            max_length=max_length,
            truncate=truncate,
            progress=progress,
            max_batch_tokens=max_batch_tokens,
        )
    )
    names = list(parts[0]["acts"])  # resolved and validated by iter_activations
    text_index = torch.cat([p["text_index"] for p in parts])
    position = torch.cat([p["position"] for p in parts])
    order = row_order(text_index, position)
    return ActivationSet(
        acts={h: torch.cat([p["acts"][h] for p in parts])[order] for h in names},
        text_index=text_index[order],
        position=position[order],
        token_ids=torch.cat([p["token_ids"] for p in parts])[order],
        char_spans=torch.cat([p["char_spans"] for p in parts])[order],
        texts=list(texts),
        meta={
            **model_meta(model),
            "hooks": names,
            "positions": describe(positions),
            "drop_special": drop_special,
            "dtype": str(storage_dtype(dtype)).removeprefix("torch."),
            "n_texts": len(texts),
            "texts_fingerprint": texts_fingerprint(texts),
        },
    )


def token_rows(
    model: HookedTransformer,
    texts: Sequence[str],
    *,
    drop_special: bool = True,
    max_length: int | None = None,
    truncate: bool = True,
) -> ActivationSet:
    """The rows :func:`cache_activations` would return (tokens, positions, spans), without
    running the model: an :class:`ActivationSet` with no activations."""
    tk = tokenize(model, texts, max_length=max_length, truncate=truncate)
    ti, pos, ids, spans = [], [], [], []
    for i, text in enumerate(texts):
        keep = _selection(text, tk.spans[i], tk.special[i], "all", drop_special)
        for j, k in enumerate(keep):
            if k:
                ti.append(i)
                pos.append(j)
                ids.append(tk.ids[i][j])
                spans.append(tk.spans[i][j])
    as_long = dict(dtype=torch.long)
    return ActivationSet(
        acts={},
        text_index=torch.tensor(ti, **as_long),
        position=torch.tensor(pos, **as_long),
        token_ids=torch.tensor(ids, **as_long),
        char_spans=torch.tensor(spans, **as_long).reshape(-1, 2),
        texts=list(texts),
        meta={**model_meta(model), "hooks": [], "positions": "all", "drop_special": drop_special},
    )


def save_activation_set(acts: ActivationSet, folder: str | Path) -> None:
    """One safetensors file plus a JSON header (texts included): no pickle."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"acts/{h}": a.contiguous() for h, a in acts.acts.items()}
    for k in ["text_index", "position", "token_ids", "char_spans"]:
        tensors[k] = getattr(acts, k).contiguous()
    save_file(tensors, folder / "activations.safetensors")
    (folder / "activations.json").write_text(json.dumps({"meta": acts.meta, "texts": acts.texts}, indent=1))


def load_activation_set(folder: str | Path) -> ActivationSet:
    from safetensors.torch import load_file

    folder = Path(folder)
    header = json.loads((folder / "activations.json").read_text())
    t = load_file(folder / "activations.safetensors")
    acts = {k.removeprefix("acts/"): v for k, v in t.items() if k.startswith("acts/")}
    return ActivationSet(
        acts, t["text_index"], t["position"], t["token_ids"], t["char_spans"], header["texts"], header["meta"]
    )
