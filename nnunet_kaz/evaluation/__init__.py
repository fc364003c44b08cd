"""Evaluation: overlap and surface metrics, calibration error, uncertainty against error, method comparison.

Array-level functions (spacing in array axis order, distances in its unit):
    overlap_metrics(pred, gt) -> dice, jaccard, precision, recall, specificity, rvd
    surface_metrics(pred, gt, spacing) -> hd, hd95, assd, mad, msd
    ReliabilityHistogram / CalibrationSet -> streaming ECE, adaptive ECE, MCE, Brier
    ErrorAuroc, threshold_counts, scaled_uncertainty -> uncertainty against voxel errors (paper 000)
    score_correlations(scores, metrics) -> Spearman of per-image scores with Dice (paper 004)
Folder level: evaluate_folder (`nnunet-kaz evaluate`) and compare_runs (`nnunet-kaz compare`).
Definitions, units and empty-mask conventions are in each module's docstring.
"""
from nnunet_kaz.evaluation.calibration import CalibrationSet, ReliabilityHistogram, roi_mask
from nnunet_kaz.evaluation.compare import compare_runs
from nnunet_kaz.evaluation.evaluate import EvaluationSettings, evaluate_folder
from nnunet_kaz.evaluation.overlap import overlap_metrics
from nnunet_kaz.evaluation.reliability import reliability_diagram
from nnunet_kaz.evaluation.score_correlation import score_correlations, score_scatter
from nnunet_kaz.evaluation.surface import mask_surface, surface_distances, surface_metrics
from nnunet_kaz.evaluation.uncertainty_validation import (
    ErrorAuroc,
    scaled_uncertainty,
    threshold_counts,
    uncertainty_figure,
)

__all__ = [
    "overlap_metrics", "surface_metrics", "surface_distances", "mask_surface",
    "ReliabilityHistogram", "CalibrationSet", "roi_mask", "reliability_diagram",
    "ErrorAuroc", "scaled_uncertainty", "threshold_counts", "uncertainty_figure",
    "score_correlations", "score_scatter",
    "EvaluationSettings", "evaluate_folder", "compare_runs",
]
