"""Carrying a steering vector through a mapper into the target model.

Two ways to read a vector ``v`` through a map ``M``:

- ``"linear"``: ``M(v) - M(0)``, the image of ``v`` under the map's linear part. Exact for
  affine and orthogonal maps, for which ``M(h + v) - M(h)`` is the same at every ``h``.
- ``"mean_difference"``: the mean over real source activations ``h`` of
  ``M(h + v) - M(h)``: what the vector does to the map's output where the model actually
  lives. This is the paper's recipe ("push the source activations behind the vector
  through the mapper and take the difference in the target space"), and the only sound
  one for a nonlinear map, whose response at the origin says nothing about real inputs.

``method="auto"`` (the default) picks ``"linear"`` for linear maps (where both agree and
no activations are needed) and ``"mean_difference"`` otherwise.

Norm recalibration (``recalibrate=``): a map fitted by least squares shrinks directions it
cannot predict well, so the transferred vector comes out too short. We rescale it so its
norm *relative to the target layer's typical scale* equals the source vector's relative
to the source layer's; both scales are recorded from the mapper's training rows.
``"norm"`` (or ``True``) takes the rows' mean L2 norm as the scale, ``"spread"`` their
centred spread (RMS distance to the mean row), which leaves out the offset every row
shares — at a fixed template position most of a row's norm. The paper did not
recalibrate; on maps fitted on general text it recovered much of the lost effect. Both
assume the concept is as strong, relative to the layer, in both models, and that is a
property of the pair, not of the map (benchmarks/scripts/bench_recalibration.py, last-token
refusal vectors, 8 prompt splits): SmolLM2 L15 -> Qwen 0.5B L10 meets it by spread
(0.42 vs 0.41; "spread" gives 0.99 of the native vector's length along it, "norm" 0.85,
raw 0.93), Qwen 0.5B L10 -> 1.5B L12 does not (0.42 vs 0.57; "spread" 0.73, "norm" 0.65,
raw 0.89), and there recalibrating makes the vector shorter. Evaluations report raw and
recalibrated side by side.

``"shrinkage"`` is label-free and asks nothing of the pair: it measures how much the map
squeezes the transferred direction on held-out paired rows (std of the target's rows along
it over the mapped rows'; a least-squares map predicts a conditional mean, which varies
less than the target along what it predicts poorly) and lengthens the vector by that
factor. It assumes the vector is shortened as the rows are: an upper bound where the map
predicts the behaviour's shift itself better than the rest of the spread.

Where to fit the map: where the vector lives. A difference-of-means refusal vector is
read (and acts) at the last prompt token, a template position; a map fitted on every
token of general text or of chat prompts is dominated by ordinary text and carries that
vector less faithfully than one fitted only on the last prompt token of a few hundred
task prompts (``paired_activations(..., positions="last")``). On Qwen 0.5B -> 1.5B the
cosine to the target's own vector went from 0.83 (all content tokens of 600 prompts) to
0.96 (their 600 last tokens); see benchmarks/RESULTS.md. Keep the vector's own prompts
out of that fit: with them in, the map can simply reproduce the target's own vector
(0.99), which is no longer a transfer.
"""

import math
from typing import Literal

import torch
from torch import Tensor

from xferlens.activations.hooks import Layer, hook_name
from xferlens.identity import ModelId
from xferlens.mappers.base import Mapper
from xferlens.steering.vector import SteeringMismatchError, SteeringVector


def _check_source(vector: SteeringVector, mapper: Mapper, hook: str) -> None:
    src = mapper.meta.get("src") or {}
    extra = []
    if src.get("hook") and src["hook"] != hook:
        extra.append(f"hook: the mapper reads {src['hook']}, the vector is at {hook}")
    if vector.direction(hook).shape[0] != mapper.d_src:
        extra.append(
            f"width: the mapper expects d_src={mapper.d_src}, "
            f"the vector has {vector.direction(hook).shape[0]}"
        )
    ModelId.read(mapper.meta, "src").check(
        vector.model,
        what=f"this vector ({vector.model.get('name')} {hook}) is not in the mapper's source space",
        role="source model",
        extra=extra,
        error=SteeringMismatchError,
    )


