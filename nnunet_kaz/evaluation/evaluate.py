"""Evaluate a prediction folder against ground truth: `nnunet-kaz evaluate` (issue 6 items 1-4).

`prepare` checks every input (cases, headers, labels, tables) without reading pixels; `run` streams over the
cases one at a time (a 3D dataset is never in memory at once; calibration and AUROC keep histograms only);
`write` puts every output into the output folder at once, so an interrupted or failed run leaves nothing.

Outputs (definitions in the docstrings of the modules named):
- metrics.csv: case, label, dice, jaccard, precision, recall, specificity, rvd (overlap.py), hd, hd95, assd,
  mad, msd (surface.py, physical units from the image spacing);
- summary.csv: per label and over all rows (`all`): mean, std (ddof 1), median, n (finite values used) and
  n_nan (undefined values left out, e.g. distances with exactly one empty mask) of every metric column;
- with probabilities: calibration.csv (calibration.py) and reliability_{scope}_{class}.png;
- with uncertainty maps (the predictor's uncalibrated `{case}_uncertainty.npz`, used whenever it sits next to
  the predictions or in the uncertainty folder; the entropy of the given probabilities only with probs_entropy):
  uncertainty_thresholds.csv (per case, label and T), uncertainty_thresholds_summary.csv (pooled over cases),
  uncertainty_auroc.csv and, with --figure-cases, figures/uncertainty_{case}_label{l}.png
  (uncertainty_validation.py);
- with --scores: score_correlations.csv and score_scatter.png (score_correlation.py); the scores of a
  region-based KiTS23 prediction (rows named by dataset.json's regions kidney, masses, tumor) are matched with
  kits23.csv's region Dice (kidney_and_mass, mass, tumor), those of a label-based one with metrics.csv's Dice;
- issue 16 (field_report.py): with nsd_tolerance the column nsd of metrics.csv; for KiTS23 datasets (or
  kits23=True) kits23.csv and kits23_summary.csv; with scores or uncertainty failure_detection.csv and
  risk_coverage_label{L}.png (risk_coverage_{region}.png for region scores); with a raters folder rater_agreement.csv; their summaries in evaluation.json;
- evaluation.json: the settings, the cases, the NaN counts, the patient grouping and the bootstrap settings.

Intervals (issue 25; `intervals.py`): every mean of summary.csv (rows `ci_low`, `ci_high`), every row of
calibration.csv and failure_detection.csv (columns M_ci_low, M_ci_high) gets a 95 % percentile bootstrap
interval over PATIENTS (KAZ slices grouped by patient as the splits group them, 3D cases each their own
patient; `bootstrap` resamples, seeded by `bootstrap_seed`; `bootstrap = 0` turns them off).
With `calibration` (a calibrator file of `nnunet-kaz calibrate`) the probabilities are calibrated on the fly and
the segmentation is their argmax (nnU-Net's rule for softmax outputs): one prediction folder evaluated under a
calibrator without predicting again (`compare`'s `calibrations:`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from nnunet_kaz.errors import KazError
from nnunet_kaz.evaluation.calibration import CalibrationSet, roi_mask
from nnunet_kaz.cases import (
    SEGMENTATION_ENDINGS,
    CasePair,
    check_declared_labels,
    dataset_labels,
    find_dataset_json,
    labels_present,
    load_probabilities,
    load_uncertainty,
    match_cases,
    read_array,
    read_dataset_json,
    read_header,
    read_segmentation,
)
from nnunet_kaz.evaluation.field_report import FieldMetrics, check_rater_folder, parse_nsd_tolerances
from nnunet_kaz.evaluation.intervals import N_RESAMPLES, Bootstrap, CaseGroups, group_cases, mean_estimate
from nnunet_kaz.evaluation.kits23_metrics import dataset_regions, is_kits23_labels
from nnunet_kaz.evaluation.overlap import OVERLAP_METRICS, metrics_from_counts, ConfusionCounts
from nnunet_kaz.evaluation.score_correlation import read_scores, score_correlations, score_scatter
from nnunet_kaz.evaluation.surface import SURFACE_METRICS, surface_metrics
from nnunet_kaz.evaluation.uncertainty_validation import (
    SCALINGS,
    THRESHOLDS,
    ErrorAuroc,
    figure_slice,
    scaled_uncertainty,
    threshold_counts,
    uncertainty_figure,
)
from nnunet_kaz.io_utils import atomic_dir
from nnunet_kaz.uncertainty import normalized_entropy

METRIC_COLUMNS = OVERLAP_METRICS + SURFACE_METRICS
MARKER = "evaluation.json"
PROBS_ENTROPY = "probs_entropy: normalized entropy of the given probabilities (CASE.npz)"


@dataclass
class EvaluationSettings:
    labels: list[int] | None = None          # None: the dataset.json labels, else every label found
    n_bins: int = 15
    roi_margin: float = 5.0                  # physical units of the spacing (mm; pixels for PNG/BMP)
    thresholds: tuple[float, ...] = THRESHOLDS
    entropy_scaling: str = "slice"           # 100 U / max U per 2D slice (the authors'); "case", "absolute"
    figure_cases: int = 3
    pred_subset: bool = False
    uncertainty_pattern: str = "{case}_uncertainty.npz"
    uncertainty_key: str = "entropy"
    probs_entropy: bool = False              # uncertainty = normalized entropy of the given probabilities
    allow_undeclared_labels: bool = False    # ground-truth labels dataset.json lacks: warn instead of error
    kits23: bool | None = None               # KiTS23 regions: None = when dataset.json has KiTS23's labels
    nsd_tolerance: list[str] | None = None   # NSD tolerances in mm: "T" and/or "LABEL:T" (parse_nsd_tolerances)
    bootstrap: int = N_RESAMPLES             # patient-level bootstrap resamples of the intervals (0: none)
    bootstrap_seed: int = 0
    patient_pattern: str | None = None       # regex with (?P<patient>...) on case names (default: intervals.py)

    @property
    def resampling(self) -> Bootstrap:
        return Bootstrap(int(self.bootstrap), int(self.bootstrap_seed))

    def check(self) -> None:
        if self.n_bins < 1:
            raise KazError(f"the number of bins (n_bins) must be >= 1, got {self.n_bins}", option="n_bins")
        if not self.roi_margin >= 0:
            raise KazError(f"the ROI margin (roi_margin) must be >= 0, got {self.roi_margin}", option="roi_margin")
        if self.entropy_scaling not in SCALINGS:
            raise KazError(f"entropy scaling (entropy_scaling) must be one of {SCALINGS}, got "
                           f"{self.entropy_scaling!r}", option="entropy_scaling")
        if self.labels is not None:
            labels = [self.labels] if isinstance(self.labels, int) else self.labels
            if not isinstance(labels, (list, tuple)) or not all(isinstance(v, (int, np.integer)) for v in labels):
                raise KazError(f"labels must be a list of integers, got {self.labels!r}")
            self.labels = [int(v) for v in labels]
        if self.labels is not None and any(v <= 0 for v in self.labels):
            raise KazError(f"labels must be foreground label values (> 0), got {self.labels}", option="labels")
        if "{case}" not in self.uncertainty_pattern:
            raise KazError(f"the uncertainty pattern must contain {{case}}, got {self.uncertainty_pattern!r}")
        parse_nsd_tolerances(self.nsd_tolerance)
        if not isinstance(self.bootstrap, (int, np.integer)) or self.bootstrap < 0:
            raise KazError(f"the number of bootstrap resamples (bootstrap) must be an integer >= 0, got "
                           f"{self.bootstrap!r}", option="bootstrap")


@dataclass
class EvaluationPlan:
    pairs: list[CasePair]
    settings: EvaluationSettings
    labels: list[int] | None                 # fixed before the run when known
    declared: list[int] | None = None        # the foreground labels dataset.json declares, when found
    label_names: dict[str, int] = field(default_factory=dict)
    scores: pd.DataFrame | None = None
    score_regions: bool = False              # scores labelled by KiTS23 region (region-based predictions)
    sources: dict[str, str] = field(default_factory=dict)
    kits23: bool = False
    raters: dict[str, Path] | None = None
    conformal: "ConformalCheck | None" = None
    groups: CaseGroups | None = None         # the patient of every case (intervals)
    calibrator: "object | None" = None       # postprocessing.Calibrator applied to the probabilities on the fly

    @property
    def bootstrap(self) -> Bootstrap:
        return self.settings.resampling


@dataclass
class EvaluationResult:
    plan: EvaluationPlan
    labels: list[int]
    metrics: pd.DataFrame
    summary: pd.DataFrame
    calibration: CalibrationSet | None = None
    thresholds: pd.DataFrame | None = None
    threshold_summary: pd.DataFrame | None = None
    auroc: dict[str, ErrorAuroc] = field(default_factory=dict)
    correlations: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    score_metrics: pd.DataFrame | None = None  # the Dice the scores are matched with (case, label, dice)
    figures: list[dict] = field(default_factory=list)
    uncertainty_source: str | None = None
    field: FieldMetrics | None = None
    conformal: "ConformalCheck | None" = None
    _calibration_table: pd.DataFrame | None = None

    def auroc_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"scope": s, "auroc": a.auroc(), "n_voxels": a.n_voxels, "n_error_voxels": a.n_errors,
                              "uncertainty": self.uncertainty_source} for s, a in self.auroc.items()],
                            columns=["scope", "auroc", "n_voxels", "n_error_voxels", "uncertainty"])

    def nan_counts(self) -> dict[str, int]:
        cols = [c for c in self.metrics.columns if c not in ("case", "label")]
        return {c: int(self.metrics[c].isna().sum()) for c in cols if self.metrics[c].isna().any()}

    @property
    def intervals(self) -> bool:
        return self.plan.groups is not None and self.plan.bootstrap.active

    def calibration_table(self) -> pd.DataFrame:
        """calibration.csv, with intervals when they are on (computed once)."""
        if self._calibration_table is None:
            patients = self.plan.groups.patients if self.intervals else None
            self._calibration_table = self.calibration.table(patients, self.plan.bootstrap if self.intervals else None)
        return self._calibration_table


def prepare(pred_dir: Path, gt_dir: Path, probs_dir: Path | None = None, settings: EvaluationSettings | None = None,
            images_dir: Path | None = None, uncertainty_dir: Path | None = None,
            scores_csv: Path | None = None, raters_dir: Path | None = None,
            conformal_dir: Path | None = None, calibration: Path | None = None) -> EvaluationPlan:
    """Check every input before anything is computed or written; KazError lists what is wrong."""
    settings = settings or EvaluationSettings()
    settings.check()
    for what, d in (("probability", probs_dir), ("image", images_dir), ("uncertainty", uncertainty_dir)):
        if d is not None and not Path(d).is_dir():
            raise KazError(f"{what} folder {d} does not exist")
    uncertainty_dir, found_next_to_pred = _uncertainty_source(Path(pred_dir), probs_dir, uncertainty_dir, settings)
    pairs = match_cases(Path(pred_dir), Path(gt_dir), probs_dir, uncertainty_dir, settings.uncertainty_pattern,
                        images_dir, settings.pred_subset)
    dj_path = find_dataset_json(Path(pred_dir), Path(gt_dir), levels=1)
    dj = read_dataset_json(dj_path) if dj_path is not None else None
    label_names: dict[str, int] = {}
    labels = None if settings.labels is None else sorted(set(settings.labels))
    known = None
    kits = dj is not None and is_kits23_labels(dj.get("labels", {}))
    if settings.kits23 and not kits:
        raise KazError(f"a KiTS23 evaluation needs a dataset with KiTS23's labels (kidney 1, tumor 2, cyst 3, or "
                       f"their regions); {dj_path or f'no dataset.json next to {pred_dir} or {gt_dir}'} "
                       f"{'has labels ' + json.dumps(dj.get('labels')) if dj is not None else ''}".rstrip(),
                       option="kits23")
    if kits and any(isinstance(v, (list, tuple)) for v in dj["labels"].values()):
        # region-based KiTS23 (nnU-Net's Dataset220): predictions and labels are label maps 0-3
        known, label_names = [1, 2, 3], {"kidney": 1, "tumor": 2, "cyst": 3}
    elif dj is not None:
        known = dataset_labels(dj, str(dj_path))
        label_names = {k: int(v) for k, v in dj.get("labels", {}).items() if isinstance(v, int)}
    if known is not None:
        if labels is None:
            labels = known
        else:
            unknown = [v for v in labels if v not in known]
            if unknown:
                raise KazError(f"label(s) {unknown} are not in the dataset's labels {known} (dataset.json)")
    plan = EvaluationPlan(pairs, settings, labels, declared=known, label_names=label_names,
                          kits23=kits if settings.kits23 is None else bool(settings.kits23))
    plan.groups = group_cases([p.case for p in pairs], Path(gt_dir), len(pairs[0].header.shape) == 3,
                              settings.patient_pattern)
    if calibration is not None:
        plan.calibrator = _check_calibration(Path(calibration), pairs, probs_dir, dj)
    if raters_dir is not None:
        if uncertainty_dir is None and not settings.probs_entropy:
            raise KazError("rater agreement compares an uncertainty map with the raters: give uncertainty maps "
                           "(CASE_uncertainty.npz next to the predictions or in an uncertainty folder), or "
                           "probabilities and their entropy (probs_entropy)", option="raters")
        plan.raters = check_rater_folder(Path(raters_dir), {p.case: p.header.shape for p in pairs},
                                         SEGMENTATION_ENDINGS, lambda f: read_header(f).squeezed.shape)
    if conformal_dir is not None:
        from nnunet_kaz.evaluation.conformal_check import ConformalCheck

        ending = dj.get("file_ending", "") if dj is not None else ""
        if not ending:
            raise KazError(f"no dataset.json next to {pred_dir} or {gt_dir}: the conformal masks' file ending is "
                           "unknown (conformal)", option="conformal")
        plan.conformal = ConformalCheck.from_folder(Path(conformal_dir), {p.case: p.header.shape for p in pairs},
                                                    ending)
    if scores_csv is not None:
        regions = dataset_regions(dj.get("labels", {})) if kits else {}
        if regions:
            if not plan.kits23:
                raise KazError(f"{scores_csv}: the scores of a region-based prediction are compared with KiTS23's "
                               "region Dice; leave the KiTS23 evaluation on (kits23)", option="kits23")
            plan.scores, plan.score_regions = _scores_with_regions(read_scores(Path(scores_csv)), regions,
                                                                   Path(scores_csv)), True
        else:
            plan.scores = _scores_with_label_values(read_scores(Path(scores_csv)), label_names, Path(scores_csv))
        unknown = sorted(set(plan.scores["case"]) - {p.case for p in pairs})
        if unknown:
            raise KazError(f"{scores_csv}: case(s) not evaluated: {unknown[:20]}")
    plan.sources = {"pred": str(pred_dir), "gt": str(gt_dir), "probs": str(probs_dir) if probs_dir else "",
                    "images": str(images_dir) if images_dir else "",
                    "uncertainty": (f"{uncertainty_dir} (next to the predictions)" if found_next_to_pred
                                    else str(uncertainty_dir) if uncertainty_dir else ""),
                    "scores": str(scores_csv) if scores_csv else "",
                    "raters": str(raters_dir) if raters_dir else "",
                    "conformal": str(conformal_dir) if conformal_dir else "",
                    "calibration": str(calibration) if calibration else ""}
    return plan


def _check_calibration(path: Path, pairs: list[CasePair], probs_dir: Path | None, dj: dict | None):
    """The calibrator file, for probabilities that are not calibrated already (else the calibration would be
    applied twice): refused without probabilities, or when the probability folder holds the calibration.json that
    `predict --calibration` writes."""
    from nnunet_kaz.postprocessing import load_calibrator

    if probs_dir is None or not all(p.probs for p in pairs):
        raise KazError(f"calibration {path}: needs the uncalibrated probabilities {{case}}.npz of every case "
                       "(probs)", option="calibration")
    if (Path(probs_dir) / "calibration.json").is_file():
        raise KazError(f"calibration {path}: the probabilities in {probs_dir} are calibrated already (it holds the "
                       "calibration.json of `predict --calibration`); compare calibrators on a folder predicted "
                       "without --calibration", option="calibration")
    if (Path(probs_dir) / "postprocessing.json").is_file():
        raise KazError(f"calibration {path}: {probs_dir} was predicted with --postprocessing; under a calibrator "
                       "the segmentation is the argmax of the calibrated probabilities, so compare calibrators on a "
                       "folder predicted without --postprocessing", option="calibration")
    if not path.is_file():
        raise KazError(f"calibration file {path} does not exist", option="calibration")
    labels = dj.get("labels") if dj is not None else None
    if labels is not None and any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise KazError(f"calibration {path}: calibrators apply to softmax outputs; this dataset has regions",
                       option="calibration")
    return load_calibrator(path, labels=labels)


def _uncertainty_source(pred_dir: Path, probs_dir: Path | None, uncertainty_dir: Path | None,
                        settings: EvaluationSettings) -> tuple[Path | None, bool]:
    """The folder of uncertainty maps to use, and whether it was found next to the predictions: the given one;
    else the prediction folder when it holds maps named by the uncertainty pattern (the predictor's
    `{case}_uncertainty.npz`, from the uncalibrated samples); none when the entropy of the probabilities is
    asked for (probs_entropy), which then needs the probabilities."""
    if settings.probs_entropy:
        if uncertainty_dir is not None:
            raise KazError("give uncertainty maps or ask for the entropy of the probabilities (probs_entropy), not "
                           "both", option="probs_entropy")
        if probs_dir is None:
            raise KazError("the entropy of the probabilities (probs_entropy) needs the probabilities (probs)",
                           option="probs_entropy")
        return None, False
    if uncertainty_dir is not None:
        return Path(uncertainty_dir), False
    if next(pred_dir.glob(settings.uncertainty_pattern.replace("{case}", "*")), None) is not None:
        return pred_dir, True
    return None, False


def _scores_with_label_values(scores: pd.DataFrame, label_names: dict[str, int], path: Path) -> pd.DataFrame:
    """The predictor names labels as dataset.json does ("kidney"); map names to values, keep numbers."""
    def value(v):
        if isinstance(v, (int, np.integer)) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if v in label_names:
            return label_names[v]
        raise KazError(f"{path}: label {v!r} is neither a number nor a label name of dataset.json "
                       f"({sorted(label_names) or 'no dataset.json found'})")
    return scores.assign(label=[value(v) for v in scores["label"]], case=scores["case"].astype(str))


def _scores_with_regions(scores: pd.DataFrame, regions: dict[str, str], path: Path) -> pd.DataFrame:
    """Region-based KiTS23 scores: dataset.json's region names ("masses") become KiTS23's ("mass")."""
    unknown = sorted({str(v) for v in scores["label"]} - set(regions) - set(regions.values()))
    if unknown:
        raise KazError(f"{path}: label(s) {unknown} are not regions of dataset.json ({sorted(regions)})")
    return scores.assign(label=[regions.get(str(v), str(v)) for v in scores["label"]],
                         case=scores["case"].astype(str))


def _empty_row() -> dict[str, float]:
    """Both masks empty (the label is in neither): overlap metrics 1, rvd 0, distances 0."""
    return {**metrics_from_counts(ConfusionCounts(0, 0, 0, 1)), **{k: 0.0 for k in SURFACE_METRICS}}


def _label_metrics(pred: np.ndarray, gt: np.ndarray, label: int, spacing: tuple[float, ...],
                   present: set[int]) -> dict[str, float]:
    """Overlap and surface metrics of one label of one case (the constant empty row when it is in neither)."""
    if label not in present:
        return _empty_row()
    p, g = pred == label, gt == label
    return {**metrics_from_counts(ConfusionCounts.of(p, g)), **surface_metrics(p, g, spacing)}


def _figure_panels(pair: CasePair, gt: np.ndarray, pred: np.ndarray, probs: np.ndarray, u100: np.ndarray,
                   labels: list[int]) -> list[dict]:
    """The 2D arrays of the uncertainty figure of each label (3D: the axis-0 slice with most foreground)."""
    z = figure_slice(gt, pred)

    def sl(a: np.ndarray) -> np.ndarray:
        return a if z is None else a[z]

    image = None
    if pair.image is not None:
        image = read_array(pair.image)[0].astype(np.float32)
        if image.ndim == gt.ndim + 1:  # RGB(A) natural image: grey
            image = image[..., :3].mean(-1)
        image = sl(image) if image.shape == gt.shape else None
    return [{"case": pair.case, "label": lab, "slice": z, "gt": sl(gt) == lab, "pred": sl(pred) == lab,
             "prob": sl(probs[lab]), "u100": sl(u100), "image": image} for lab in labels]


def run(plan: EvaluationPlan, progress: bool = True) -> EvaluationResult:
    """Compute every output of `plan`, one case at a time (nothing is written)."""
    from tqdm import tqdm

    s = plan.settings
    use_probs = any(p.probs for p in plan.pairs)
    use_unc = any(p.uncertainty for p in plan.pairs) or (s.probs_entropy and use_probs)
    calib = CalibrationSet(s.n_bins, plan.labels or []) if use_probs else None
    auroc = {"all": ErrorAuroc(), "roi": ErrorAuroc()} if use_unc else {}
    rows: list[dict] = []
    threshold_rows: list[dict] = []
    figures: list[dict] = []
    seen: set[int] = set()
    n_classes = None
    groups = plan.groups if plan.bootstrap.active else None
    if plan.conformal is not None:
        plan.conformal.groups, plan.conformal.bootstrap = groups, plan.bootstrap
    fm = FieldMetrics(plan.kits23, parse_nsd_tolerances(s.nsd_tolerance), plan.raters, s.roi_margin,
                      lambda f: read_array(f)[0], groups=groups, bootstrap=plan.bootstrap)
    for i, pair in enumerate(tqdm(plan.pairs, desc="evaluate", unit="case", disable=not progress)):
        gt, spacing = read_segmentation(pair.gt)
        calibrated = None
        if plan.calibrator is not None:  # the segmentation of the calibrated probabilities: their argmax
            from nnunet_kaz.postprocessing import apply_calibration

            calibrated = apply_calibration(load_probabilities(pair.probs, gt.shape), plan.calibrator,
                                           str(pair.probs))
            pred = calibrated.argmax(0).astype(np.uint8 if calibrated.shape[0] <= 256 else np.uint16)
        else:
            pred, _ = read_segmentation(pair.pred)
        if gt.shape != pred.shape:
            raise KazError(f"{pair.case}: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        gt_labels = labels_present(gt)
        if plan.declared is not None:
            check_declared_labels(pair.case, gt_labels, plan.declared, str(pair.gt), s.allow_undeclared_labels)
        present = gt_labels | labels_present(pred)
        seen |= present
        labels = plan.labels if plan.labels is not None else sorted(present)
        nsd = fm.add_segmentation(pair.case, pred, gt, spacing, labels)
        if plan.conformal is not None:
            plan.conformal.add(pair.case, pred, gt)
        rows += [{"case": pair.case, "label": lab, **_label_metrics(pred, gt, lab, spacing, present),
                  **({"nsd": nsd[lab]} if lab in nsd else {})} for lab in labels]
        if not (use_unc or use_probs):
            continue
        probs = None
        if pair.probs is not None:
            probs = calibrated if calibrated is not None else load_probabilities(pair.probs, gt.shape)
            n_classes = n_classes or probs.shape[0]
            if probs.shape[0] != n_classes:
                raise KazError(f"{pair.probs}: {probs.shape[0]} classes, earlier cases had {n_classes}")
            top = max(present | set(labels), default=0)
            if top >= probs.shape[0]:
                raise KazError(f"{pair.probs}: {probs.shape[0]} probability channels but label {top} occurs")
        roi = roi_mask(gt, pred, spacing, s.roi_margin)
        if calib is not None and probs is not None:
            if plan.labels is None:  # no dataset.json nor --labels: class-wise rows for every channel
                calib.labels = list(range(1, probs.shape[0]))
            calib.add_case(probs, gt, roi, group=groups.patient_of[pair.case] if groups else None)
        if pair.uncertainty is not None:
            u = load_uncertainty(pair.uncertainty, gt.shape, s.uncertainty_key)
        elif s.probs_entropy and probs is not None:
            u = normalized_entropy(np.asarray(probs, dtype=np.float32))
        else:
            continue
        fm.add_uncertainty(pair.case, pred, gt, spacing, labels, u)
        error = pred != gt
        auroc["all"].add(u, error)
        auroc["roi"].add(u[roi], error[roi])
        u100 = scaled_uncertainty(u, s.entropy_scaling)
        for lab in labels:
            for r in threshold_counts(pred == lab, gt == lab, u100, s.thresholds):
                threshold_rows.append({"case": pair.case, "label": lab, **r})
        if i < s.figure_cases and probs is not None:
            figures += _figure_panels(pair, gt, pred, probs, u100, labels)
    labels = plan.labels if plan.labels is not None else sorted(seen)
    if plan.settings.labels is not None:
        absent = [v for v in plan.settings.labels if v not in seen]
        if absent:
            raise KazError(f"label(s) {absent} occur in no ground truth and no prediction of the "
                           f"{len(plan.pairs)} case(s)")
    if not labels:
        raise KazError("no foreground label in any ground truth or prediction; name the labels to evaluate (labels)",
                       option="labels")
    metrics = _complete(pd.DataFrame(rows), [p.case for p in plan.pairs], labels)
    result = EvaluationResult(plan, labels, metrics, summarize(metrics, groups, plan.bootstrap), calib, auroc=auroc,
                              figures=figures, field=fm, conformal=plan.conformal)
    if threshold_rows:
        result.thresholds = pd.DataFrame(threshold_rows)
        result.threshold_summary = summarize_thresholds(result.thresholds)
        result.uncertainty_source = (f"{plan.settings.uncertainty_key} from {plan.settings.uncertainty_pattern}"
                                     if any(p.uncertainty for p in plan.pairs) else PROBS_ENTROPY)
    if plan.score_regions:
        result.scores = plan.scores
        result.score_metrics = fm.kits_table.rename(columns={"region": "label"})[["case", "label", "dice"]]
    elif plan.scores is not None:  # scores of labels not evaluated (--labels) have no Dice to correlate with
        result.scores = plan.scores[plan.scores["label"].isin(labels)]
        result.score_metrics = metrics
    if result.scores is not None:
        result.correlations = score_correlations(result.scores, result.score_metrics)
    fm.finish(metrics, result.scores, result.score_metrics if plan.score_regions else None)
    return result


def _complete(metrics: pd.DataFrame, cases: list[str], labels: list[int]) -> pd.DataFrame:
    """One row per case and label in `labels`: rows of labels a case lacks entirely are the empty-mask row."""
    have = {(r.case, r.label) for r in metrics.itertuples()} if len(metrics) else set()
    nsd = {"nsd": 1.0} if "nsd" in metrics.columns else {}  # both masks empty: NSD 1 (surface_dice)
    extra = [{"case": c, "label": lab, **_empty_row(), **nsd} for c in cases for lab in labels
             if (c, lab) not in have]
    df = pd.concat([metrics, pd.DataFrame(extra)], ignore_index=True) if extra else metrics
    df = df[df["label"].isin(labels)]
    order = {c: i for i, c in enumerate(cases)}
    df = df.sort_values(["case", "label"], key=lambda col: col.map(order) if col.name == "case" else col)
    return df[["case", "label", *METRIC_COLUMNS, *(["nsd"] if nsd else [])]].reset_index(drop=True)


def summarize(metrics: pd.DataFrame, patients: CaseGroups | None = None,
              bootstrap: Bootstrap | None = None) -> pd.DataFrame:
    """summary.csv: per label (and `all` when several): mean, std, median over the finite values of each
    column, n of those values and n_nan of the undefined ones (never averaged in silently); with `patients`
    and an active `bootstrap` the mean's interval over patient resamples (rows ci_low, ci_high)."""
    groups = [(str(lab), g) for lab, g in metrics.groupby("label")]
    if len(groups) > 1:
        groups.append(("all", metrics))
    rows = []
    columns = [*METRIC_COLUMNS, *(["nsd"] if "nsd" in metrics.columns else [])]
    with_ci = patients is not None and bootstrap is not None and bootstrap.active
    weights = bootstrap.weights(len(patients.patients)) if with_ci else None
    for label, g in groups:
        vals = g[columns].astype(float)
        stats = {"mean": vals.mean()}
        if with_ci:
            idx = patients.index(g["case"])
            ci = {c: bootstrap.interval(mean_estimate(vals[c], idx, weights, len(patients.patients)).resampled)
                  for c in columns}
            stats["ci_low"] = pd.Series({c: v[0] for c, v in ci.items()})
            stats["ci_high"] = pd.Series({c: v[1] for c, v in ci.items()})
        stats |= {"std": vals.std(ddof=1), "median": vals.median(), "n": vals.notna().sum(),
                  "n_nan": vals.isna().sum()}
        for name, series in stats.items():
            rows.append({"label": label, "statistic": name, **series.to_dict()})
    return pd.DataFrame(rows, columns=["label", "statistic", *columns])


