"""The paper's "safety switch": a map from a fine-tuned model's layer to its base model's
layer, patched into the fine-tuned model so the fine-tuned behaviour can be toggled off.

With the switch on, the fine-tuned model's residual stream at ``mapper.src_hook`` is
replaced, at every position (generated tokens included), by ``mapper(h)``: what the base
model would hold there. Layers after it then compute from base-like activations. The
mapper is fitted like any other (``fit_mapper`` on ``paired_activations(finetuned, base,
texts, layer, layer)``; the paper uses an autoencoder); :meth:`SafetySwitch.fit` does
both steps.

Two ways to use it:

- ``with switch.on(model): ...`` — on inside the block, gone after it (exception or not);
- ``handle = switch.install(model)`` — a permanent hook (survives ``model.reset_hooks()``)
  that reads ``switch.enabled`` on every forward pass, so ``switch.enabled = False`` turns
  it off without touching the model; ``handle.remove()`` takes it out.
"""

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import Layer
from xferlens.mappers.base import Mapper, MapperConfig, MapperMismatchError


@dataclass
class SwitchHandle:
    """A permanently installed switch; ``remove()`` takes its hook out of the model."""

    hook_name: str
    _model: HookedTransformer
    _lens_handle: object

    def remove(self) -> None:
        point = self._model.hook_dict[self.hook_name]
        if self._lens_handle in point.fwd_hooks:
            self._lens_handle.hook.remove()
            point.fwd_hooks.remove(self._lens_handle)


class SafetySwitch:
    """A toggleable hook that replaces a fine-tuned model's activations at one layer by
    their image under ``mapper`` (fine-tuned layer -> base layer)."""

    def __init__(self, mapper: Mapper, *, enabled: bool = True):
        if not mapper.src_hook:
            raise ValueError(
                "the mapper records no source hook; fit it with fit_mapper on paired activations"
            )
        if mapper.d_src != mapper.d_tgt:
            raise MapperMismatchError(
                f"a safety switch writes the map's output back into the model it reads, so it needs "
                f"d_src == d_tgt; this mapper is {mapper.d_src} -> {mapper.d_tgt} "
                f"({mapper._side('src')} -> {mapper._side('tgt')})"
            )
        self.mapper = mapper.eval()
        self.enabled = enabled

    @property
    def hook_name(self) -> str:
        return self.mapper.src_hook

    @property
    def n_params(self) -> int:
        return self.mapper.n_params

    def __repr__(self) -> str:
        state = "on" if self.enabled else "off"
        return (
            f"SafetySwitch({self.mapper.kind}, {self.mapper._side('src')} -> {self.mapper._side('tgt')}, "
            f"{self.n_params:,} params, {state})"
        )

    # ------------------------------------------------------------------ hooks

    def _fn(self, always: bool) -> Callable:
        mapper = self.mapper

        def hook(act: Tensor, hook) -> Tensor:
            if not (always or self.enabled):
                return act
            with torch.no_grad():
                return mapper(act)

        return hook

    def hooks(self, model: HookedTransformer, *, force: bool = False) -> list[tuple[str, Callable]]:
        """Plain TransformerLens ``(hook_name, fn)`` pairs (the switch on)."""
        self.check_model(model, force=force)
        return [(self.hook_name, self._fn(always=True))]

    def check_model(self, model: HookedTransformer, *, force: bool = False) -> None:
        """Refuse a model other than the fine-tuned one the map reads from."""
        if self.hook_name not in model.hook_dict:
            raise ValueError(f"{model.cfg.model_name} has no hook {self.hook_name!r}")
        self.mapper.check_models(model, None, force=force)

    @contextmanager
    def on(self, model: HookedTransformer, *, force: bool = False) -> Iterator[HookedTransformer]:
        """The switch on inside a ``with`` block; removed on exit, exception or not."""
        with model.hooks(fwd_hooks=self.hooks(model, force=force)):
            yield model

    def install(self, model: HookedTransformer, *, force: bool = False) -> SwitchHandle:
        """Install permanently; toggle with ``switch.enabled``; undo with ``handle.remove()``."""
        self.check_model(model, force=force)
        point = model.hook_dict[self.hook_name]
        point.add_hook(self._fn(always=False), is_permanent=True)
        return SwitchHandle(self.hook_name, model, point.fwd_hooks[-1])

    # ------------------------------------------------------------------ building

    @classmethod
    def fit(
        cls,
        finetuned: HookedTransformer,
        base: HookedTransformer,
        texts: Sequence[str],
        layer: Layer | str,
        *,
        kind: str = "autoencoder",
        config: MapperConfig | dict | None = None,
        base_layer: Layer | str | None = None,
        batch_size: int = 8,
        max_length: int = 128,
        seed: int = 0,
        progress: bool = True,
    ) -> tuple["SafetySwitch", dict]:
        """Pair ``finetuned`` layer ``layer`` with ``base`` layer ``base_layer`` (default the
        same; layer numbers or hook names) on ``texts``, fit a ``kind`` mapper, return
        ``(switch, history)``.

        ``texts`` should include what the fine-tune changed (e.g. triggered prompts), so
        the map sees the activations it has to undo, and general text.
        """
        from xferlens.activations import paired_activations
        from xferlens.mappers import fit_mapper

        if finetuned.cfg.d_model != base.cfg.d_model:
            raise MapperMismatchError(
                f"{finetuned.cfg.model_name} has d_model {finetuned.cfg.d_model} but "
                f"{base.cfg.model_name} has {base.cfg.d_model}: a safety switch maps a model "
                "onto its own base"
            )
        pairs = paired_activations(
            finetuned,
            base,
            list(texts),
            layer,
            layer if base_layer is None else base_layer,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
        )
        mapper, history = fit_mapper(pairs, kind, config, seed=seed, progress=progress)
        return cls(mapper), history

    def save(self, folder: str | os.PathLike) -> None:
        self.mapper.save(folder)


def load_switch(folder: str | os.PathLike, model: HookedTransformer | None = None) -> SafetySwitch:
    """Load a saved switch (a mapper folder); with ``model``, check it is the right one."""
    from xferlens.mappers import load_mapper

    switch = SafetySwitch(load_mapper(folder))
    if model is not None:
        switch.check_model(model)
    return switch


def latency_per_token(
    model: HookedTransformer,
    prompts: Sequence[str],
    switch: "SafetySwitch | None" = None,
    *,
    max_new_tokens: int = 16,
    repeats: int = 2,
) -> float:
    """Seconds per generated token (KV-cached greedy decoding of ``prompts`` as one batch,
    exactly ``max_new_tokens`` each, best of ``repeats``), with ``switch`` on or none: the
    switch's cost is the difference to the plain model's figure."""
    from xferlens.activations.tokens import pad_batch, pad_id
    from xferlens.steering.generate import greedy_tokens

    if not prompts:
        raise ValueError("prompts is empty")
    tok = model.tokenizer
    padded = pad_batch(tok, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts], "left")
    tokens, mask = padded.tokens.to(model.cfg.device), padded.mask.to(model.cfg.device)
    ctx = switch.on(model) if switch is not None else contextlib.nullcontext()
    best = float("inf")
    with ctx:
        for _ in range(repeats):
            t0 = time.perf_counter()
            greedy_tokens(model, tokens, max_new_tokens, [], pad_id(tok), mask)
            best = min(best, time.perf_counter() - t0)
    return best / (len(prompts) * max_new_tokens)
