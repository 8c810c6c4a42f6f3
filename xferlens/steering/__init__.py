"""Steering vectors: build them, apply them (hooks that clean up), carry them through a mapper.

``diff_of_means`` / ``prompt_pair`` / ``pca_of_differences`` -> :class:`SteeringVector`
-> ``steer(model, vector, alpha)`` (a context manager) or ``steering_hooks`` (plain
TransformerLens hook lists) -> ``transfer(vector, mapper)`` into another model ->
``generate`` (batched, KV-cached, steered) for evaluation.
"""

from xferlens.steering.apply import every_resid_point, steer, steering_hooks
from xferlens.steering.build import diff_of_means, pca_of_differences, prompt_pair, text_means
from xferlens.steering.generate import generate, stop_token_ids
from xferlens.steering.switch import SafetySwitch, SwitchHandle, latency_per_token, load_switch
from xferlens.steering.transfer import transfer
from xferlens.steering.vector import (
    SteeringFileError,
    SteeringMismatchError,
    SteeringVector,
    load_steering_vector,
)

__all__ = [
    "SafetySwitch",
    "SteeringFileError",
    "SteeringMismatchError",
    "SteeringVector",
    "diff_of_means",
    "every_resid_point",
    "generate",
    "load_steering_vector",
    "pca_of_differences",
    "prompt_pair",
    "latency_per_token",
    "load_switch",
    "steer",
    "steering_hooks",
    "stop_token_ids",
    "SwitchHandle",
    "text_means",
    "transfer",
]
