"""Applying steering vectors: TransformerLens hook lists and a context manager that cleans up.

``mode="add"`` adds ``alpha * direction`` to the residual stream; ``mode="ablate"``
projects the direction out (``h - alpha * (h . u) u`` with ``u`` the unit direction;
``alpha=1`` removes it entirely), at the vector's own hook(s), at chosen layers, or at
every residual-stream point (``layers="all"``: each block's input and mid-point and the
final output, so no layer ever reads the direction; the refusal-direction literature's
"directional ablation").

Positions: ``"all"`` (every position of every forward pass, generated tokens included),
a list of position indices, or a boolean mask ``[batch, pos]``. A mask of width ``P``
steers positions ``0..P-1`` of a forward pass of ``P`` tokens or more; a forward pass of
one token is taken to be a KV-cached generation step past the prompt and is not steered;
any other shorter input is an error (the mask would point beyond the sequence).
"""

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import HookSpec, resid_post, resolve_hooks
from xferlens.steering.vector import SteeringVector

Positions = Literal["all"] | Sequence[int] | Tensor
#: where to apply a vector's single direction instead of its own hook(s): ``"all"`` (every
#: residual-stream point), or layer numbers and hook names (one or a list)
Layers = Literal["all"] | HookSpec
Hook = tuple[str, Callable]


def every_resid_point(model: HookedTransformer) -> list[str]:
    """Every residual-stream point a layer reads: ``resid_pre`` and ``resid_mid`` of each
    block, and the last block's ``resid_post`` (what the unembedding reads)."""
    names = []
    for layer in range(model.cfg.n_layers):
        for point in ("hook_resid_pre", "hook_resid_mid"):
            name = f"blocks.{layer}.{point}"
            if name in model.hook_dict:
                names.append(name)
    names.append(resid_post(model.cfg.n_layers - 1))
    return names


def _is_all(layers: Layers) -> bool:
    return isinstance(layers, str) and layers == "all"


def _position_mask(positions: Positions) -> Tensor | None:
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"positions must be 'all', a list of indices or a bool mask, not {positions!r}")
        return None
    if isinstance(positions, Tensor):
        if positions.dtype != torch.bool or positions.ndim != 2:
            raise ValueError(
                "a position mask must be a bool tensor [batch, pos], got "
                f"{positions.dtype} {tuple(positions.shape)}"
            )
        return positions
    idx = list(positions)
    if not idx or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in idx):
        raise ValueError(f"positions must be non-negative integers, got {idx!r}")
    mask = torch.zeros(1, max(idx) + 1, dtype=torch.bool)
    mask[0, idx] = True
    return mask


def _mask_for(mask: Tensor | None, act: Tensor, hook_name: str) -> Tensor | None | bool:
    """The ``[batch, pos, 1]`` mask for this activation, ``None`` for all, ``False`` to skip."""
    if mask is None:
        return None
    batch, length = act.shape[0], act.shape[1]
    width = mask.shape[1]
    if length < width:
        if length == 1:
            return False  # a KV-cached step after the prompt
        raise ValueError(
            f"steering positions reach position {width - 1}, but the input at {hook_name} has only "
            f"{length} tokens; positions beyond the sequence"
        )
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"position mask is for a batch of {mask.shape[0]}, the input has {batch} sequences")
    full = torch.zeros(mask.shape[0], length, dtype=torch.bool, device=act.device)
    full[:, :width] = mask.to(act.device)
    return rearrange(full, "b pos -> b pos 1")


def _add_hook(v: Tensor, alpha: float, mask: Tensor | None) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        m = _mask_for(mask, act, hook.name)
        if m is False:
            return act
        delta = (alpha * v).to(device=act.device, dtype=act.dtype)
        return act + delta if m is None else act + m.to(act.dtype) * delta

    return hook


def _ablate_hook(u: Tensor, alpha: float, mask: Tensor | None) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        m = _mask_for(mask, act, hook.name)
        if m is False:
            return act
        uu = u.to(device=act.device, dtype=act.dtype)
        removed = alpha * (act @ uu).unsqueeze(-1) * uu
        return act - removed if m is None else act - m.to(act.dtype) * removed

    return hook


def steering_hooks(
    model: HookedTransformer,
    vector: SteeringVector,
    alpha: float = 1.0,
    *,
    positions: Positions = "all",
    mode: Literal["add", "ablate"] = "add",
    layers: Layers | None = None,
    force: bool = False,
) -> list[Hook]:
    """Plain TransformerLens ``(hook_name, fn)`` pairs, for ``model.hooks(fwd_hooks=...)``
    or ``run_with_hooks``. Arguments as for :func:`steer`."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if mode not in ("add", "ablate"):
        raise ValueError(f"mode must be 'add' or 'ablate', not {mode!r}")
    vector.check_model(model, force=force)
    mask = _position_mask(positions)
    if layers is None:
        targets = [(h, vector.direction(h)) for h in vector.hooks]
    else:
        v = vector.direction()  # one direction, applied at several points
        names = every_resid_point(model) if _is_all(layers) else resolve_hooks(model, layers)
        targets = [(h, v) for h in names]
    out = []
    for name, v in targets:
        v = v.detach().float()
        if mode == "add":
            out.append((name, _add_hook(v, float(alpha), mask)))
        else:
            norm = v.norm()
            if norm == 0:
                raise ValueError(f"cannot ablate a zero direction at {name}")
            out.append((name, _ablate_hook(v / norm, float(alpha), mask)))
    return out


@contextmanager
def steer(
    model: HookedTransformer,
    vector: SteeringVector,
    alpha: float = 1.0,
    *,
    positions: Positions = "all",
    mode: Literal["add", "ablate"] = "add",
    layers: Layers | None = None,
    force: bool = False,
) -> Iterator[HookedTransformer]:
    """Steer ``model`` inside a ``with`` block; every hook is removed on exit, exception or not.

    Works around ``model(...)``, ``model.run_with_cache(...)`` and ``model.generate(...)``.

    Args:
        alpha: scale of the added vector (``add``) or fraction of the projection removed
            (``ablate``; 1 removes the direction entirely).
        positions: ``"all"``, position indices, or a bool mask ``[batch, pos]`` (see module doc).
        mode: ``"add"`` or ``"ablate"``.
        layers: ``None`` = the vector's own hook(s); layer numbers (their
            ``hook_resid_post``) or hook names, one or a list, or ``"all"`` (every
            residual-stream point) to apply the vector's single direction there.
        force: apply a vector made for another model anyway, with a loud warning.

    Example:
        >>> with steer(model, refusal, alpha=4.0):  # doctest: +SKIP
        ...     model.generate("How do I bake bread?", max_new_tokens=20)
        >>> with steer(model, refusal, mode="ablate", layers="all"):  # doctest: +SKIP
        ...     logits = model(tokens)
    """
    hooks = steering_hooks(model, vector, alpha, positions=positions, mode=mode, layers=layers, force=force)
    with model.hooks(fwd_hooks=hooks):
        yield model
