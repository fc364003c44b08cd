"""Evaluation: overlap and surface metrics, calibration error, uncertainty against error, method comparison.

Array-level functions (spacing in array axis order, distances in its unit):
    overlap_metrics(pred, gt) -> dice, jaccard, precision, recall, specificity, rvd
    surface_metrics(pred, gt, spacing) -> hd, hd95, assd, mad, msd
    ReliabilityHistogram / CalibrationSet -> streaming ECE, adaptive ECE, MCE, Brier
    ErrorAuroc, threshold_counts, scaled_uncertainty -> uncertainty against voxel errors (paper 000)
    score_correlations(scores, metrics) -> Spearman of per-image scores with Dice (paper 004)
    surface_dice / normalized_surface_dice(pred, gt, spacing, tol) -> surface-distance's surfel Surface Dice
    kits23_case_metrics(pred, gt, spacing) -> KiTS23 region Dice and Surface Dice
    aurc, e_aurc, augrc, aggregate_uncertainty -> failure detection (ValUES, fd-shifts)
    weighted_failure_metrics, risk_at_coverage -> the same over bootstrap resamples, fd-shifts' risk@80cov
    Bootstrap, group_cases, mean_estimate, paired, holm -> patient-level intervals and paired tests
    ncc, roi_auroc, rater_disagreement -> uncertainty against rater variability
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
    "surface_dice": "surface_dice",
    "normalized_surface_dice": "surface_dice",
    "kits23_case_metrics": "kits23_metrics",
    "kits23_summary": "kits23_metrics",
    "aurc": "failure_detection",
    "e_aurc": "failure_detection",
    "augrc": "failure_detection",
    "aggregate_uncertainty": "failure_detection",
    "failure_detection_table": "failure_detection",
    "weighted_failure_metrics": "failure_detection",
    "risk_at_coverage": "failure_detection",
    "Bootstrap": "intervals",
    "group_cases": "intervals",
    "mean_estimate": "intervals",
    "paired": "intervals",
    "holm": "intervals",
    "risk_coverage_figure": "failure_detection",
    "ncc": "rater_agreement",
    "roi_auroc": "rater_agreement",
    "rater_disagreement": "rater_agreement",
    "EvaluationSettings": "evaluate",
    "evaluate_folder": "evaluate",
    "compare_runs": "compare",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