def summarize_thresholds(per_case: pd.DataFrame) -> pd.DataFrame:
    """Counts summed over cases per label and T, the filtered fractions recomputed from the sums."""
    sums = per_case.groupby(["label", "T"], sort=False)[["tp", "fp", "fn", "uncertain", "uncertain_tn"]].sum()
    base = per_case[per_case["T"] == per_case["T"].max()].groupby("label")[["tp", "fp", "fn"]].sum()
    out = sums.reset_index()
    for name in ("tp", "fp", "fn"):
        total = out["label"].map(base[name])
        out[f"filtered_{name}"] = np.where(total > 0, 1.0 - out[name] / total.where(total > 0, 1), np.nan)
    return out


def _figure_name(case: str, label: int) -> str:
    return f"uncertainty_{case}_label{label}.png"


def check_output_dir(out_dir: Path, marker: str, inputs: Sequence[Path | None]) -> None:
    """Refuse an output folder that holds other things (it is replaced whole) or that contains an input."""
    out = Path(out_dir).resolve()
    for d in inputs:
        if d is None:
            continue
        d = Path(d).resolve()
        if out == d or out in d.parents:
            raise KazError(f"output folder {out_dir} would replace the input folder {d}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise KazError(f"output folder {out_dir} exists and is not an earlier output (no {marker}); "
                       "choose a new folder")


