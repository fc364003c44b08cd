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
from nnunet_kaz.lazy import lazy_exports

_EXPORTS = {
    "overlap_metrics": "overlap",
    "surface_metrics": "surface",
    "surface_distances": "surface",
    "mask_surface": "surface",
    "ReliabilityHistogram": "calibration",
    "CalibrationSet": "calibration",
    "roi_mask": "calibration",
    "reliability_diagram": "reliability",
    "ErrorAuroc": "uncertainty_validation",
    "scaled_uncertainty": "uncertainty_validation",
    "threshold_counts": "uncertainty_validation",
    "uncertainty_figure": "uncertainty_validation",
    "score_correlations": "score_correlation",
    "score_scatter": "score_correlation",
    "EvaluationSettings": "evaluate",
    "evaluate_folder": "evaluate",
    "compare_runs": "compare",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
