"""Judging maps and interventions: mapper report cards, layer-pair search, text scores."""

from xferlens.evaluation.layers import LayerScores, layer_pair_scores, rank_agreement
from xferlens.evaluation.patching import MapperReport, evaluate_mapper, evaluate_mappers
from xferlens.evaluation.text import rouge_l

__all__ = [
    "LayerScores",
    "MapperReport",
    "evaluate_mapper",
    "evaluate_mappers",
    "layer_pair_scores",
    "rank_agreement",
    "rouge_l",
]
