"""Compare methods on one dataset: `nnunet-kaz compare RUNS.yaml -o OUT` (issue 6 item 5; Rel-UNet's Table I).

RUNS.yaml (relative paths are relative to the YAML file):

    gt: nnUNet_raw/Dataset501_KAZ/labelsTs   # ground truth, shared by every run
    images: nnUNet_raw/Dataset501_KAZ/imagesTs  # optional: the image panel of the uncertainty figures
    labels: [1]                # optional (default: dataset.json's labels)
    n_bins: 15                 # optional ECE bins
    roi_margin: 5              # optional, physical units
    figure_cases: 1            # optional uncertainty figures per run
    pred_subset: false         # optional: evaluate only predicted cases
    raters: nnUNet_raw/Dataset501_KAZ/raterDisagreementTs  # optional: rater-disagreement maps {case}{ending}
    runs:
      - label: single model    # the method's name in the table
        pred: preds/single     # segmentations {case}{ending}, ours or stock nnU-Net (--save_probabilities)
        probs: preds/single    # optional: {case}.npz probabilities (default: `pred` when it holds them)
        uncertainty: preds/single  # optional: {case}_uncertainty.npz maps (default: those next to `pred`)
        probs_entropy: false   # optional: the entropy of the probabilities instead (evaluate --probs-entropy)
        scores: preds/single/scores.csv  # optional (default: `pred`/scores.csv when present)

Every run is checked before any is computed. OUT receives comparison.csv and comparison.md (one row per
method: Dice and HD95 mean and std over cases and labels, ECE of scope all and roi, ACE and Brier of scope
roi and all, the uncertainty AUROC for voxel errors of both scopes, and each score's Spearman rho against
Dice, and the failure-detection AURC / E-AURC of the first of `FAILURE_SOURCES` a run has: the mean voxel uncertainty, or else
`mean_entropy` of scores.csv, averaged over labels), with `raters` each run's uncertainty against the raters'
disagreement (evaluate --raters: mean NCC, mean per-case ROI AUROC and the pooled ROI AUROC; every run then
needs uncertainty maps, or probabilities with probs_entropy), reliability_overlay_{scope}.png (every method's
reliability curve on one diagram), risk_coverage_overlay.png (every method's risk-coverage curve of that
source for the first label) and runs/NAME/ with
each run's full `evaluate` outputs. The calibration figures are those of the positive class for binary
problems and of the top label for multi-class ones.
"""
from __future__ import annotations

import json
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
from nnunet_kaz.evaluation.failure_detection import risk_coverage_figure
from nnunet_kaz.io_utils import atomic_dir

MARKER = "comparison.json"
FAILURE_SOURCES = ("unc_mean", "mean_entropy")  # the first one a run has feeds the AURC columns
RUN_KEYS = {"label", "pred", "probs", "uncertainty", "uncertainty_pattern", "uncertainty_key", "probs_entropy",
            "scores"}
TOP_KEYS = {"gt", "images", "labels", "n_bins", "roi_margin", "figure_cases", "pred_subset", "entropy_scaling",
            "raters", "runs"}
RATER_COLUMNS = {"mean_ncc": "ncc_raters", "mean_roi_auroc": "roi_auroc_raters",
                 "pooled_roi_auroc": "roi_auroc_raters_pooled"}  # evaluation.json's rater_agreement -> table


@dataclass
class RunSpec:
    label: str
    plan: EvaluationPlan


