"""Uncertainty maps (entropy, mutual information, variance), per-image scores and streaming accumulators."""
from nnunet_kaz.uncertainty.measures import (
    binary_entropy,
    class_entropy_bits,
    coefficient_of_variation,
    labelled_uncertainty,
    mean_pairwise_dice,
    normalized_entropy,
    pooled_pairwise_dice,
    relunet_contour,
    relunet_mask,
    relunet_score,
    relunet_scores,
)
from nnunet_kaz.uncertainty.scores import SCORE_COLUMNS, class_scores
from nnunet_kaz.uncertainty.streaming import AccumulatedStats, PairwiseIntersections, StreamingStats

__all__ = ["binary_entropy", "class_entropy_bits", "coefficient_of_variation", "labelled_uncertainty",
           "mean_pairwise_dice", "normalized_entropy", "pooled_pairwise_dice", "relunet_contour", "relunet_mask",
           "relunet_score", "relunet_scores",
           "SCORE_COLUMNS", "class_scores", "AccumulatedStats", "PairwiseIntersections", "StreamingStats"]
