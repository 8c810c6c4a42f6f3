"""To and from ``steering_vectors.SteeringVector`` and ``repeng.ControlVector``.

A vector made with either library can be brought here (``from_steering_vectors``,
``from_repeng``), transferred to another model, and sent back (``to_steering_vectors``,
``to_repeng``). Both libraries are optional and imported only when a conversion needs their
class; every function also takes ``cls=`` (any class with the same constructor), which is how
the unit tests run without them.

Layer numbering, from their source (read 2026-12):

* steering-vectors 0.12 (``steering_vectors/steering_vector.py``): ``SteeringVector`` is a
  dataclass ``layer_activations: dict[int, Tensor]`` plus ``layer_type`` (default
  ``"decoder_block"``). ``patch_activations`` registers a forward hook on
  ``matching_layers[layer_num]``, the ``layer_num``-th module matching the guessed
  ``...layers.{num}`` pattern (``layer_matching.py``, ``guess_decoder_block_matcher``), and adds
  ``multiplier * activation`` to that block's output, at every position from
  ``min_token_index`` (default 0). ``record_activations`` reads the same outputs. Layer ``l``
  is therefore ``blocks.{l}.hook_resid_post``; negative ``l`` index from the end (Python list
  indexing). Only ``layer_type="decoder_block"`` is a residual-stream point: the other layer
  types (``self_attn``, ``mlp``, the layernorms) are refused.
* repeng 0.4.0 (``repeng/extract.py``, ``repeng/control.py``; it pins ``numpy<2`` and does not
  import under NumPy 2, where ``np.float_`` is gone, so its real class is tested only where
  NumPy 1 is installed): ``ControlVector`` is a
  dataclass ``model_type: str`` (``model.config.model_type``) plus
  ``directions: dict[int, np.ndarray]``. ``read_representations`` reads
  ``hidden_states[layer + 1]`` (the output of ``model.model.layers[layer]``) and
  ``ControlModule`` adds ``coeff * directions[layer]`` to the output of ``layers[layer]`` at
  every non-padding position: layer ``l`` is ``blocks.{l}.hook_resid_post``. Its
  ``export_gguf`` writes ``direction.{l}`` with that same ``l``, which llama.cpp adds to the
  output of its layer ``l`` (``xferlens.interop.gguf_cvec``), so the three agree.
"""

import importlib
import warnings

import numpy as np
import torch
from transformer_lens import HookedTransformer

from xferlens.identity import model_identity
from xferlens.interop.common import (
    HF_MODEL_TYPE,
    InteropError,
    architecture,
    block_output_layer,
    check_layer,
    check_width,
    model_architecture,
    resid_post,
)
from xferlens.steering.vector import SteeringVector


