"""Judging maps and interventions: mapper report cards, layer-pair search, steering
evaluation with controls, the continuous steering score and its dose-response, judges,
text scores."""

from xferlens.evaluation.diagnostics import (
    TransferDiagnostics,
    probe_agreement,
    round_trip,
    subspace_fidelity,
    transfer_diagnostics,
)
from xferlens.evaluation.dose import DoseDifference, DoseEstimate, DoseResponse, equivalent_dose
from xferlens.evaluation.judges import REFUSAL_PATTERNS, is_refusal, substring
from xferlens.evaluation.layers import LayerScores, RankAgreement, layer_pair_scores, rank_agreement
from xferlens.evaluation.patching import MapperReport, evaluate_mapper, evaluate_mappers
from xferlens.evaluation.score import (
    REFUSAL_OPENINGS,
    Openings,
    dose_response,
    resolve_openings,
    score_conditions,
    steering_scores,
)
from xferlens.evaluation.steering import (
    LayerSweep,
    SteeringReport,
    evaluate_steering,
    layer_spread,
    perplexity,
    random_like,
    select_by_behaviour,
    shaped_random_like,
    steerability_sweep,
    wilson,
)
from xferlens.evaluation.text import rouge_l

__all__ = [
    "REFUSAL_OPENINGS",
    "REFUSAL_PATTERNS",
    "DoseDifference",
    "DoseEstimate",
    "DoseResponse",
    "Openings",
    "LayerScores",
    "LayerSweep",
    "MapperReport",
    "RankAgreement",
    "SteeringReport",
    "TransferDiagnostics",
    "dose_response",
    "equivalent_dose",
    "evaluate_mapper",
    "evaluate_mappers",
    "evaluate_steering",
    "is_refusal",
    "layer_pair_scores",
    "perplexity",
    "probe_agreement",
    "layer_spread",
    "random_like",
    "shaped_random_like",
    "resolve_openings",
    "rank_agreement",
    "rouge_l",
    "round_trip",
    "score_conditions",
    "select_by_behaviour",
    "steerability_sweep",
    "steering_scores",
    "subspace_fidelity",
    "substring",
    "transfer_diagnostics",
    "wilson",
]