@torch.no_grad()
def transfer(
    vector: SteeringVector,
    mapper: Mapper,
    *,
    source_rows: Tensor | None = None,
    target_rows: Tensor | None = None,
    method: Literal["auto", "linear", "mean_difference"] = "auto",
    recalibrate: bool | Literal["norm", "spread", "shrinkage"] = False,
    hook: Layer | str | None = None,
    tgt_hook: Layer | str | None = None,
) -> SteeringVector:
    """The target-model vector corresponding to ``vector`` under ``mapper``.

    Args:
        vector: a vector in the mapper's source model, at the mapper's source hook.
        mapper: a fitted mapper (its ``meta`` names both models and hooks).
        source_rows: ``[n, d_src]`` real source activations at that hook (e.g. the
            mapper's training pairs' ``src``); needed by ``"mean_difference"``.
        method: ``"auto"``, ``"linear"`` or ``"mean_difference"`` (module doc).
        target_rows: ``[n, d_tgt]`` the target's activations of the same tokens as
            ``source_rows`` (paired, held out from the map's fit); needed by ``"shrinkage"``.
        recalibrate: rescale to the source vector's relative norm (module doc):
            ``"norm"`` (or ``True``) relative to the layer's mean activation norm,
            ``"spread"`` relative to its centred spread; ``"shrinkage"`` undoes the map's
            squeeze along the transferred direction (``Mapper.shrinkage``, label-free);
            ``False``: raw.
        hook: which of the vector's hooks to transfer, by name or layer number (default:
            the mapper's source hook if the vector has it, else the vector's only one). A
            multi-layer map (source hook ``a+b``, fitted on ``paired_activations(..., [la,
            lb], ...)``) carries the vector's directions at ``a`` and ``b`` together.
        tgt_hook: the target hook (name or layer number) when the mapper does not record one.

    Example:
        >>> tv = transfer(refusal_small, mapper, recalibrate=True)  # doctest: +SKIP
        >>> with steer(big_model, tv, alpha=4.0): ...  # doctest: +SKIP
    """
    if hook is not None:
        hook = hook_name(hook)
    else:
        hook = mapper.src_hook if vector.has(mapper.src_hook) else vector.hook
    _check_source(vector, mapper, hook)
    tgt_hook = hook_name(tgt_hook) if tgt_hook is not None else (mapper.tgt_hook or hook)
    t = mapper.map_direction(vector.direction(hook), source_rows, method)
    training = mapper.meta.get("training") or {}
    tgt_norm = training.get("tgt_norm")
    raw_norm = float(t.norm())
    scale = 1.0
    if recalibrate is True:
        recalibrate = "norm"
    if recalibrate not in (False, "norm", "spread", "shrinkage"):
        raise ValueError(
            f"recalibrate must be False, True, 'norm', 'spread' or 'shrinkage', not {recalibrate!r}"
        )
    if recalibrate == "shrinkage":
        if source_rows is None or target_rows is None:
            raise ValueError(
                "recalibrate='shrinkage' needs source_rows and target_rows: paired activations of the same "
                "held-out tokens at the map's two hooks (e.g. paired_activations(...).src / .tgt)"
            )
        scale = mapper.shrinkage(t, source_rows, target_rows)
        t = t * scale
    elif recalibrate:
        src_scale, tgt_scale = training.get(f"src_{recalibrate}"), training.get(f"tgt_{recalibrate}")
        if src_scale is None or tgt_scale is None:
            raise ValueError(
                f"recalibrate={recalibrate!r} needs the activation scales recorded when the mapper was "
                f"fitted (mapper.meta['training']['src_{recalibrate}'/'tgt_{recalibrate}']); refit "
                "with this version of fit_mapper"
            )
        for key, value in ((f"src_{recalibrate}", src_scale), (f"tgt_{recalibrate}", tgt_scale)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"recalibrate={recalibrate!r}: mapper.meta['training'][{key!r}] is {value!r}, but "
                    "recalibration scales by it, so it must be a finite number > 0; refit the mapper "
                    "on varied activations (or get its artifact again), or pass recalibrate=False"
                )
        if raw_norm == 0 or not math.isfinite(raw_norm):
            raise ValueError(f"the transferred vector has norm {raw_norm}; cannot recalibrate its norm")
        scale = (vector.norm(hook) / src_scale) * tgt_scale / raw_norm
        if not math.isfinite(scale):
            raise ValueError(
                f"recalibration scale {scale} is not finite (source vector norm {vector.norm(hook)}, "
                f"src_{recalibrate} {src_scale}, tgt_{recalibrate} {tgt_scale}, raw norm {raw_norm}); "
                "pass recalibrate=False"
            )
        t = t * scale
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"the recalibrated vector (scale {scale}) overflowed; pass recalibrate=False")
    model = {k: v for k, v in (mapper.meta.get("tgt") or {}).items() if k != "hook"}
    if not model:
        model = {"name": None, "d_model": mapper.d_tgt}
    recipe = {
        "method": "transfer",
        "transfer_method": method,
        "recalibrated": recalibrate,
        "recalibration_scale": scale,
        "raw_norm": raw_norm,
        "mapper": {
            "kind": mapper.kind,
            "src": mapper.meta.get("src"),
            "tgt": mapper.meta.get("tgt"),
            "report": mapper.meta.get("report"),
        },
        "source_vector": {
            "model": vector.model,
            "hook": hook,
            "norm": vector.norm(hook),
            "recipe": vector.recipe,
        },
    }
    return SteeringVector(
        {tgt_hook: t.detach().cpu()}, model, recipe, {tgt_hook: tgt_norm} if tgt_norm else {}
    )