def _load_class(module: str, name: str, package: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ImportError(
            f"converting to {module}.{name} needs the optional package {package!r}: "
            f"pip install --no-deps {package} (its pins conflict with xferlens's, see the comment on "
            "the interop extra in pyproject.toml), or pass cls= a class with the same fields"
        ) from e
    except Exception as e:  # installed but broken: repeng 0.4.0 uses np.float_, gone in NumPy 2
        raise ImportError(
            f"the optional package {package!r} is installed but does not import here "
            f"({type(e).__name__}: {e}); pass cls= a class with the same fields, or exchange the "
            "vector as a GGUF control vector (to_gguf / from_gguf), which repeng also reads and writes"
        ) from e


def _directions_by_layer(vector: SteeringVector, target: str) -> dict[int, torch.Tensor]:
    return {block_output_layer(h, target): v.detach().clone() for h, v in vector.directions.items()}


def to_steering_vectors(vector: SteeringVector, *, cls: type | None = None) -> object:
    """``vector`` as a ``steering_vectors.SteeringVector`` (``layer_type="decoder_block"``)."""
    cls = cls or _load_class("steering_vectors", "SteeringVector", "steering-vectors")
    return cls(layer_activations=_directions_by_layer(vector, "steering-vectors"), layer_type="decoder_block")


def from_steering_vectors(sv: object, model: HookedTransformer) -> SteeringVector:
    """A ``steering_vectors.SteeringVector`` (made in ``model``) as an xferlens vector."""
    layer_type = getattr(sv, "layer_type", "decoder_block")
    if layer_type != "decoder_block":
        raise InteropError(
            f"steering-vectors layer_type {layer_type!r} is not a residual-stream point; only "
            "'decoder_block' (a block's output, TransformerLens blocks.{l}.hook_resid_post) converts: "
            "train it with layer_type='decoder_block'"
        )
    directions = {}
    for layer, act in sv.layer_activations.items():
        what = f"steering-vectors layer {layer}"
        act = torch.as_tensor(act).detach()
        if act.ndim != 1:
            act = act.reshape(-1)
        check_width(act.shape[0], model, what)
        directions[resid_post(check_layer(int(layer), model, what))] = act.to("cpu", torch.float32).clone()
    recipe = {"method": "steering-vectors import", "layer_type": layer_type}
    return SteeringVector(directions, model_identity(model), recipe).to(model.cfg.device)


def _model_type(vector: SteeringVector, model: HookedTransformer | None) -> str:
    arch = architecture(vector, model)
    if arch not in HF_MODEL_TYPE:
        known = ", ".join(f"{k} -> {v}" for k, v in HF_MODEL_TYPE.items())
        raise InteropError(
            f"no Hugging Face model_type known for architecture {arch!r} of "
            f"{vector.model.get('name')} (known: {known}); pass model_type='...' (its config.model_type)"
        )
    return HF_MODEL_TYPE[arch]


def to_repeng(
    vector: SteeringVector,
    model: HookedTransformer | None = None,
    *,
    model_type: str | None = None,
    cls: type | None = None,
) -> object:
    """``vector`` as a ``repeng.ControlVector``: ``directions[l]`` is the direction at
    ``blocks.{l}.hook_resid_post`` (float32 numpy), ``model_type`` the model's HF ``model_type``
    (from ``model``, the vector's recorded architecture, or ``model_type=``)."""
    if model is not None:
        vector.check_model(model)
    model_type = model_type or _model_type(vector, model)
    cls = cls or _load_class("repeng", "ControlVector", "repeng")
    directions = {
        layer: v.to("cpu", torch.float32).numpy()
        for layer, v in _directions_by_layer(vector, "repeng").items()
    }
    return cls(model_type=model_type, directions=directions)


def from_repeng(cv: object, model: HookedTransformer, *, force: bool = False) -> SteeringVector:
    """A ``repeng.ControlVector`` (made in ``model``) as an xferlens vector; refuses one whose
    ``model_type`` names another architecture (``force=True``: warn instead)."""
    model_type = getattr(cv, "model_type", None)
    expected = HF_MODEL_TYPE.get(model_architecture(model) or "")
    if model_type and expected and model_type != expected:
        msg = (
            f"this repeng ControlVector was made for a {model_type!r} model, but {model.cfg.model_name} "
            f"is {expected!r} ({model_architecture(model)})"
        )
        if not force:
            raise InteropError(msg + "; pass force=True if you are sure it fits")
        warnings.warn("LOADING A CONTROL VECTOR MADE FOR ANOTHER ARCHITECTURE: " + msg, stacklevel=2)
    directions = {}
    for layer, arr in cv.directions.items():
        what = f"repeng direction {layer}"
        arr = np.asarray(arr, dtype=np.float32).reshape(-1)
        check_width(arr.shape[0], model, what)
        directions[resid_post(check_layer(int(layer), model, what))] = torch.tensor(arr)
    recipe = {"method": "repeng import", "model_type": model_type}
    return SteeringVector(directions, model_identity(model), recipe).to(model.cfg.device)
