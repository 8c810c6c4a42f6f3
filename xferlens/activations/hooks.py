"""Turn layer numbers and hook names into validated TransformerLens hook names.

Every public argument that says where in a model (``hooks=``, ``hook=``, ``src_hook=``,
``layer=``, ``layers=``) takes either spelling: a layer number means that block's output,
``blocks.{l}.hook_resid_post``; any other point is named by its hook name. With a model at
hand, :func:`resolve_hooks` also checks that the names exist; without one (a vector's, a
set's or a mapper's own hook names) :func:`hook_name` only spells them.
"""

import numbers
import re
from collections.abc import Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

#: a layer number: a Python int, a numpy integer (``np.argmax`` gives ``np.int64``) or a
#: 0-d integer tensor (``scores.argmax()``); never a bool or a float
Layer = int | np.integer | torch.Tensor
HookSpec = Layer | str | Sequence[Layer | str]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_index(x: object) -> int | None:
    """``x`` as a Python int when it is a layer number (any integer type), ``None`` when it is
    not a number at all; a bool, a float or a tensor of either is refused with ``TypeError``."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.ndim > 1:
            raise TypeError(f"a layer given as a tensor must hold one integer, got shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"layer {x.item()!r} is a {x.dtype} tensor; pass an integer layer number")
        return int(x.item())
    if isinstance(x, bool | np.bool_):
        raise TypeError(f"layer {x!r} is a bool; pass an integer layer number (or a hook name)")
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Number):
        raise TypeError(f"layer {x!r} is a {type(x).__name__}; pass an integer layer number (int(...))")
    return None


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def hook_name(spec: Layer | str) -> str:
    """A layer number as ``blocks.{l}.hook_resid_post``, a hook name as itself (no model to
    check it against: use :func:`resolve_hooks` when there is one)."""
    layer = layer_index(spec)
    if layer is not None:
        if layer < 0:
            raise ValueError(f"layer {layer} is negative; pass a layer number 0..n_layers-1 or a hook name")
        return resid_post(layer)
    if not isinstance(spec, str):
        raise TypeError(f"hook {spec!r} must be a layer number or a hook name, not a {type(spec).__name__}")
    return spec


#: joins the hooks of a multi-layer source: ``blocks.14.hook_resid_post+blocks.15.hook_resid_post``
#: names the rows of both hooks side by side (a map from several source layers)
JOIN = "+"


def joined_hook(hooks: HookSpec) -> str:
    """One hook name for one hook; several (a list of layers or names) joined by ``+``: the
    name of a multi-layer source, whose rows are those hooks' rows concatenated in order."""
    names = hook_names(hooks)
    if not names:
        raise ValueError("no hooks given")
    return JOIN.join(names)


def split_hook(name: str) -> list[str]:
    """The hooks of a (possibly) joined hook name, in order."""
    parts = name.split(JOIN)
    if any(not p for p in parts):
        raise ValueError(f"hook name {name!r} has an empty part")
    return parts


def hook_names(hooks: HookSpec) -> list[str]:
    """:func:`hook_name` of one spec or of each of a list (order kept, duplicates dropped)."""
    items = [hooks] if _single(hooks) else list(hooks)
    return list(dict.fromkeys(hook_name(h) for h in items))


def hook_layer(name: str) -> int | None:
    """The block a hook name belongs to (``blocks.3.attn.hook_z`` -> 3); ``None`` outside the
    blocks (``hook_embed``, ``ln_final.hook_normalized``)."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def _single(hooks: object) -> bool:
    return isinstance(hooks, str | numbers.Number | np.bool_) or (
        isinstance(hooks, torch.Tensor) and hooks.ndim == 0
    )


def resolve_hooks(model: HookedTransformer, hooks: HookSpec) -> list[str]:
    """Layer numbers (any integer type) become ``blocks.{l}.hook_resid_post``; names must
    exist in the model. Bools and floats are refused (``TypeError``)."""
    items = [hooks] if _single(hooks) else list(hooks)
    if not items:
        raise ValueError("no hook points given: pass a layer number or a hook name")
    n = model.cfg.n_layers
    name = model.cfg.model_name
    out = []
    for h in items:
        layer = layer_index(h)
        if layer is None and not isinstance(h, str):
            raise TypeError(f"hook {h!r} must be a layer number or a hook name, not a {type(h).__name__}")
        if layer is not None:
            h = layer
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
