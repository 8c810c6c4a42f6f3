"""``SteeringVector``: direction(s) by hook point, the model they belong to, how they were made.

A vector is a plain value: print it, scale it, save it (safetensors + JSON), load it, and
it refuses to be applied to a model other than the one it was made in (or, for a
transferred vector, mapped into).
"""

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from xferlens.activations.hooks import JOIN, Layer, hook_name, split_hook
from xferlens.artifacts import (
    ArtifactError,
    check_count,
    check_hook_name,
    check_scale,
    read_artifact,
    write_artifact,
)
from xferlens.errors import ModelMismatchError
from xferlens.identity import ModelId

FORMAT = "xferlens.steering/1"
STEM = "vector"


class SteeringMismatchError(ModelMismatchError):
    """A steering vector used with a model (or hook) it does not belong to."""


class SteeringFileError(ArtifactError):
    pass


@dataclass
class SteeringVector:
    """Steering direction(s) keyed by TransformerLens hook name.

    Attributes:
        directions: ``{hook: [d_model]}``; the raw vector (not unit length): ``steer``
            adds ``alpha * direction``.
        model: identity of the model the vector lives in (``xferlens.identity``).
        recipe: how it was made: method, prompt-set fingerprints and counts, positions,
            and for transferred vectors the mapper and source vector.
        act_norm: ``{hook: mean L2 norm of the activations the vector was made from}``, the
            scale ``transfer`` uses to recalibrate norms across models.
    """

    directions: dict[str, Float[Tensor, " d_model"]]
    model: dict
    recipe: dict = field(default_factory=dict)
    act_norm: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ValueError("a SteeringVector needs at least one direction")
        for hook, v in self.directions.items():
            if v.ndim != 1:
                raise ValueError(f"direction at {hook!r} must be 1-D [d_model], got shape {tuple(v.shape)}")
            if not torch.isfinite(v).all():
                raise ValueError(f"direction at {hook!r} has NaN or inf entries")
            d = self.model.get("d_model")
            if d is not None and v.shape[0] != d:
                raise ValueError(f"direction at {hook!r} has {v.shape[0]} entries; the model has d_model={d}")

    # ------------------------------------------------------------------ views

    @property
    def hooks(self) -> list[str]:
        return list(self.directions)

    @property
    def hook(self) -> str:
        """The single hook of a one-direction vector."""
        if len(self.directions) != 1:
            raise ValueError(f"this vector has directions at {self.hooks}; name the hook you mean")
        return self.hooks[0]

    def _hook(self, hook: Layer | str | None) -> str:
        """``hook`` (a name or a layer number) as one of this vector's hook names."""
        name = self.hook if hook is None else hook_name(hook)
        if name not in self.directions:
            raise KeyError(f"this vector has no direction at {name!r}; it has {', '.join(self.hooks)}")
        return name

    def direction(self, hook: Layer | str | None = None) -> Tensor:
        """The direction at ``hook`` (a hook name or a layer number; default: the only one).
        A joined name (``a+b``, a multi-layer map's source hook) gives the directions at
        each of its hooks side by side."""
        if isinstance(hook, str) and JOIN in hook:
            return torch.cat([self.direction(h) for h in split_hook(hook)])
        return self.directions[self._hook(hook)]

    def has(self, hook: Layer | str | None) -> bool:
        """Whether the vector has a direction at ``hook`` (at every part of a joined name)."""
        if hook is None:
            return False
        names = split_hook(hook) if isinstance(hook, str) else [hook_name(hook)]
        return all(hook_name(h) in self.directions for h in names)

    def norm(self, hook: Layer | str | None = None) -> float:
        return float(self.direction(hook).float().norm())

    def relative_norm(self, hook: Layer | str | None = None) -> float | None:
        """Norm of the direction over the typical activation norm at its hook."""
        hook = self._hook(hook)
        n = self.act_norm.get(hook)
        return self.norm(hook) / n if n else None

    def scaled(self, factor: float) -> "SteeringVector":
        if not math.isfinite(factor):
            raise ValueError(f"scale factor must be finite, got {factor}")
        return SteeringVector(
            {h: v * factor for h, v in self.directions.items()},
            dict(self.model),
            {**self.recipe, "scaled_by": factor * self.recipe.get("scaled_by", 1.0)},
            dict(self.act_norm),
        )

    def at(self, hook: Layer | str) -> "SteeringVector":
        """The vector at one of its hooks only (e.g. one layer of a multi-layer build)."""
        hook = self._hook(hook)
        return SteeringVector(
            {hook: self.direction(hook)},
            self.model,
            self.recipe,
            {hook: self.act_norm[hook]} if hook in self.act_norm else {},
        )

    def to(self, device: str | torch.device) -> "SteeringVector":
        return SteeringVector(
            {h: v.to(device) for h, v in self.directions.items()}, self.model, self.recipe, self.act_norm
        )

    def __repr__(self) -> str:
        parts = []
        for h in self.hooks:
            rel = self.relative_norm(h)
            parts.append(f"{h}: norm {self.norm(h):.3g}" + (f" ({rel:.2f}x act norm)" if rel else ""))
        return (
            f"SteeringVector({self.model.get('name')}, {self.recipe.get('method', '?')}; "
            + "; ".join(parts)
            + ")"
        )

    # ------------------------------------------------------------------ checks

    def check_model(self, model: HookedTransformer, *, force: bool = False) -> None:
        """Refuse a model other than the one this vector belongs to (``force``: warn loudly)."""
        missing = [h for h in self.hooks if h not in model.hook_dict]
        ModelId.read(self.model).check(
            model,
            what=f"this steering vector belongs to {self.model.get('name')} "
            f"(weights {self.model.get('weights')}), not the model given",
            blocking=[f"hook(s) {missing} do not exist in {model.cfg.model_name}"] if missing else [],
            force=force,
            error=SteeringMismatchError,
            shout="APPLYING A STEERING VECTOR TO ANOTHER MODEL",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ files

    def save(self, folder: str | os.PathLike) -> Path:
        header = {"format": FORMAT, "model": self.model, "recipe": self.recipe, "act_norm": self.act_norm}
        return write_artifact(folder, STEM, self.directions, header)

    def to_gguf(
        self, path: str | os.PathLike, model: HookedTransformer | None = None, *, alpha: float = 1.0
    ) -> Path:
        """Write a llama.cpp control vector: see :func:`xferlens.interop.to_gguf`."""
        from xferlens.interop.gguf_cvec import to_gguf

        return to_gguf(self, path, model, alpha=alpha)

    @staticmethod
    def from_gguf(
        path: str | os.PathLike, model: HookedTransformer, *, force: bool = False
    ) -> "SteeringVector":
        """Read a llama.cpp control vector: see :func:`xferlens.interop.from_gguf`."""
        from xferlens.interop.gguf_cvec import from_gguf

        return from_gguf(path, model, force=force)


def load_steering_vector(
    folder: str | os.PathLike, model: HookedTransformer | None = None, *, force: bool = False
) -> SteeringVector:
    """Load a vector saved with ``vector.save(folder)``; with ``model``, check it belongs there."""
    header, tensors = read_artifact(folder, STEM, FORMAT, SteeringFileError)
    _check_header(header, tensors, Path(folder) / f"{STEM}.json")
    try:
        vec = SteeringVector(tensors, header["model"], header.get("recipe", {}), header.get("act_norm", {}))
    except (KeyError, ValueError) as e:
        raise SteeringFileError(f"{folder}: not a valid steering vector ({e})") from e
    if model is not None:
        vec.check_model(model, force=force)
    return vec.to(model.cfg.device) if model is not None else vec


def _check_header(header: dict, tensors: dict[str, Tensor], where: Path) -> None:
    """Range-check what a loaded vector will compute with: hooks, widths, recorded scales."""
    err = SteeringFileError
    model = header.get("model")
    if not isinstance(model, dict):
        raise err(f"{where}: 'model' is {model!r}, expected the model's identity; get the artifact again")
    n_layers = model.get("n_layers")
    if n_layers is not None:
        check_count(n_layers, "model.n_layers", str(where), err)
    d_model = model.get("d_model")
    if d_model is not None:
        check_count(d_model, "model.d_model", str(where), err)
    for key in ("name", "weights", "tokenizer"):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise err(f"{where}: model.{key} is {model[key]!r}, expected a string; get the artifact again")
    for hook, v in tensors.items():
        check_hook_name(hook, f"{where} (tensor name)", err, n_layers=n_layers)
        if not v.is_floating_point():
            raise err(f"{where}: direction {hook!r} has dtype {v.dtype}, expected floating point")
    act_norm = header.get("act_norm", {})
    if not isinstance(act_norm, dict):
        raise err(f"{where}: act_norm is {act_norm!r}, expected {{hook: norm}}; get the artifact again")
    for hook, n in act_norm.items():
        if hook not in tensors:
            raise err(
                f"{where}: act_norm names hook {hook!r}, but the vector's directions are at "
                f"{sorted(tensors)}; get the artifact again"
            )
        check_scale(n, f"act_norm[{hook!r}]", str(where), err)
    if not isinstance(header.get("recipe", {}), dict):
        raise err(f"{where}: recipe is {header.get('recipe')!r}, expected a dict; get the artifact again")
