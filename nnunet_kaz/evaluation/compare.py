"""Compare methods on one dataset: `nnunet-kaz compare RUNS.yaml -o OUT` (issue 6 item 5, issue 25; Rel-UNet's
Table I).

RUNS.yaml (relative paths are relative to the YAML file):

    gt: nnUNet_raw/Dataset501_KAZ/labelsTs   # ground truth, shared by every run
    images: nnUNet_raw/Dataset501_KAZ/imagesTs  # optional: the image panel of the uncertainty figures
    labels: [1]                # optional (default: dataset.json's labels)
    n_bins: 15                 # optional ECE bins
    roi_margin: 5              # optional, physical units
    figure_cases: 1            # optional uncertainty figures per run
    pred_subset: false         # optional: evaluate only predicted cases
    raters: nnUNet_raw/Dataset501_KAZ/raterDisagreementTs  # optional: rater-disagreement maps {case}{ending}
    reference: single model    # optional: the method the others are compared with (default: the first run)
    bootstrap: 2000            # optional: patient-level bootstrap resamples (0: no intervals, no tests)
    bootstrap_seed: 0          # optional
    patient_pattern: '^KAZ_(?P<patient>P\\d+)_'   # optional: patients from case names (default: intervals.py)
    runs:
      - label: single model    # the method's name in the table
        pred: preds/single     # segmentations {case}{ending}, ours or stock nnU-Net (--save_probabilities)
        probs: preds/single    # optional: {case}.npz probabilities (default: `pred` when it holds them)
        uncertainty: preds/single  # optional: {case}_uncertainty.npz maps (default: those next to `pred`)
        probs_entropy: false   # optional: the entropy of the probabilities instead (evaluate --probs-entropy)
        scores: preds/single/scores.csv  # optional (default: `pred`/scores.csv when present)
      - label: ensemble        # one prediction folder under several calibrators, without predicting again:
        pred: preds/ensemble   #   one row per entry, named "ensemble: KEY"; null = the probabilities as
        calibrations:          #   predicted. The folder must hold UNcalibrated probabilities (predicted without
          none: null           #   --calibration, and without --postprocessing: under a calibrator the
          logistic: calib_logistic.json   # segmentation is the argmax of the calibrated probabilities)
          temperature: calib_temperature.json
        # calibration: FILE    # (one calibrator for this run)

Every run is checked before any is computed. OUT receives:
- comparison.csv, one row per method: n_cases, n_patients; dice_mean, hd95_mean (mean over cases and labels),
  their std and the NaN count of HD95; ECE / ACE / MCE / Brier of scopes all and roi of the headline class (the
  positive class of a binary problem, else the top label) and ece/ace/mce_macro_{all,roi}, the mean over the
  foreground classes of the class-wise one-vs-rest figures (calibration.py); the uncertainty AUROC for voxel
  errors of both scopes; aurc, e_aurc, augrc and risk_80cov of the first of `FAILURE_SOURCES` a run has (the mean
  voxel uncertainty, or else `mean_entropy` of scores.csv), averaged over labels; each score's Spearman rho
  against Dice; with `raters` each run's uncertainty against the raters' disagreement (evaluate --raters: mean
  NCC, mean per-case ROI AUROC and the pooled ROI AUROC; every run then needs uncertainty maps, or probabilities
  with probs_entropy).
  Every mean and pooled figure M (not the AUROCs, the pooled rater AUROC or rho) gets M_ci_low / M_ci_high: the
  95 % patient-level percentile bootstrap interval (intervals.py); and against the reference method M_diff,
  M_diff_ci_low, M_diff_ci_high (the paired bootstrap: both methods on the same drawn patients) and for the
  per-patient figures (`PAIRED`) M_p (Wilcoxon signed-rank over the per-patient differences) and M_p_holm
  (Holm-adjusted over the methods compared with the reference);
- comparison.md: the same as tables of a page's width (segmentation, calibration, paired differences,
  uncertainty), values as `0.866 [0.84, 0.89]`, with the number of cases and patients and the units;
- comparison.json: settings, reference, patient grouping, bootstrap settings, run folders;
- reliability_overlay_{scope}.png (every method's reliability curve of the headline class on one diagram),
  risk_coverage_overlay.png (every method's risk-coverage curve of that source for the first label) and
  runs/NAME/ with each run's full `evaluate` outputs.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_kaz.errors import KazError
from nnunet_kaz.evaluation.evaluate import (
    EvaluationPlan,
    EvaluationResult,
    EvaluationSettings,
    check_output_dir,
    prepare,
    run,
    write_into,
)
from nnunet_kaz.evaluation.failure_detection import (FAILURE_METRICS, risk_coverage_figure,
                                                     weighted_failure_metrics)
from nnunet_kaz.evaluation.intervals import (Bootstrap, Estimate, fmt, fmt_ci, holm, mean_estimate, paired)
from nnunet_kaz.io_utils import atomic_dir

MARKER = "comparison.json"
FAILURE_SOURCES = ("unc_mean", "mean_entropy")  # the first one a run has feeds the AURC columns
RUN_KEYS = {"label", "pred", "probs", "uncertainty", "uncertainty_pattern", "uncertainty_key", "probs_entropy",
            "scores", "calibration", "calibrations"}
SETTING_KEYS = ("labels", "n_bins", "roi_margin", "figure_cases", "pred_subset", "entropy_scaling", "bootstrap",
                "bootstrap_seed", "patient_pattern")
TOP_KEYS = {"gt", "images", "raters", "runs", "reference", *SETTING_KEYS}
RATER_COLUMNS = {"mean_ncc": "ncc_raters", "mean_roi_auroc": "roi_auroc_raters",
                 "pooled_roi_auroc": "roi_auroc_raters_pooled"}  # evaluation.json's rater_agreement -> table
CALIBRATION_FIGURES = ("ece", "ace", "mce", "brier")
# figures with a per-patient value: paired Wilcoxon tests; the failure-detection figures get a difference only
PAIRED = ("dice_mean", "hd95_mean", *(f"{m}_{s}" for m in CALIBRATION_FIGURES for s in ("all", "roi")),
          *(f"{m}_macro_{s}" for m in ("ece", "ace", "mce") for s in ("all", "roi")), "ncc_raters",
          "roi_auroc_raters")
DIFFERENCE_ONLY = FAILURE_METRICS


@dataclass
class RunSpec:
    label: str
    plan: EvaluationPlan
    calibration: str | None = None   # the calibrator file applied on the fly, if any


def _path(base: Path, value, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise KazError(f"{what} must be a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _calibration_variants(r: dict, base: Path, where: str) -> list[tuple[str | None, Path | None]]:
    """(row-name suffix, calibrator file or None) of a run: itself, or one per `calibrations` entry."""
    if "calibration" in r and "calibrations" in r:
        raise KazError(f"{where}: give either 'calibration' or 'calibrations', not both")
    if "calibrations" in r:
        cals = r["calibrations"]
        if not isinstance(cals, dict) or not cals:
            raise KazError(f"{where}.calibrations must be a non-empty mapping NAME: FILE (or null for none)")
        return [(str(k), _path(base, v, f"{where}.calibrations.{k}") if v else None) for k, v in cals.items()]
    if r.get("calibration"):
        return [(None, _path(base, r["calibration"], f"{where}.calibration"))]
    return [(None, None)]


def load_runs(yaml_file: Path) -> tuple[list[RunSpec], dict]:
    """Parse and check RUNS.yaml and every run's inputs; KazError lists every problem found."""
    import yaml

    yaml_file = Path(yaml_file)
    try:
        spec = yaml.safe_load(yaml_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KazError(f"cannot read {yaml_file}: {e}") from e
    if not isinstance(spec, dict) or "gt" not in spec or not isinstance(spec.get("runs"), list) or not spec["runs"]:
        raise KazError(f"{yaml_file}: expected a mapping with 'gt' and a non-empty list 'runs'")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise KazError(f"{yaml_file}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    base = yaml_file.parent
    gt = _path(base, spec["gt"], "gt")
    images = _path(base, spec["images"], "images") if spec.get("images") else None
    raters = _path(base, spec["raters"], "raters") if spec.get("raters") else None
    settings_kw = {k: spec[k] for k in SETTING_KEYS if k in spec}
    settings_kw.setdefault("figure_cases", 1)
    problems, runs, names = [], [], set()
    for i, r in enumerate(spec["runs"]):
        where = f"{yaml_file}: runs[{i}]"
        if not isinstance(r, dict) or "label" not in r or "pred" not in r:
            problems.append(f"{where}: each run needs 'label' and 'pred'")
            continue
        bad = set(r) - RUN_KEYS
        if bad:
            problems.append(f"{where}: unknown key(s) {sorted(bad)}; allowed: {sorted(RUN_KEYS)}")
            continue
        label = str(r["label"])
        try:
            variants = _calibration_variants(r, base, where)
        except KazError as e:
            problems.append(str(e))
            continue
        for suffix, calibration in variants:
            name = label if suffix is None else f"{label}: {suffix}"
            if name in names:
                problems.append(f"{where}: label {name!r} used twice")
                continue
            names.add(name)
            try:
                pred = _path(base, r["pred"], f"{where}.pred")
                probs = _path(base, r["probs"], f"{where}.probs") if r.get("probs") else (
                    pred if pred.is_dir() and any(pred.glob("*.npz")) else None)
                unc = _path(base, r["uncertainty"], f"{where}.uncertainty") if r.get("uncertainty") else None
                scores = _path(base, r["scores"], f"{where}.scores") if r.get("scores") else (
                    pred / "scores.csv" if (pred / "scores.csv").is_file() else None)
                kw = dict(settings_kw)
                for k in ("uncertainty_pattern", "uncertainty_key", "probs_entropy"):
                    if k in r:
                        kw[k] = r[k]
                try:
                    settings = EvaluationSettings(**kw)
                except TypeError as e:
                    raise KazError(f"{where}: {e}") from e
                plan = prepare(pred, gt, probs, settings, images, unc, scores, raters, calibration=calibration)
                runs.append(RunSpec(name, plan, str(calibration) if calibration else None))
            except KazError as e:
                problems.append(f"run {name!r}: {e}")
    reference = spec.get("reference")
    if reference is not None and str(reference) not in names:
        problems.append(f"{yaml_file}: reference {reference!r} is not the label of a run ({sorted(names)})")
    if problems:
        raise KazError("\n".join(problems))
    return runs, {"gt": str(gt), "images": str(images) if images else None,
                  "raters": str(raters) if raters else None,
                  "reference": str(reference) if reference is not None else runs[0].label, **settings_kw}


def _main_class(result: EvaluationResult) -> str | None:
    return result.calibration.main_class() if result.calibration is not None else None


def _main_label(result: EvaluationResult):
    summ = result.summary
    return "all" if (summ["label"] == "all").any() else summ["label"].iloc[0]


def run_estimates(result: EvaluationResult, weights: np.ndarray | None) -> dict[str, Estimate]:
    """Every figure of a run's row with its bootstrap resamples (pools of `weights` (B, P) over the run's patients)
    and its per-patient values, by comparison.csv column."""
    groups = result.plan.groups
    n_p = len(groups.patients)
    out: dict[str, Estimate] = {}
    label = _main_label(result)
    m = result.metrics if label == "all" else result.metrics[result.metrics["label"].astype(str) == str(label)]
    idx = groups.index(m["case"])
    for col in ("dice", "hd95"):
        out[f"{col}_mean"] = mean_estimate(m[col], idx, weights, n_p)
    cls = _main_class(result)
    if cls is not None:
        for scope in ("all", "roi"):
            for key, suffix in ((cls, ""), (result.calibration.MACRO, "_macro")):
                est = result.calibration.estimates(scope, key, groups.patients if weights is not None else None,
                                                   weights)
                for fig in CALIBRATION_FIGURES:
                    if suffix and fig == "brier":
                        continue
                    out[f"{fig}{suffix}_{scope}"] = est.get(fig, Estimate(math.nan))
    fd, src = _failure_rows(result)
    if src:
        curves = result.field.curves
        keys = [k for k in curves if src in curves[k]]
        per_label = []
        for k in keys:
            risk, conf = curves[k][src]
            case_w = weights[:, groups.index(result.field.curve_cases[k])] if weights is not None else None
            per_label.append(weighted_failure_metrics(risk, conf, case_w) if case_w is not None else None)
        for name in FAILURE_METRICS:
            res = np.mean([p[name] for p in per_label], axis=0) if per_label and per_label[0] is not None else None
            out[name] = Estimate(float(fd[name].mean()), res)
    if result.plan.raters is not None:
        t = result.field.rater_table
        ridx = groups.index(t["case"])
        out["ncc_raters"] = mean_estimate(t["ncc"], ridx, weights, n_p)
        out["roi_auroc_raters"] = mean_estimate(t["roi_auroc"], ridx, weights, n_p)
    return out


def table_row(name: str, result: EvaluationResult, estimates: dict[str, Estimate] | None = None) -> dict:
    """One method's row of comparison.csv (without the paired columns)."""
    summ = result.summary
    label = _main_label(result)
    stat = {st: summ[(summ["label"] == label) & (summ["statistic"] == st)].iloc[0] for st in ("mean", "std", "n_nan")}
    row = {"method": name, "n_cases": len(result.plan.pairs), "n_patients": len(result.plan.groups.patients),
           "dice_mean": stat["mean"]["dice"], "dice_std": stat["std"]["dice"],
           "hd95_mean": stat["mean"]["hd95"], "hd95_std": stat["std"]["hd95"], "hd95_nan": int(stat["n_nan"]["hd95"])}
    est = estimates if estimates is not None else run_estimates(result, None)
    for key, e in est.items():
        if key not in ("dice_mean", "hd95_mean"):
            row[key] = e.value
    for scope in ("all", "roi"):
        a = result.auroc.get(scope)
        row[f"auroc_{scope}"] = a.auroc() if a else np.nan
    fd, src = _failure_rows(result)
    for name_ in FAILURE_METRICS:
        row.setdefault(name_, np.nan)
    row["aurc_source"] = src or ""
    if result.plan.raters is not None:
        agreement = result.field.summary()["rater_agreement"]
        row.update({col: agreement[key] for key, col in RATER_COLUMNS.items()})
    if result.correlations is not None:
        c = result.correlations
        pooled = c[c["label"] == ("all" if (c["label"] == "all").any() else c["label"].iloc[0])]
        for r in pooled.itertuples():
            row[f"rho_{r.score}"] = r.spearman_rho
            row[f"p_{r.score}"] = r.p_value
    if estimates is not None:
        for key, e in estimates.items():
            if e.resampled is not None:
                row[f"{key}_ci_low"], row[f"{key}_ci_high"] = e.ci
    return row


def _failure_rows(result: EvaluationResult) -> tuple[pd.DataFrame | None, str | None]:
    """failure_detection.csv rows of the first source of FAILURE_SOURCES the run has, and that source."""
    fd = result.field.failure if result.field is not None else None
    if fd is None or not len(fd):
        return None, None
    src = next((s for s in FAILURE_SOURCES if (fd["source"] == s).any()), None)
    return (fd[fd["source"] == src], src) if src else (None, None)


def comparison_table(results: list[tuple[str, EvaluationResult]], reference: str,
                     bootstrap: Bootstrap) -> pd.DataFrame:
    """comparison.csv: each method's row with intervals, and its paired differences from `reference`."""
    ref_result = dict(results)[reference]
    patients = ref_result.plan.groups.patients
    with_ci = bootstrap.active
    weights = {}
    estimates = {}
    for name, res in results:
        n_p = len(res.plan.groups.patients)
        if with_ci and n_p not in weights:
            weights[n_p] = bootstrap.weights(n_p)
        estimates[name] = {k: e.with_ci(bootstrap) for k, e in
                           run_estimates(res, weights.get(n_p) if with_ci else None).items()}
    rows = [table_row(name, res, estimates[name] if with_ci else None) | {"reference": name == reference}
            for name, res in results]
    if not with_ci:
        return pd.DataFrame(rows)
    ref = estimates[reference]
    p_values: dict[str, dict[str, float]] = {}
    for row, (name, res) in zip(rows, results):
        if name == reference:
            continue
        same = res.plan.groups.patients == patients  # a paired comparison needs the same patients
        for key in (*PAIRED, *DIFFERENCE_ONLY):
            if key not in ref or key not in estimates[name]:
                continue
            if not same:
                row[f"{key}_diff"] = np.nan
                continue
            d = paired(estimates[name][key], ref[key], bootstrap)
            row[f"{key}_diff"], (row[f"{key}_diff_ci_low"], row[f"{key}_diff_ci_high"]) = d.diff, d.ci
            if key in PAIRED:
                row[f"{key}_p"] = d.p
                p_values.setdefault(key, {})[name] = d.p
    for key, ps in p_values.items():  # Holm over the methods compared with the reference, per figure
        adjusted = holm(list(ps.values()))
        for (name, _), adj in zip(ps.items(), adjusted):
            next(r for r in rows if r["method"] == name)[f"{key}_p_holm"] = adj
    table = pd.DataFrame(rows)
    return table[_column_order(list(table.columns))]


def _column_order(columns: list[str]) -> list[str]:
    """Each figure M followed by M_ci_low, M_ci_high; the paired columns M_diff... last, in the figures' order."""
    suffixes = ("_ci_low", "_ci_high")
    paired_suffixes = ("_diff", "_diff_ci_low", "_diff_ci_high", "_p", "_p_holm")
    derived = {c for c in columns for base in columns for sfx in (*suffixes, *paired_suffixes) if c == base + sfx}
    base = [c for c in columns if c not in derived]
    order = [x for c in base for x in (c, *(c + sfx for sfx in suffixes)) if x in columns]
    order += [x for c in base for x in (c + sfx for sfx in paired_suffixes) if x in columns]
    return order


# ----------------------------------------------------------------------------------------------- comparison.md
def _cell(r: dict, key: str) -> str:
    return fmt_ci(r.get(key), r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"))


def _diff_cell(r: dict, key: str) -> str:
    if r.get("reference"):
        return "reference"
    if f"{key}_diff" not in r or not _finite(r.get(f"{key}_diff")):
        return "n/a"
    text = fmt_ci(r[f"{key}_diff"], r.get(f"{key}_diff_ci_low"), r.get(f"{key}_diff_ci_high"), sign=True)
    p = r.get(f"{key}_p_holm")
    return text + (f", p={p:.2g}" if _finite(p) else "")


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def comparison_sections(table: pd.DataFrame) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The tables of comparison.md and of the report: (title, header, rows, note), each a page wide."""
    recs = table.to_dict("records")
    ref = next((r["method"] for r in recs if r.get("reference")), recs[0]["method"])
    diff = any(k.endswith("_diff") for k in table.columns)
    out = []
    head = ["method", "cases (patients)", "Dice", "HD95"] + (["Δ Dice", "Δ HD95"] if diff else [])
    rows = []
    for r in recs:
        hd95 = _cell(r, "hd95_mean") + (f" ({r['hd95_nan']} NaN)" if r.get("hd95_nan") else "")
        rows.append([str(r["method"]), f"{r['n_cases']} ({r['n_patients']})", _cell(r, "dice_mean"), hd95]
                    + ([_diff_cell(r, "dice_mean"), _diff_cell(r, "hd95_mean")] if diff else []))
    out.append(("Segmentation", head, rows, "Dice (unitless) and HD95 (the images' spacing unit: mm, pixels for "
                "PNG/BMP): mean over cases and labels; NaN distances (exactly one empty mask) left out and "
                "counted."))
    if "ece_all" in table.columns:
        head = ["method", "ECE all", "ECE roi", "ACE roi", "MCE roi", "Brier roi", "class-wise ECE roi"]
        rows = [[str(r["method"]), _cell(r, "ece_all"), _cell(r, "ece_roi"), _cell(r, "ace_roi"), _cell(r, "mce_roi"),
                 _cell(r, "brier_roi"), _cell(r, "ece_macro_roi")] for r in recs]
        out.append(("Calibration", head, rows, "Voxel calibration of the headline class (positive class of a binary "
                    "problem, else the top label), unitless in [0, 1]: ECE / MCE with equal-width bins, ACE with "
                    "equal-mass bins, Brier; all = every voxel, roi = voxels near ground truth or prediction. "
                    "Class-wise: the mean over the foreground classes of the one-vs-rest ECE."))
        if diff:
            head = ["method", "Δ ECE all", "Δ ECE roi", "Δ ACE roi", "Δ Brier roi", "Δ class-wise ECE roi"]
            rows = [[str(r["method"])] + [_diff_cell(r, k) for k in ("ece_all", "ece_roi", "ace_roi", "brier_roi",
                                                                     "ece_macro_roi")] for r in recs]
            out.append((f"Calibration: differences from {ref}", head, rows, "Difference from the reference with its "
                        "paired-bootstrap interval and the Holm-adjusted Wilcoxon p over patients."))
    head = ["method", "AUROC all", "AUROC roi", "AURC", "E-AURC", "AUGRC", "risk @ 80 %"]
    rows = [[str(r["method"]), fmt(r.get("auroc_all")), fmt(r.get("auroc_roi")), _cell(r, "aurc"), _cell(r, "e_aurc"),
             _cell(r, "augrc"), _cell(r, "risk_80cov")] for r in recs]
    out.append(("Uncertainty against error", head, rows, "AUROC: voxel uncertainty as a detector of voxel errors "
                "(no interval). AURC / E-AURC / AUGRC / risk at 80 % coverage: failure detection with risk 1 - Dice "
                "per case and confidence minus the mean voxel uncertainty (or mean_entropy), mean over labels, lower "
                "is better, unitless (failure_detection.csv of each run has every source)."))
    if diff and "aurc_diff" in table.columns:
        head = ["method", "Δ AURC", "Δ E-AURC", "Δ AUGRC", "Δ risk @ 80 %"]
        rows = [[str(r["method"])] + [_diff_cell(r, k) for k in DIFFERENCE_ONLY] for r in recs]
        out.append((f"Failure detection: differences from {ref}", head, rows, "Paired-bootstrap intervals; no "
                    "p-value: these rank cases against each other and have no per-patient value."))
    rho_cols = [c for c in table.columns if c.startswith("rho_")]
    if rho_cols:
        head = ["method"] + [f"rho {c[4:]}" for c in rho_cols]
        rows = [[str(r["method"])] + [fmt(r.get(c)) + ("" if not _finite(r.get("p_" + c[4:])) else
                                                       f" (p={r['p_' + c[4:]]:.2g})") for c in rho_cols]
                for r in recs]
        out.append(("Per-image scores against Dice", head, rows, "Spearman's rho of each per-image score with Dice "
                    "over cases (unitless), with its p-value."))
    if "ncc_raters" in table.columns:
        head = ["method", "NCC raters", "ROI AUROC raters", "pooled"] + (["Δ NCC"] if diff else [])
        rows = [[str(r["method"]), _cell(r, "ncc_raters"), _cell(r, "roi_auroc_raters"),
                 fmt(r.get("roi_auroc_raters_pooled"))] + ([_diff_cell(r, "ncc_raters")] if diff else [])
                for r in recs]
        out.append(("Uncertainty against the raters", head, rows, "The uncertainty map against the raters' "
                    "disagreement (evaluate --raters): mean NCC and mean per-case ROI AUROC over cases, pooled ROI "
                    "AUROC over every ROI voxel (no interval)."))
    return out


def markdown_table(table: pd.DataFrame, info: dict | None = None) -> str:
    """comparison.md: the sections of `comparison_sections`, then how the intervals were made."""
    lines = []
    for title, head, rows, note in comparison_sections(table):
        lines += [f"### {title}", "", *_md_table(head, rows), "", note, ""]
    if info:
        lines.append(info.get("note", ""))
    return "\n".join(lines).rstrip() + "\n"


def intervals_note(info: dict) -> str:
    """The sentence on how intervals and tests were made, for comparison.md and the report."""
    b, g = info.get("bootstrap"), info.get("grouping")
    if not b:
        return "No intervals (bootstrap 0)."
    return (f"Intervals: {100 * b['confidence']:g} % percentile bootstrap over {g['n_patients']} patients "
            f"({g['n_cases']} cases; grouping: {g['source']}), {b['n_resamples']} resamples, seed {b['seed']}; a "
            f"drawn patient brings all its cases. Differences (Δ) from the reference {info['reference']!r}: the "
            "same resamples for both methods; p: Wilcoxon signed-rank over the per-patient differences, "
            "Holm-adjusted over the methods compared.")


def run_slug(name: str) -> str:
    """The folder name of a run under OUT/runs/."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def compare_runs(yaml_file: Path, out_dir: Path, progress: bool = True, reference: str | None = None,
                 bootstrap: int | None = None) -> pd.DataFrame:
    """Check every run, evaluate each, then write OUT at once (see the module docstring). `reference` and
    `bootstrap` override RUNS.yaml's."""
    from nnunet_kaz.evaluation.reliability import reliability_diagram

    runs, info = load_runs(yaml_file)
    if reference is not None:
        if reference not in [r.label for r in runs]:
            raise KazError(f"reference {reference!r} is not the label of a run ({[r.label for r in runs]})",
                           option="reference")
        info["reference"] = reference
    if bootstrap is not None:
        for r in runs:
            r.plan.settings.bootstrap = int(bootstrap)
            r.plan.settings.check()
    inputs = [Path(info["gt"])] + [Path(p) for r in runs for p in r.plan.sources.values() if p]
    check_output_dir(out_dir, MARKER, inputs)
    results = []
    for r in runs:
        if progress:
            print(f"== {r.label}", flush=True)
        results.append((r.label, run(r.plan, progress)))
    resampling = runs[0].plan.bootstrap
    table = comparison_table(results, info["reference"], resampling)
    ref_plan = dict((r.label, r.plan) for r in runs)[info["reference"]]
    info["grouping"] = ref_plan.groups.summary()
    info["bootstrap"] = resampling.summary() if resampling.active else None
    info["note"] = intervals_note(info)
    slugs = {}
    with atomic_dir(out_dir) as tmp:
        table.to_csv(tmp / "comparison.csv", index=False)
        (tmp / "comparison.md").write_text(markdown_table(table, info))
        for scope in ("all", "roi"):
            hists = {}
            for name, res in results:
                cls = _main_class(res)
                h = res.calibration.histograms.get((scope, cls)) if cls else None
                if h is not None and h.n:
                    hists[name] = h
            if hists:
                reliability_diagram(hists, tmp / f"reliability_overlay_{scope}.png",
                                    title=f"reliability, scope {scope}")
        curves = {}
        for name, res in results:
            fd, src = _failure_rows(res)
            if src:
                # keys: label values, or KiTS23 regions for region-based scores; the first that has the source
                lab = min((k for k, c in res.field.curves.items() if src in c),
                          key=lambda k: (isinstance(k, str), str(k).zfill(8)))
                curves[f"{name} ({src})"] = res.field.curves[lab][src]
        if curves:
            what = f"region {lab}" if isinstance(lab, str) else f"label {lab}"
            risk_coverage_figure(tmp / "risk_coverage_overlay.png", curves,
                                 title=f"risk-coverage, {what} (risk 1 - Dice)")
        for name, res in results:
            slug = run_slug(name)
            while slug in slugs.values():
                slug += "_"
            slugs[name] = slug
            (tmp / "runs" / slug).mkdir(parents=True)
            write_into(res, tmp / "runs" / slug)
        calibrations = {r.label: r.calibration for r in runs if r.calibration}
        (tmp / MARKER).write_text(json.dumps({"runs_yaml": str(yaml_file), "settings": info, "runs": slugs,
                                              "calibrations": calibrations}, indent=2) + "\n")
    return table
