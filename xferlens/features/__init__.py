"""SAE features across models: train SAEs with sae-lens, carry features through a mapper."""

from xferlens.features.match import FeatureRates, FeatureTransfer, feature_transfer, map_directions
from xferlens.features.sae import (
    SAEMismatchError,
    TrainedSAE,
    load_pretrained_sae,
    load_sae,
    train_sae,
)
from xferlens.features.vector import feature_vector

__all__ = [
    "FeatureRates",
    "FeatureTransfer",
    "SAEMismatchError",
    "TrainedSAE",
    "feature_transfer",
    "feature_vector",
    "load_pretrained_sae",
    "load_sae",
    "map_directions",
    "train_sae",
]