def write_into(result: EvaluationResult, folder: Path) -> None:
    """Write every output of `result` into an existing (temporary) folder."""
    from nnunet_kaz.evaluation.reliability import reliability_diagram

    folder = Path(folder)
    result.metrics.to_csv(folder / "metrics.csv", index=False)
    result.summary.to_csv(folder / "summary.csv", index=False)
    if result.calibration is not None and result.calibration.histograms:
        result.calibration_table().to_csv(folder / "calibration.csv", index=False)
        for (scope, cls), h in result.calibration.histograms.items():
            if h.n:
                reliability_diagram({cls: h}, folder / f"reliability_{scope}_{cls}.png",
                                    title=f"scope {scope}, class {cls}, {h.n} voxels")
    if result.thresholds is not None:
        result.thresholds.to_csv(folder / "uncertainty_thresholds.csv", index=False)
        result.threshold_summary.to_csv(folder / "uncertainty_thresholds_summary.csv", index=False)
    if result.auroc:
        result.auroc_table().to_csv(folder / "uncertainty_auroc.csv", index=False)
    if result.figures:
        (folder / "figures").mkdir(exist_ok=True)
        for f in result.figures:
            where = "" if f["slice"] is None else f", slice {f['slice']} of axis 0"
            uncertainty_figure(folder / "figures" / _figure_name(f["case"], f["label"]), f["gt"], f["pred"],
                               f["prob"], f["u100"], f["image"], result.plan.settings.thresholds,
                               title=f"{f['case']}, label {f['label']}{where}")
    if result.correlations is not None:
        result.correlations.to_csv(folder / "score_correlations.csv", index=False)
        score_scatter(result.scores, result.score_metrics, folder / "score_scatter.png")
    if result.field is not None:
        result.field.write_into(folder)
    if result.conformal is not None:
        result.conformal.write_into(folder)
    info = {"settings": asdict(result.plan.settings), "inputs": result.plan.sources, "labels": result.labels,
            "cases": [p.case for p in result.plan.pairs], "nan_counts": result.nan_counts(),
            "uncertainty": result.uncertainty_source,
            "grouping": result.plan.groups.summary() if result.plan.groups else None,
            "bootstrap": result.plan.bootstrap.summary() if result.intervals else None,
            **(result.field.summary() if result.field else {})}
    (folder / MARKER).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(o) else float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def write(result: EvaluationResult, out_dir: Path) -> None:
    """Write the outputs into `out_dir`, replacing it whole only once everything is written."""
    with atomic_dir(out_dir) as tmp:
        write_into(result, tmp)


