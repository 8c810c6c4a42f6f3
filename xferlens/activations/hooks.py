"""Turn layer numbers and hook names into validated TransformerLens hook names."""

import re
from collections.abc import Sequence

from transformer_lens import HookedTransformer

HookSpec = int | str | Sequence[int | str]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def resolve_hooks(model: HookedTransformer, hooks: HookSpec) -> list[str]:
    """Layer ints become ``blocks.{l}.hook_resid_post``; names must exist in the model."""
    items = [hooks] if isinstance(hooks, int | str) else list(hooks)
    if not items:
        raise ValueError("no hook points given: pass a layer number or a hook name")
    n = model.cfg.n_layers
    name = model.cfg.model_name
    out = []
    for h in items:
        if isinstance(h, bool) or not isinstance(h, int | str):
            raise TypeError(f"hook {h!r} must be a layer number or a hook name")
        if isinstance(h, int):
            if not 0 <= h < n:
                raise ValueError(f"layer {h} out of range: {name} has {n} layers (0..{n - 1})")
            h = resid_post(h)
        if h not in model.hook_dict:
            m = _BLOCK.match(h)
            if m and not 0 <= int(m.group(1)) < n:
                raise ValueError(
                    f"hook {h!r}: layer {m.group(1)} out of range: {name} has {n} layers (0..{n - 1})"
                )
            suffix = h.split(".")[-1]
            similar = [k for k in model.hook_dict if k.endswith(suffix)][:4]
            hint = f"; similar names: {', '.join(similar)}" if similar else ""
            raise ValueError(
                f"hook {h!r} does not exist in {name} (valid layers 0..{n - 1}, e.g. "
                f"'blocks.0.hook_resid_post', 'blocks.0.hook_resid_pre', 'blocks.0.attn.hook_z'){hint}"
            )
        if h not in out:
            out.append(h)
    return out


def stop_layer(model: HookedTransformer, hooks: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every requested hook (``None``: run all)."""
    deepest = 0  # run at least one block
    for h in hooks:
        m = _BLOCK.match(h)
        if m:
            deepest = max(deepest, int(m.group(1)))
        elif not h.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
            return None  # ln_final, unembed...: the whole model has to run
    return deepest + 1 if deepest + 1 < model.cfg.n_layers else None
