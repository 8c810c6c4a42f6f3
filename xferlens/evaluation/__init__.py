"""Judging maps and interventions: mapper report cards, layer-pair search, steering
evaluation with controls, judges, text scores."""

from xferlens.evaluation.judges import REFUSAL_PATTERNS, is_refusal, substring
from xferlens.evaluation.layers import LayerScores, layer_pair_scores, rank_agreement
from xferlens.evaluation.patching import MapperReport, evaluate_mapper, evaluate_mappers
from xferlens.evaluation.steering import (
    LayerSweep,
    SteeringReport,
    evaluate_steering,
    perplexity,
    random_like,
    select_by_behaviour,
    steerability_sweep,
    wilson,
)
from xferlens.evaluation.text import rouge_l

__all__ = [
    "REFUSAL_PATTERNS",
    "LayerScores",
    "LayerSweep",
    "MapperReport",
    "SteeringReport",
    "evaluate_mapper",
    "evaluate_mappers",
    "evaluate_steering",
    "is_refusal",
    "layer_pair_scores",
    "perplexity",
    "random_like",
    "rank_agreement",
    "rouge_l",
    "select_by_behaviour",
    "steerability_sweep",
    "substring",
    "wilson",
]