def evaluate_folder(pred_dir: Path, gt_dir: Path, out_dir: Path, probs_dir: Path | None = None,
                    settings: EvaluationSettings | None = None, images_dir: Path | None = None,
                    uncertainty_dir: Path | None = None, scores_csv: Path | None = None,
                    progress: bool = True, raters_dir: Path | None = None,
                    conformal_dir: Path | None = None, calibration: Path | None = None) -> EvaluationResult:
    """prepare + run + write (see the module docstring)."""
    check_output_dir(out_dir, MARKER, [pred_dir, gt_dir, probs_dir, images_dir, uncertainty_dir, raters_dir])
    plan = prepare(pred_dir, gt_dir, probs_dir, settings, images_dir, uncertainty_dir, scores_csv, raters_dir,
                   conformal_dir, calibration)
    result = run(plan, progress)
    write(result, out_dir)
    return result


def report(result: EvaluationResult) -> str:
    """A few lines for the terminal: mean Dice / HD95 per label, NaN counts, calibration and AUROC."""
    from nnunet_kaz.evaluation.intervals import fmt_ci

    lines = []
    summ = result.summary.set_index(["label", "statistic"])
    ci = result.intervals and "ci_low" in set(result.summary["statistic"])

    def with_ci(label, col):
        v = summ.loc[(label, "mean"), col]
        return fmt_ci(v, summ.loc[(label, "ci_low"), col], summ.loc[(label, "ci_high"), col]) if ci else fmt_ci(v)

    for label in dict.fromkeys(result.summary["label"]):
        lines.append(f"label {label}: dice {with_ci(label, 'dice')}, hd95 {with_ci(label, 'hd95')}, "
                     f"assd {with_ci(label, 'assd')}")
    if ci:
        lines.append(f"[intervals: {result.plan.bootstrap.describe()}; {result.plan.groups.describe()}]")
    nan = result.nan_counts()
    if nan:
        lines.append("undefined (NaN, left out of the means): " + ", ".join(f"{k} {v}" for k, v in nan.items()))
    if result.calibration is not None and result.calibration.histograms:
        t = result.calibration_table()
        main = t[t["class"].isin([result.calibration.main_class(), "macro"])]
        for r in main.to_dict("records"):
            cells = [f"{m.upper()} {fmt_ci(r[m], r.get(m + '_ci_low'), r.get(m + '_ci_high'))}"
                     for m in ("ece", "ace", "mce", "brier")]
            lines.append(f"calibration {r['scope']} ({r['class']}): " + ", ".join(cells))
    for scope, a in result.auroc.items():
        lines.append(f"uncertainty AUROC for voxel errors ({scope}): {a.auroc():.4f}")
    if result.field is not None:
        lines += result.field.report_lines()
    if result.conformal is not None:
        lines += result.conformal.report_lines()
    return "\n".join(lines)


__all__ = ["EvaluationSettings", "EvaluationPlan", "EvaluationResult", "prepare", "run", "write",
           "evaluate_folder", "summarize", "report", "check_output_dir", "METRIC_COLUMNS"]
