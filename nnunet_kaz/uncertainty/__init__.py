"""Uncertainty maps (entropy, mutual information, variance), per-image scores and streaming accumulators."""
from nnunet_kaz.uncertainty.measures import (
    binary_entropy,
    class_entropy_bits,
    coefficient_of_variation,
    labelled_uncertainty,
    normalized_entropy,
    pooled_pairwise_dice,
    relunet_score,
)
from nnunet_kaz.uncertainty.streaming import AccumulatedStats, StreamingStats

__all__ = ["binary_entropy", "class_entropy_bits", "coefficient_of_variation", "labelled_uncertainty",
           "normalized_entropy", "pooled_pairwise_dice", "relunet_score", "AccumulatedStats", "StreamingStats"]
