"""Per-image uncertainty scores of one case and foreground class: the columns of `scores.csv`.

One function so the predictor writes whatever columns the scores are, and each column's definition sits next
to its paper (see measures.py for the equations).
"""
from __future__ import annotations

import numpy as np

from nnunet_kaz.uncertainty.measures import (
    binary_entropy,
    coefficient_of_variation,
    labelled_uncertainty,
    relunet_scores,
    slabs,
)
from nnunet_kaz.uncertainty.streaming import AccumulatedStats

SCORE_COLUMNS = ["case", "label", "mean_entropy", "relunet_score", "relunet_score_eq9", "relunet_score_cross", "cv",
                 "pairwise_dice", "pairwise_dice_pooled", "labelled_uncertainty", "n_members", "n_samples"]


def class_scores(stats: AccumulatedStats, channel: int, p_class: np.ndarray, u_sample: np.ndarray,
                 voxel_volume_ratio: float = 1.0) -> dict:
    """Scores of one class from the uncalibrated samples (paper 000 section 2.3, paper 002, paper 004).

    `p_class`: the mean probability of the class in the input geometry; `u_sample`: paper 004's
    U(x) = -(1/N) sum_i p_i ln p_i of the class in the input geometry; `voxel_volume_ratio`: input voxels per
    voxel of the space the samples were added in (CV is in input voxels).
    - mean_entropy: mean binary entropy (bits) of the class probability;
    - relunet_score: paper 002 eq. 5-9 as the authors' code computes it, (100 / 255) x total entropy / ring
      pixels of a 3x3-square dilation per slice (the scale of paper 002's Fig. 7 threshold);
      relunet_score_eq9: the plain eq. 9 ratio with the same ring; relunet_score_cross: the plain ratio with a
      face-connected cross over all axes (`measures.relunet_score`);
    - cv: paper 004's Var(V_i) / (E[V_i] + 1);
    - pairwise_dice: paper 004's exact mean over sample pairs of their Dice; pairwise_dice_pooled: one pooled
      ratio over all pairs (biased upward when sample volumes differ); both NaN when the class's masks were not
      tracked (`predict --no-pairwise-dice`, `UncertaintyPredictor(pairwise_dice=False)`) or for one sample;
    - labelled_uncertainty: paper 004's mean U over voxels with mean p >= 0.5.
    """
    # the binary entropy summed slab by slab (float64): its map is never held whole (issue 23.7)
    h_total = sum(float(binary_entropy(p_class[sl]).sum(dtype=np.float64)) for sl in slabs(p_class.shape))
    return {"mean_entropy": h_total / p_class.size,
            **relunet_scores(p_class, entropy_total=h_total),
            "cv": coefficient_of_variation(stats.volumes[:, channel] * voxel_volume_ratio),
            "pairwise_dice": stats.pairwise_dice(channel),
            "pairwise_dice_pooled": stats.pooled_pairwise_dice(channel),
            "labelled_uncertainty": labelled_uncertainty(p_class, u_sample)}