def _path(base: Path, value, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise KazError(f"{what} must be a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


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
    settings_kw = {k: spec[k] for k in ("labels", "n_bins", "roi_margin", "figure_cases", "pred_subset",
                                        "entropy_scaling") if k in spec}
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
        name = str(r["label"])
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
            plan = prepare(pred, gt, probs, settings, images, unc, scores, raters)
            runs.append(RunSpec(name, plan))
        except KazError as e:
            problems.append(f"run {name!r}: {e}")
    if problems:
        raise KazError("\n".join(problems))
    return runs, {"gt": str(gt), "images": str(images) if images else None,
                  "raters": str(raters) if raters else None, **settings_kw}


def _main_class(result: EvaluationResult) -> str | None:
    if result.calibration is None or not result.calibration.histograms:
        return None
    classes = {c for _, c in result.calibration.histograms}
    return "top-label" if "top-label" in classes else "1"


def table_row(name: str, result: EvaluationResult) -> dict:
    """One method's row of comparison.csv."""
    summ = result.summary
    label = "all" if (summ["label"] == "all").any() else summ["label"].iloc[0]
    stat = {st: summ[(summ["label"] == label) & (summ["statistic"] == st)].iloc[0] for st in ("mean", "std", "n_nan")}
    row = {"method": name, "n_cases": len(result.plan.pairs),
           "dice_mean": stat["mean"]["dice"], "dice_std": stat["std"]["dice"],
           "hd95_mean": stat["mean"]["hd95"], "hd95_std": stat["std"]["hd95"], "hd95_nan": int(stat["n_nan"]["hd95"])}
    cls = _main_class(result)
    for scope in ("all", "roi"):
        h = result.calibration.histograms.get((scope, cls)) if cls else None
        row[f"ece_{scope}"] = h.ece() if h and h.n else np.nan
        row[f"ace_{scope}"] = h.ace() if h and h.n else np.nan
        row[f"brier_{scope}"] = h.brier() if h and h.n else np.nan
    for scope in ("all", "roi"):
        a = result.auroc.get(scope)
        row[f"auroc_{scope}"] = a.auroc() if a else np.nan
    fd, src = _failure_rows(result)
    row["aurc"] = float(fd["aurc"].mean()) if src else np.nan
    row["e_aurc"] = float(fd["e_aurc"].mean()) if src else np.nan
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
    return row


def _failure_rows(result: EvaluationResult) -> tuple[pd.DataFrame | None, str | None]:
    """failure_detection.csv rows of the first source of FAILURE_SOURCES the run has, and that source."""
    fd = result.field.failure if result.field is not None else None
    if fd is None or not len(fd):
        return None, None
    src = next((s for s in FAILURE_SOURCES if (fd["source"] == s).any()), None)
    return (fd[fd["source"] == src], src) if src else (None, None)


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def markdown_table(table: pd.DataFrame) -> str:
    """comparison.md: mean ± std for Dice and HD95, the other figures as plain numbers."""
    rho_cols = [c for c in table.columns if c.startswith("rho_")]
    head = ["method", "cases", "Dice", "HD95", "ECE all", "ECE roi", "ACE roi", "Brier all", "Brier roi",
            "AUROC all", "AUROC roi", "AURC", "E-AURC"] + [f"rho {c[4:]}" for c in rho_cols]
    raters = "ncc_raters" in table.columns
    if raters:
        head += ["NCC raters", "ROI AUROC raters (pooled)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        hd95 = f"{_fmt(r['hd95_mean'], 2)} ± {_fmt(r['hd95_std'], 2)}"
        if r["hd95_nan"]:
            hd95 += f" ({r['hd95_nan']} NaN)"
        cells = [str(r["method"]), str(r["n_cases"]), f"{_fmt(r['dice_mean'])} ± {_fmt(r['dice_std'])}", hd95,
                 _fmt(r["ece_all"]), _fmt(r["ece_roi"]), _fmt(r["ace_roi"]), _fmt(r["brier_all"]),
                 _fmt(r["brier_roi"]), _fmt(r["auroc_all"]), _fmt(r["auroc_roi"]), _fmt(r.get("aurc")),
                 _fmt(r.get("e_aurc"))]
        for c in rho_cols:
            p = r.get("p_" + c[4:])
            cells.append(_fmt(r.get(c), 3) + ("" if p is None or not np.isfinite(p) else f" (p={p:.2g})"))
        if raters:
            cells += [_fmt(r.get("ncc_raters")),
                      f"{_fmt(r.get('roi_auroc_raters'))} ({_fmt(r.get('roi_auroc_raters_pooled'))})"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Dice and HD95: mean ± std over cases (and labels); HD95 in the images' spacing unit; NaN "
             "distances (exactly one empty mask) are left out and counted. ECE / ACE: 15 equal-width / "
             "equal-mass bins unless set; `roi`: voxels near ground truth or prediction. AUROC: voxel uncertainty "
             "as a detector of voxel errors. AURC / E-AURC: failure detection with risk 1 - Dice per case and "
             "confidence minus the mean voxel uncertainty (or mean_entropy), mean over labels, lower is better "
             "(failure_detection.csv of each run has every source and AUGRC). rho: Spearman correlation of the "
             "per-image score with Dice."]
    if raters:
        notes += ["", "NCC / ROI AUROC raters: the uncertainty map against the raters' disagreement (evaluate "
                     "--raters): mean NCC and mean per-case ROI AUROC over cases, pooled ROI AUROC in brackets."]
    return "\n".join(lines + notes) + "\n"


def run_slug(name: str) -> str:
    """The folder name of a run under OUT/runs/."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def compare_runs(yaml_file: Path, out_dir: Path, progress: bool = True) -> pd.DataFrame:
    """Check every run, evaluate each, then write OUT at once (see the module docstring)."""
    from nnunet_kaz.evaluation.reliability import reliability_diagram

    runs, info = load_runs(yaml_file)
    inputs = [Path(info["gt"])] + [Path(p) for r in runs for p in r.plan.sources.values() if p]
    check_output_dir(out_dir, MARKER, inputs)
    results = []
    for r in runs:
        if progress:
            print(f"== {r.label}", flush=True)
        results.append((r.label, run(r.plan, progress)))
    table = pd.DataFrame([table_row(name, res) for name, res in results])
    slugs = {}
    with atomic_dir(out_dir) as tmp:
        table.to_csv(tmp / "comparison.csv", index=False)
        (tmp / "comparison.md").write_text(markdown_table(table))
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
        (tmp / MARKER).write_text(json.dumps({"runs_yaml": str(yaml_file), "settings": info, "runs": slugs},
                                             indent=2) + "\n")
    return table
