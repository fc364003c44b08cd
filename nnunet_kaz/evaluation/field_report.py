"""What `nnunet-kaz evaluate` adds for the field's reports (issue 16), fed one case at a time.

- KiTS23 (`kits23_metrics`): kits23.csv (case, region, dice, surface_dice); kits23_summary.csv with the
  per-region means and the challenge aggregate (mean Dice, mean Surface Dice over cases and regions).
- NSD at a tolerance in mm per label (`surface_dice.normalized_surface_dice`): the `nsd` column of metrics.csv.
- Failure detection (`failure_detection`): failure_detection.csv (label, source, aurc, e_aurc, augrc, n_cases)
  over every per-image score of scores.csv and the four aggregations of the voxel uncertainty map
  (`unc_mean`, `unc_sum`, `unc_foreground_mean`, `unc_patch_max`), risk = 1 - Dice of metrics.csv;
  risk_coverage_label{L}.png per label. The scores of a region-based KiTS23 prediction are ranked against
  kits23.csv's region Dice instead (label column = region: kidney_and_mass, mass, tumor;
  risk_coverage_{region}.png), the aggregations, which are per label, still against metrics.csv.
- Rater variability (`rater_agreement`): rater_agreement.csv per case (ncc, roi_auroc, n_roi_voxels,
  n_disagreement_voxels) and, in the summary, the mean NCC, the mean per-case ROI AUROC and the ROI AUROC
  pooled over every case's ROI voxels.
Inputs are checked by `check_rater_folder` / `parse_nsd_tolerances` before anything is computed.
With `groups` (the patient of every case) and an active `bootstrap` (intervals.py) the means and failure-detection
metrics also get 95 % intervals over patient resamples: M_ci_low / M_ci_high columns of failure_detection.csv and
kits23_summary.csv, and `*_ci` entries of the rater-agreement summary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from nnunet_kaz.errors import KazError
from nnunet_kaz.evaluation.failure_detection import (aggregate_uncertainty, failure_detection_table,
                                                     risk_coverage_figure, HIGHER_IS_CONFIDENT)
from nnunet_kaz.evaluation.intervals import Bootstrap, CaseGroups, mean_estimate
from nnunet_kaz.evaluation.kits23_metrics import (KITS23_COLUMNS, KITS23_TOLERANCES_MM, kits23_case_metrics,
                                                  kits23_summary)
from nnunet_kaz.evaluation.rater_agreement import ncc, roi_auroc
from nnunet_kaz.evaluation.surface_dice import normalized_surface_dice
from nnunet_kaz.evaluation.uncertainty_validation import ErrorAuroc
from nnunet_kaz.uncertainty.scores import SCORE_COLUMNS

RATER_COLUMNS = ("case", "ncc", "roi_auroc", "n_roi_voxels", "n_disagreement_voxels")
# every per-image score the predictor writes (uncertainty/scores.py), bookkeeping columns left out
SCORE_SOURCES = tuple(c for c in SCORE_COLUMNS if c not in ("case", "label", "n_members", "n_samples"))


def parse_nsd_tolerances(values: Sequence[str] | None) -> dict[int | None, float]:
    """`--nsd-tolerance` values: `T` (every label) and/or `LABEL:T` items (also comma-separated) in mm.
    Returns {label or None: tolerance}; KazError naming the bad item."""
    out: dict[int | None, float] = {}
    for item in (v for value in (values or []) for v in str(value).split(",") if v.strip()):
        label, _, tol = item.rpartition(":")
        try:
            t = float(tol)
            key = int(label) if label.strip() else None
        except ValueError:
            raise KazError(f"NSD tolerance {item!r}: expected T or LABEL:T in mm (e.g. 2 or 1:2.0)") from None
        if not (t >= 0 and np.isfinite(t)) or (key is not None and key <= 0):
            raise KazError(f"NSD tolerance {item!r}: need a foreground label > 0 and a tolerance >= 0 mm")
        out[key] = t
    return out


def check_rater_folder(folder: Path, cases: Mapping[str, tuple[int, ...]], endings: Sequence[str],
                       read_shape: Callable[[Path], tuple[int, ...]]) -> dict[str, Path]:
    """Disagreement map of every case: `folder/{case}{ending}` with the ground truth's shape.

    `cases` maps case -> ground-truth shape (singleton axes dropped, as `read_shape` returns them). One KazError
    lists every missing file and every shape mismatch; nothing is read beyond headers."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KazError(f"rater-disagreement folder {folder} does not exist")
    found, missing, bad = {}, [], []
    for case, shape in cases.items():
        f = next((folder / f"{case}{e}" for e in endings if (folder / f"{case}{e}").is_file()), None)
        if f is None:
            missing.append(case)
            continue
        got = tuple(read_shape(f))
        if got != tuple(shape):
            bad.append(f"{f} {got} vs ground truth {tuple(shape)}")
            continue
        found[case] = f
    problems = []
    if missing:
        shown = ", ".join(f"{folder / c}{{{'|'.join(endings[:3])}}}" for c in missing[:10])
        problems.append(f"{len(missing)} case(s) have no disagreement map: {shown}"
                        + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    if bad:
        problems.append(f"{len(bad)} disagreement map(s) of another shape: " + "; ".join(bad[:10]))
    if problems:
        raise KazError("; ".join(problems))
    return found


@dataclass
class FieldMetrics:
    """Accumulates the outputs of the module docstring; `add_case` per case, then `finish`."""

    kits23: bool = False
    nsd_tolerances: dict[int | None, float] = field(default_factory=dict)
    raters: dict[str, Path] | None = None
    roi_margin: float = 5.0
    read_map: Callable[[Path], np.ndarray] | None = None
    kits_rows: list[dict] = field(default_factory=list)
    aggregation_rows: list[dict] = field(default_factory=list)
    rater_rows: list[dict] = field(default_factory=list)
    pooled_roi: ErrorAuroc = field(default_factory=ErrorAuroc)
    failure: pd.DataFrame | None = None
    curves: dict[int | str, dict[str, tuple]] = field(default_factory=dict)  # label value or KiTS23 region
    curve_cases: dict[int | str, np.ndarray] = field(default_factory=dict)   # the cases behind `curves`
    groups: CaseGroups | None = None          # patients of the cases (intervals), None: no intervals
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    @property
    def intervals(self) -> bool:
        return self.groups is not None and self.bootstrap.active

    def mean_ci(self, values, cases) -> tuple[float, float]:
        """Interval of the mean of per-case `values` over patient resamples (NaN, NaN without intervals)."""
        if not self.intervals:
            return float("nan"), float("nan")
        est = mean_estimate(values, self.groups.index(cases), self.bootstrap.weights(len(self.groups.patients)),
                            len(self.groups.patients))
        return self.bootstrap.interval(est.resampled)

    def nsd_tolerance(self, label: int) -> float | None:
        return self.nsd_tolerances.get(label, self.nsd_tolerances.get(None))

    def add_case(self, case: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                 labels: Sequence[int], uncertainty: np.ndarray | None = None) -> dict[int, float]:
        """Add one case; returns {label: nsd} for the labels with a tolerance (the nsd column)."""
        nsd = self.add_segmentation(case, pred, gt, spacing, labels)
        if uncertainty is not None:
            self.add_uncertainty(case, pred, gt, spacing, labels, uncertainty)
        return nsd

    def add_segmentation(self, case: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                         labels: Sequence[int]) -> dict[int, float]:
        """The KiTS23 rows of a case; returns {label: nsd} for the labels with a tolerance."""
        if self.kits23:
            self.kits_rows += [{"case": case, **r} for r in kits23_case_metrics(pred, gt, spacing)]
        nsd = {}
        for lab in labels:
            tol = self.nsd_tolerance(lab)
            if tol is not None:
                nsd[lab] = normalized_surface_dice(pred == lab, gt == lab, spacing, tol)
        return nsd

    def add_uncertainty(self, case: str, pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                        labels: Sequence[int], uncertainty: np.ndarray) -> None:
        """The uncertainty aggregations of a case and, with raters, its NCC and ROI AUROC."""
        shared = aggregate_uncertainty(uncertainty)
        for lab in labels:
            fg = pred == lab
            self.aggregation_rows.append({
                "case": case, "label": lab, "unc_mean": shared["mean"], "unc_sum": shared["sum"],
                "unc_foreground_mean": float(uncertainty[fg].mean()) if fg.any() else 0.0,
                "unc_patch_max": shared["patch_max"]})
        if self.raters is not None:
            d = self.read_map(self.raters[case]).astype(np.float32)
            case_roc = ErrorAuroc()
            a = roi_auroc(uncertainty, d, gt, pred, spacing, self.roi_margin, accumulator=case_roc)
            self.pooled_roi.merge(case_roc)
            self.rater_rows.append({"case": case, "ncc": ncc(uncertainty, d), "roi_auroc": a,
                                    "n_roi_voxels": case_roc.n_voxels,
                                    "n_disagreement_voxels": case_roc.n_errors})

    # --- after the last case ------------------------------------------------------------------------------
    @property
    def kits_table(self) -> pd.DataFrame | None:
        return pd.DataFrame(self.kits_rows, columns=list(KITS23_COLUMNS)) if self.kits23 else None

    @property
    def rater_table(self) -> pd.DataFrame | None:
        return pd.DataFrame(self.rater_rows, columns=list(RATER_COLUMNS)) if self.raters is not None else None

    def finish(self, metrics: pd.DataFrame, scores: pd.DataFrame | None = None,
               score_dice: pd.DataFrame | None = None) -> None:
        """failure_detection.csv from metrics.csv's Dice and the score / aggregation columns. With `score_dice`
        (case, label, dice: KiTS23 region Dice for region-based scores) the scores are ranked against it and
        the uncertainty aggregations, which are per label, against metrics.csv."""
        score_part = None
        if scores is not None and len(scores):
            score_part = scores[["case", "label", *[c for c in SCORE_SOURCES if c in scores.columns]]]
        aggregations = pd.DataFrame(self.aggregation_rows) if self.aggregation_rows else None
        if score_dice is not None:
            parts = [(score_dice, score_part), (metrics, aggregations)]
        else:
            present = [p for p in (score_part, aggregations) if p is not None]
            merged = present[0] if present else None
            for p in present[1:]:
                merged = merged.merge(p, on=["case", "label"], how="outer")
            parts = [(metrics, merged)]
        parts = [(d, src) for d, src in parts if src is not None]
        if not parts:
            return
        groups = self.groups if self.intervals else None
        self.failure = pd.concat([failure_detection_table(d, src, groups=groups, bootstrap=self.bootstrap)
                                  for d, src in parts], ignore_index=True)
        for d, src in parts:
            dice = d.set_index(["case", "label"])["dice"]
            for lab, sub in src.groupby("label"):
                risk = 1.0 - sub.set_index(["case", "label"]).index.map(dice).to_numpy(dtype=np.float64)
                key = lab if isinstance(lab, str) else int(lab)
                self.curve_cases[key] = sub["case"].astype(str).to_numpy()
                self.curves[key] = {
                    c: (risk, sub[c].to_numpy(np.float64) * (1 if c in HIGHER_IS_CONFIDENT else -1))
                    for c in src.columns if c not in ("case", "label")}

    def summary(self) -> dict:
        out: dict = {}
        if self.kits23:
            out["kits23"] = kits23_summary(self.kits_table)
        if self.nsd_tolerances:
            out["nsd_tolerance_mm"] = {("all" if k is None else str(k)): v for k, v in self.nsd_tolerances.items()}
        if self.raters is not None:
            t = self.rater_table
            out["rater_agreement"] = {"mean_ncc": float(t["ncc"].mean()), "mean_roi_auroc": float(t["roi_auroc"].mean()),
                                      "pooled_roi_auroc": self.pooled_roi.auroc(), "n_cases": int(len(t)),
                                      "roi_margin": self.roi_margin}
            if self.intervals:
                for col, key in (("ncc", "mean_ncc_ci"), ("roi_auroc", "mean_roi_auroc_ci")):
                    out["rater_agreement"][key] = list(self.mean_ci(t[col], t["case"]))
        return out

    def kits23_summary_table(self) -> pd.DataFrame:
        """kits23_summary.csv: per region and the aggregate, mean dice and surface_dice (with intervals)."""
        k = kits23_summary(self.kits_table)
        t = self.kits_table
        rows = []
        for name in [*k["regions"], "aggregate"]:
            sub = t if name == "aggregate" else t[t["region"] == name]
            row = {"region": name, "dice": float(sub["dice"].mean()), "surface_dice": float(sub["surface_dice"].mean()),
                   "n_cases": len(t) // 3 if name == "aggregate" else len(sub)}
            if self.intervals:
                for col in ("dice", "surface_dice"):
                    row[f"{col}_ci_low"], row[f"{col}_ci_high"] = self.mean_ci(sub[col], sub["case"])
            rows.append(row)
        ci = [f"{c}_{e}" for c in ("dice", "surface_dice") for e in ("ci_low", "ci_high")] if self.intervals else []
        return pd.DataFrame(rows, columns=["region", "dice", "surface_dice", "n_cases", *ci])

    def write_into(self, folder: Path) -> None:
        folder = Path(folder)
        if self.kits23:
            self.kits_table.to_csv(folder / "kits23.csv", index=False)
            self.kits23_summary_table().to_csv(folder / "kits23_summary.csv", index=False)
        if self.failure is not None:
            self.failure.to_csv(folder / "failure_detection.csv", index=False)
            for lab, curves in self.curves.items():
                what, stem = (f"region {lab}", lab) if isinstance(lab, str) else (f"label {lab}", f"label{lab}")
                risk_coverage_figure(folder / f"risk_coverage_{stem}.png", curves,
                                     title=f"{what}: risk 1 - Dice, most confident cases kept first")
        if self.raters is not None:
            self.rater_table.to_csv(folder / "rater_agreement.csv", index=False)

    def report_lines(self) -> list[str]:
        lines = []
        s = self.summary()
        if "kits23" in s:
            k = s["kits23"]
            for name, r in k["regions"].items():
                lines.append(f"KiTS23 {name}: dice {r['dice']:.4f}, surface dice {r['surface_dice']:.4f}")
            lines.append(f"KiTS23 aggregate: mean dice {k['mean_dice']:.4f}, mean surface dice "
                         f"{k['mean_surface_dice']:.4f}")
        if self.failure is not None and len(self.failure):
            for lab, sub in self.failure.groupby(self.failure["label"].astype(str), sort=False):
                best = sub.sort_values("aurc").iloc[0]
                what = f"region {lab}" if lab in KITS23_TOLERANCES_MM else f"label {lab}"
                lines.append(f"failure detection {what}: best AURC {best.aurc:.4f} (E-AURC {best.e_aurc:.4f}) "
                             f"by {best.source}, {int(best.n_cases)} cases")
        if "rater_agreement" in s:
            r = s["rater_agreement"]
            lines.append(f"rater agreement: NCC {r['mean_ncc']:.4f}, ROI AUROC {r['mean_roi_auroc']:.4f} "
                         f"(pooled {r['pooled_roi_auroc']:.4f}) over {r['n_cases']} cases")
        return lines
