"""xferlens: transfer activation-space interventions between language models.

The flow, each step a plain function on values a notebook can hold, save and load::

    import xferlens as xl
    src, tgt = xl.load_model("qwen2.5-coder-0.5b-instruct"), xl.load_model("qwen2.5-coder-1.5b-instruct")
    pairs = xl.paired_activations(src, tgt, texts, 10, 12)          # activations -> pairs
    mapper, _ = xl.fit_mapper(pairs, "affine")                        # -> mapper
    v = xl.diff_of_means(src, harmful, harmless, hooks=10)            # vector in the source
    v_tgt = xl.transfer(v, mapper)                                    # -> vector in the target
    dr = xl.dose_response(tgt, prompts, {"transferred": v_tgt}, alphas=[0.5, 1, 2])

The names below are loaded on first use (``import xferlens`` stays light); the subpackages
(``xferlens.activations``, ``.mappers``, ``.steering``, ``.evaluation``, ``.features``,
``.organisms``, ``.experiment``, ``.interop``) hold the rest.
"""

import importlib

from xferlens.chat import chat_prompts, generate_text
from xferlens.models import Processing, load_model
from xferlens.zoo import ZOO, pull

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "XferlensError": "xferlens.errors",
    "ModelMismatchError": "xferlens.errors",
    "ModelId": "xferlens.identity",
    "cache_activations": "xferlens.activations",
    "cache_to_disk": "xferlens.activations",
    "paired_activations": "xferlens.activations",
    "pairs_to_disk": "xferlens.activations",
    "positions": "xferlens.activations",
    "resid_post": "xferlens.activations",
    "MAPPERS": "xferlens.mappers",
    "fit_mapper": "xferlens.mappers",
    "load_mapper": "xferlens.mappers",
    "SteeringVector": "xferlens.steering",
    "diff_of_means": "xferlens.steering",
    "prompt_pair": "xferlens.steering",
    "steer": "xferlens.steering",
    "transfer": "xferlens.steering",
    "generate": "xferlens.steering",
    "load_steering_vector": "xferlens.steering",
    "SafetySwitch": "xferlens.steering",
    "load_switch": "xferlens.steering",
    "evaluate_mappers": "xferlens.evaluation",
    "evaluate_steering": "xferlens.evaluation",
    "layer_pair_scores": "xferlens.evaluation",
    "score_conditions": "xferlens.evaluation",
    "steering_scores": "xferlens.evaluation",
    "dose_response": "xferlens.evaluation",
    "transfer_diagnostics": "xferlens.evaluation",
    "random_like": "xferlens.evaluation",
    "perplexity": "xferlens.evaluation",
    "select_by_behaviour": "xferlens.evaluation",
    "steerability_sweep": "xferlens.evaluation",
    "side_by_side": "xferlens.viz",
    "next_token_shift": "xferlens.viz",
    "run_experiment": "xferlens.experiment",
    "load_spec": "xferlens.experiment",
    "demo_spec": "xferlens.experiment",
}

__all__ = ["ZOO", "Processing", "chat_prompts", "generate_text", "load_model", "pull", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xferlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
