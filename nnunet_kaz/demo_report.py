"""The demo's `report.html`: every result of the run in one self-contained page."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_kaz.evaluation.compare import run_slug
from nnunet_kaz.report import HtmlReport


def entropy_example(folder: Path, images: Path, out_png: Path) -> Path | None:
    """Image, mean probability, normalized entropy and mutual information of the first predicted case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    npz = sorted(p for p in folder.glob("*_uncertainty.npz"))
    if not npz:
        return None
    case = npz[len(npz) // 2].name[: -len("_uncertainty.npz")]
    unc = np.load(folder / f"{case}_uncertainty.npz")
    prob = np.load(folder / f"{case}.npz")["probabilities"][1].squeeze()
    image = np.asarray(Image.open(images / f"{case}_0000.png"), dtype=float)
    panels = [("image", image, "gray", None), ("mean probability", prob, "viridis", (0, 1)),
              ("normalized entropy", unc["entropy"].squeeze(), "magma", (0, 1)),
              ("mutual information", unc["mutual_information"].squeeze(), "magma", None)]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    for ax, (title, arr, cmap, lim) in zip(axes, panels):
        im = ax.imshow(arr, cmap=cmap, vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        ax.set_title(title)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(case)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def read_mask(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).squeeze()


def conformal_table(folder: Path, gt: Path, label: str) -> pd.DataFrame:
    """Per test case the realised false-negative rate of the conformal mask CASE_conformal_LABEL.ext against the
    ground truth, 1 - |C & G| / |G| (0 when G is empty: Angelopoulos et al. 2024, the FNR loss of their section
    3.2 with the convention of `nnunet-kaz conformal fit`), and the mask's size relative to the segmentation and
    to the ground truth (NaN when those are empty). The mean FNR over exchangeable cases is what the guarantee
    bounds by alpha."""
    value = json.loads((gt.parent / "dataset.json").read_text())["labels"][label]
    rows = []
    for mask_path in sorted(folder.glob(f"*_conformal_{label}.*")):
        case, ending = mask_path.name.split(f"_conformal_{label}")
        mask = read_mask(mask_path) > 0
        truth = read_mask(gt / f"{case}{ending}") == value
        seg = read_mask(folder / f"{case}{ending}") == value
        n_gt, n_seg, n_mask = int(truth.sum()), int(seg.sum()), int(mask.sum())
        rows.append({"case": case, "fnr": 1 - (mask & truth).sum() / n_gt if n_gt else 0.0,
                     "segmentation_fnr": 1 - (seg & truth).sum() / n_gt if n_gt else 0.0,
                     "conformal_px": n_mask, "segmentation_px": n_seg, "gt_px": n_gt,
                     "mask_vs_segmentation": n_mask / n_seg if n_seg else np.nan,
                     "mask_vs_gt": n_mask / n_gt if n_gt else np.nan})
    if not rows:
        raise FileNotFoundError(f"no *_conformal_{label}.* masks in {folder}")
    return pd.DataFrame(rows)


def _contours(ax, image, masks: list[tuple[np.ndarray, str, str]]) -> None:
    ax.imshow(image, cmap="gray")
    for mask, color, _ in masks:
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1.2)


def conformal_figure(folder: Path, images: Path, gt: Path, label: str, case: str, out_png: Path) -> Path:
    """Image, segmentation, conformal mask and ground truth of one case, and the three outlines on the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    value = json.loads((gt.parent / "dataset.json").read_text())["labels"][label]
    ending = next(folder.glob(f"{case}_conformal_{label}.*")).name.split(f"_conformal_{label}")[1]
    image = read_mask(images / f"{case}_0000{ending}").astype(float)
    seg = read_mask(folder / f"{case}{ending}") == value
    conf = read_mask(folder / f"{case}_conformal_{label}{ending}") > 0
    truth = read_mask(gt / f"{case}{ending}") == value
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.6))
    for ax, (title, arr) in zip(axes, [("image", image), ("segmentation", seg),
                                       ("conformal mask", conf), ("ground truth (annotation)", truth)]):
        ax.imshow(arr, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    outlines = [(truth, "lime", "ground truth"), (seg, "deepskyblue", "segmentation"), (conf, "red", "conformal")]
    _contours(axes[4], image, outlines)
    axes[4].set_title("outlines")
    axes[4].axis("off")
    axes[4].legend(handles=[Line2D([], [], color=c, label=n) for _, c, n in outlines], loc="lower right",
                   fontsize=7)
    fig.suptitle(case)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def fnr_figure(table: pd.DataFrame, alpha: float, out_png: Path) -> Path:
    """Each test case's realised FNR of the conformal mask (and of the segmentation), sorted, with alpha and the
    mean: the guarantee is about the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table.sort_values("fnr").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(t.index - 0.2, t["segmentation_fnr"], width=0.4, color="deepskyblue", label="segmentation")
    ax.bar(t.index + 0.2, t["fnr"], width=0.4, color="red", label="conformal mask")
    ax.axhline(alpha, color="k", ls="--", label=f"alpha = {alpha}")
    ax.axhline(t["fnr"].mean(), color="red", ls=":", label=f"conformal mean {t['fnr'].mean():.3f}")
    ax.axhline(t["segmentation_fnr"].mean(), color="deepskyblue", ls=":",
               label=f"segmentation mean {t['segmentation_fnr'].mean():.3f}")
    ax.set_xlabel("test case (sorted by the conformal mask's FNR)")
    ax.set_ylabel("false-negative rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def kits23_figure(dataset: Path, preds: Path, case: str, out_png: Path) -> Path:
    """The axial slice with the most ground-truth masses of one 3D case: image, ground truth, prediction, entropy
    of the MC-dropout mean and the raters' disagreement map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = read_mask(dataset / "imagesTr" / f"{case}_0000.nii.gz").astype(float)
    truth = read_mask(dataset / "labelsTr" / f"{case}.nii.gz")
    pred = read_mask(preds / f"{case}.nii.gz")
    entropy = np.load(preds / f"{case}_uncertainty.npz")["entropy"]
    entropy = entropy.reshape(-1, *image.shape).max(0) if entropy.size != image.size else entropy.reshape(image.shape)
    raters = read_mask(dataset / "raterDisagreementTr" / f"{case}.nii.gz").astype(float)
    z = int(np.argmax((truth >= 2).sum((1, 2)))) if (truth >= 2).any() else image.shape[0] // 2
    panels = [("image", image, "gray", None), ("ground truth (1 kidney, 2 tumour, 3 cyst)", truth, "viridis", (0, 3)),
              ("prediction", pred, "viridis", (0, 3)), ("entropy (MC mean)", entropy, "magma", None),
              ("rater disagreement", raters, "magma", None)]
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6))
    for ax, (title, arr, cmap, lim) in zip(axes, panels):
        im = ax.imshow(arr[z], cmap=cmap, vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{case}, axial slice {z}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def rater_summary(evaluation: Path) -> dict:
    """evaluate --raters' summary (mean NCC, mean and pooled ROI AUROC, cases) from evaluation.json, wherever
    it nests it; the per-case means of rater_agreement.csv if it is not there."""
    def find(node):
        if isinstance(node, dict):
            if isinstance(node.get("rater_agreement"), dict):
                return node["rater_agreement"]
            for v in node.values():
                hit = find(v)
                if hit is not None:
                    return hit
        return None

    marker = evaluation / "evaluation.json"
    hit = find(json.loads(marker.read_text())) if marker.is_file() else None
    if hit is None:
        t = pd.read_csv(evaluation / "rater_agreement.csv")
        hit = {"mean_ncc": t["ncc"].mean(), "mean_roi_auroc": t["roi_auroc"].mean(), "n_cases": len(t)}
    return {k: hit[k] for k in ("mean_ncc", "mean_roi_auroc", "pooled_roi_auroc", "n_cases") if k in hit}


def comparison_section(rep: HtmlReport, comparison: Path) -> pd.DataFrame:
    """The tables of a `compare` output folder (comparison_sections: a page wide each, values with their
    intervals, differences from the reference with Holm-adjusted p) and how the intervals were made."""
    from nnunet_kaz.evaluation.compare import comparison_sections, intervals_note

    table = pd.read_csv(comparison / "comparison.csv")
    for title, head, rows, note in comparison_sections(table):
        rep.subheading(title)
        rep.rows(head, rows)
        rep.text(note, "note")
    info = json.loads((comparison / "comparison.json").read_text())["settings"]
    if info.get("grouping"):
        rep.text(intervals_note(info), "note")
    return table


def comparison_meta(comparison: Path, units: str) -> str:
    """`n = 36 slices of 3 patients; UNITS` from a compare output's grouping."""
    g = json.loads((comparison / "comparison.json").read_text())["settings"].get("grouping") or {}
    n = f"n = {g['n_cases']} slices of {g['n_patients']} patients" if g else "n = the test slices"
    return f"{n}; {units}"


def build_report(demo, folders: dict[str, Path], comparison: Path, gradcam: Path,
                 evaluations: dict[str, Path] | None = None) -> Path:
    from nnunet_kaz import __version__
    from nnunet_kaz.evaluation.intervals import fmt_ci

    rep = HtmlReport("nnunet-kaz demo: XBoundNet++ with uncertainty on a KAZ phantom")
    meta = json.loads((demo.dataset / "kaz_meta.json").read_text())
    n_test = sum(c["split"] == "test" for c in meta["cases"].values())
    rep.text(f"nnunet-kaz {__version__}. Phantom: {demo.n_patients} patients x 12 radial slices of "
             f"{demo.original[0]} x {demo.original[1]} pixels, resized to {demo.size} x {demo.size}; "
             f"{demo.n_test} patients ({n_test} slices) held out for testing, the rest in 5 patient-wise folds. "
             "The annotations are rough, perturbed versions of the true zones, as clinicians' KAZ masks are.")

    units = "Dice and calibration errors unitless, HD95 in pixels of the 48 x 48 network input"
    rep.heading("Methods compared on the held-out patients", comparison_meta(comparison, units))
    table = comparison_section(rep, comparison)
    rows = table.set_index("method")
    before, after = list(folders)[-2], list(folders)[-1]

    def change(c):
        return (f"{c}: {fmt_ci(rows.loc[before, c], rows.loc[before].get(c + '_ci_low'), rows.loc[before].get(c + '_ci_high'))}"
                f" -> {fmt_ci(rows.loc[after, c], rows.loc[after].get(c + '_ci_low'), rows.loc[after].get(c + '_ci_high'))}")

    rep.text("Calibration (logistic, fitted on the fold-0 validation patients' probabilities of the same ensemble) "
             "and post-processing (threshold 0.4, closing, largest component), before -> after: "
             + "; ".join(change(c) for c in ("ece_all", "ece_roi", "dice_mean", "hd95_mean")) + ".")
    for scope in ("all", "roi"):
        rep.figure(comparison / f"reliability_overlay_{scope}.png", f"Reliability diagrams, scope {scope}")
    rep.figure(comparison / "risk_coverage_overlay.png", "Risk-coverage curves of every method (risk 1 - Dice)")

    tta_section(rep, comparison, table)
    if demo.calibrator_comparison.is_dir():
        rep.heading("Calibrators side by side, without predicting again",
                    comparison_meta(demo.calibrator_comparison, "calibration errors and Dice unitless, HD95 in pixels"))
        rep.text(f"nnunet-kaz compare with calibrations: one prediction folder ({demo.conformal_method}, predicted "
                 "without --calibration) evaluated under no calibrator and under each calibrator fitted on the fold-0 "
                 "validation patients' probabilities (nnunet-kaz calibrate --method logistic / platt / temperature / "
                 "isotonic); the segmentation is the argmax of the calibrated probabilities. Differences are from "
                 "'none'.")
        comparison_section(rep, demo.calibrator_comparison)
        rep.figure(demo.calibrator_comparison / "reliability_overlay_roi.png", "Reliability diagrams, scope roi")

    ensemble = list(folders)[-3]  # 2 seeds x 2 folds x MC dropout
    last = comparison / "runs" / run_slug(ensemble)
    last = last if last.is_dir() else None
    rep.heading("Uncertainty against error (paper 000 Fig. 4)",
                f"n = {n_test} test slices ({ensemble}); pixel counts, fractions unitless")
    for fig in sorted((last / "figures").glob("*.png"))[:1] if last else []:
        rep.figure(fig, f"{last.name}: image, annotation, prediction, probability, entropy (of the uncalibrated "
                        "samples, scaled to 100 x U / max U per slice as the authors), and the pixels left after "
                        "removing those above the uncertainty thresholds T = 100, 75, 50, 25")
    if last and (last / "uncertainty_thresholds_summary.csv").is_file():
        rep.table(pd.read_csv(last / "uncertainty_thresholds_summary.csv"))
    example = entropy_example(list(folders.values())[-3], demo.dataset / "imagesTs", demo.out / "entropy_example.png")
    if example:
        rep.figure(example, "Mean probability, normalized entropy and mutual information of 2 seeds x 2 folds x "
                            "MC-dropout samples")

    rep.heading("Per-image uncertainty scores against Dice",
                f"n = {n_test} test slices ({ensemble}); Spearman's rho unitless")
    if last and (last / "score_scatter.png").is_file():
        rep.figure(last / "score_scatter.png", "Per-image scores of nnunet-kaz predict against Dice")
        rep.table(pd.read_csv(last / "score_correlations.csv"))

    conformal_section(rep, demo, folders)
    if evaluations:
        rep.heading("Uncertainty against rater variability (2D)",
                    f"n = {n_test} test slices per method; NCC and AUROC unitless")
        rep.table(pd.DataFrame([{"method": name, **{k: v for k, v in rater_summary(folder).items()}}
                                for name, folder in evaluations.items()]))
        rep.text("compare with raters: (evaluate --raters per run) against raterDisagreementTs (1 where the rough annotation and the true zone "
                 "differ): NCC between the normalized-entropy map and the disagreement map, and the AUROC of the "
                 "entropy for finding disagreement pixels inside the region of interest (annotation and prediction "
                 "dilated); mean over test slices, and pooled over all their pixels.", "note")

    kits23_section(rep, demo)
    paper000_section(rep, demo)

    rep.heading("Layer-wise Grad-CAM (paper 000 section 2.2)", "n = 1 test slice; activation maps scaled to [0, 1]")
    rep.figure(gradcam, "Grad-CAM of the ablation-zone logits over the annotation, block by block")

    from nnunet_kaz.demo import SGDR

    manifest = json.loads((demo.results(SGDR) / "fold_0" / "snapshots.json").read_text())
    rep.heading("Training", f"n = {len(manifest['snapshots'])} SGDR snapshots of 1 run (fold 0); epochs, learning "
                            "rate, EMA pseudo-Dice unitless")
    rep.text(f"SGDR cycles end at epochs {manifest['cycle_ends']}; the top {manifest['top_k']} checkpoints of the "
             f"last {manifest['window']} epochs of each cycle by EMA pseudo-Dice were kept:")
    rep.table(pd.DataFrame(manifest["snapshots"]), digits=4)
    rep.figure(demo.results("XBoundNetTrainer_demo_seed0") / "fold_0" / "progress.png",
               "nnU-Net's training progress, seed 0, fold 0")
    rep.figure(demo.results(SGDR) / "fold_0" / "progress.png",
               "SGDR run: learning rate with warm restarts")

    rep.heading("Commands run", f"n = {len(demo.timings)} commands; seconds")
    rep.table(pd.DataFrame(demo.timings, columns=["command", "seconds"]), digits=1)
    rep.text(f"Everything is under {demo.out}: nnU-Net folders, predictions/ (one folder per method: "
             "segmentations, CASE.npz probabilities, CASE_uncertainty.npz, entropy images, scores.csv), "
             "comparison/, comparison_calibrators/, explain/, and predictions/*plus*/kaz_export/ (BMP masks at the "
             "original slice size).", "note")
    return rep.write(demo.out / "report.html")


TTA_FIGURES = (("auroc_roi", "AUROC roi"), ("aurc", "AURC"), ("e_aurc", "E-AURC"), ("ncc_raters", "NCC raters"),
               ("ece_roi", "ECE roi"), ("dice_mean", "Dice"))


def tta_section(rep: HtmlReport, comparison: Path, table: pd.DataFrame) -> None:
    """Test-time augmentation beside MC dropout, ensembles and snapshots: the uncertainty figures of each."""
    from nnunet_kaz.evaluation.intervals import fmt_ci

    tta = [m for m in table["method"] if str(m).startswith("test-time augmentation")]
    if not tta:
        return
    rep.heading("Test-time augmentation beside the other uncertainty methods",
                comparison_meta(comparison, "all figures unitless"))
    rep.text("predict --tta streams nnU-Net's 4 mirror flips of the single model as samples of their own into the "
             "same accumulators as MC-dropout samples, ensemble members and snapshots, so its entropy, mutual "
             "information, variance and scores mean the same thing (nnU-Net's within-sample mirroring, which "
             "would average the flips inside one sample, is off). Higher AUROC and NCC, lower AURC and E-AURC are "
             "better.")
    rows = [[str(r["method"])] + [fmt_ci(r.get(c), r.get(c + "_ci_low"), r.get(c + "_ci_high")) for c, _ in TTA_FIGURES]
            for r in table.to_dict("records")]
    rep.rows(["method"] + [name for _, name in TTA_FIGURES], rows)


def conformal_section(rep: HtmlReport, demo, folders: dict[str, Path]) -> None:
    from nnunet_kaz.demo import ALPHA, LABEL

    folder = folders[demo.conformal_method]
    gt = demo.dataset / "labelsTs"
    fit = json.loads(demo.conformal_json.read_text())
    table = conformal_table(folder, gt, LABEL)
    n = len(table)
    rep.heading("Conformal risk control: a bound on the missed ablation zone",
                f"n = {n} test slices; false-negative rates and size ratios unitless")
    rep.text(f"nnunet-kaz conformal fit on the fold-0 validation patients' uncalibrated probabilities of the "
             f"{demo.conformal_method} ensemble picked the threshold of the mask {{p >= 1 - lambda}} so that the "
             f"expected false-negative rate of {LABEL} on a new exchangeable case is at most alpha = {ALPHA} "
             f"(Angelopoulos et al., Conformal Risk Control, ICLR 2024); predict --conformal applied it to the "
             f"held-out patients. Realised on the {n} test slices: mean FNR {table['fnr'].mean():.4f} vs alpha "
             f"{ALPHA} (the segmentation's own mean FNR: {table['segmentation_fnr'].mean():.4f}); the mask is "
             f"{table['mask_vs_segmentation'].mean():.2f} x the segmentation and {table['mask_vs_gt'].mean():.2f} x "
             "the ground truth (means over slices): what the guarantee costs. The bound is on the average over "
             "cases, not per case or per pixel.")
    rep.text(f"conformal.json (fitted on {len(fit.get('cases', []))} validation slices):", "note")
    rep.table(pd.DataFrame(fit["labels"]).drop(columns=["values"], errors="ignore"), digits=4)
    summary = demo.out / "evaluations" / folder.name / "conformal_summary.csv"
    if summary.is_file():
        ev = pd.read_csv(summary)
        rep.text("nnunet-kaz evaluate --conformal (conformal_summary.csv; per case in conformal.csv next to it):",
                 "note")
        rep.table(ev, digits=4)
        mine = ev[ev["label"] == LABEL]["mean_fnr"]
        if len(mine):
            rep.text(f"Recomputed here from the CASE_conformal_{LABEL}.png masks: mean FNR {table['fnr'].mean():.6f}, "
                     f"evaluate's {float(mine.iloc[0]):.6f}.", "note")
    else:
        rep.text("Per slice (computed from the CASE_conformal_LABEL.png masks; this nnunet-kaz's evaluate has no "
                 "--conformal):", "note")
        rep.table(table, digits=4)
    case = table.sort_values("gt_px").iloc[n // 2]["case"]
    png = conformal_figure(folder, demo.dataset / "imagesTs", gt, LABEL, case, demo.out / "conformal_example.png")
    rep.figure(png, f"{case}: segmentation, conformal mask and ground truth; outlines: ground truth green, "
                    "segmentation blue, conformal mask red")
    rep.figure(fnr_figure(table, ALPHA, demo.out / "conformal_fnr.png"),
               "Realised false-negative rate per test slice: the bound is on the mean over cases")


def kits23_section(rep: HtmlReport, demo) -> None:
    from nnunet_kaz.demo import K23_DATASET, K23_TRAINER

    ev = demo.k23_evaluation
    if not (ev / "kits23_summary.csv").is_file():
        return
    n_cases = len(pd.read_csv(ev / "kits23.csv")) // 3 if (ev / "kits23.csv").is_file() else demo.k23_cases // 2
    rep.heading("KiTS23 3D part: region Dice, Surface Dice, failure detection, rater agreement",
                f"n = {n_cases} validation cases (each its own patient); Dice unitless, Surface Dice at tolerances "
                "in mm")
    rep.text(f"{demo.k23_cases} phantom cases of {' x '.join(map(str, demo.k23_size))} voxels in the KiTS23 layout "
             "(three raters' annotations per case differing at the boundaries) -> convert-kits23 --regions "
             f"({K23_DATASET}, nested regions kidney+masses, masses, tumour) -> a tiny 3D XBoundNet++ "
             f"({K23_TRAINER}, fold 0 of 2) -> nnunet-kaz predict with "
             f"{demo.k23_mc} MC-dropout samples on fold 0's validation cases -> evaluate --kits23.")
    rep.table(pd.read_csv(ev / "kits23_summary.csv"))
    rep.text("Region Dice and Surface Dice at the challenge's tolerances (kidney_and_mass 1.0331 mm, mass 1.1329 "
             "mm, tumor 1.1498 mm); both masks empty score 1, one empty 0 (neheller/kits23).", "note")
    if (ev / "kits23.csv").is_file():
        rep.table(pd.read_csv(ev / "kits23.csv"))
    if (ev / "rater_agreement.csv").is_file():
        rep.text("Entropy of the MC-dropout mean against the raters' per-voxel disagreement (rater_agreement.csv):")
        rep.table(pd.read_csv(ev / "rater_agreement.csv"))
    if (ev / "failure_detection.csv").is_file():
        fd = pd.read_csv(ev / "failure_detection.csv")
        rep.text("Failure detection (risk = 1 - Dice per case; confidence = minus the uncertainty aggregated over "
                 "the image, ranked against each label's Dice (1 kidney, 2 tumour, 3 cyst), or predict's per-image "
                 "scores of each region, ranked against that KiTS23 region's Dice; AURC, E-AURC, AUGRC), over "
                 f"{demo.k23_cases // 2} cases: a smoke test of the pipeline, not a ranking of the sources.")
        rep.table(fd, digits=4)
    if (ev / "score_correlations.csv").is_file():
        rep.text("Per-image scores of each region (scores.csv of predict) against that region's Dice: Spearman's rho "
                 "(score_correlations.csv).")
        rep.table(pd.read_csv(ev / "score_correlations.csv"), digits=4)
    for png in sorted(ev.glob("risk_coverage_*.png")):
        rep.figure(png, f"Risk-coverage curves ({png.stem})")
    preds = demo.out / "kits23" / "validation_fold0" / "predictions"
    cases = sorted(p.name[: -len("_uncertainty.npz")] for p in preds.glob("*_uncertainty.npz"))
    if cases:
        rep.figure(kits23_figure(demo.k23_dataset, preds, cases[0], demo.out / "kits23_example.png"),
                   "One validation case of the 3D part")


def table1_display(table: pd.DataFrame) -> pd.DataFrame:
    """table1.csv in paper 000's Table 1 layout: one row per method, `mean±SD` cells."""
    from nnunet_kaz.evaluation.table1 import DISTANCE_COLUMNS, TABLE1_COLUMNS

    unit = table["unit"].iloc[0] if "unit" in table.columns else "pixels"
    rows = []
    for r in table.to_dict("records"):
        row = {"Method": r["method"], "slices": r["n_slices"]}
        for col, name in TABLE1_COLUMNS:
            head = f"{name} ({unit})" if col in DISTANCE_COLUMNS else name
            row[head] = f"{r[col + '_mean']:.2f}±{r[col + '_sd']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def paper000_section(rep: HtmlReport, demo) -> None:
    from nnunet_kaz.demo import CONFIG, P000_DATASET, P000_OUTER, P000_TRAINER, PLANS, SEEDS

    evaluation = demo.p000 / "evaluation"
    if not (evaluation / "table1.csv").is_file():
        return
    protocol = json.loads((evaluation / "protocol.json").read_text())
    rep.heading("Paper 000 reproduced in miniature: nested cross-validation and Table 1")
    sizes = {k: {r: len(v) for r, v in c.items()} for k, c in protocol["cases"].items()}
    rep.text(f"The README's \"Reproduce paper 000\" commands on the phantom's slices: convert-kaz --nested "
             f"--normalization rgb_to_0_1 ({P000_DATASET}: nnU-Net's splits_final.json holds the nested CV's outer "
             "folds, 64/16/20 % of the patients), nested-cv jobs (the stock nnUNetv2_train lines, also as a Slurm "
             f"array), {len(SEEDS)} seeds x outer folds {', '.join(map(str, P000_OUTER))} of 5 trained with "
             f"{P000_TRAINER} (paper 000's recipe: Adam 1e-4, batch 4, paper augmentation, one output, epochs = "
             "passes over the training slices, plateau and early stopping on the validation loss; here at most 6 "
             "passes), then nested-cv evaluate: per outer fold the validation slices predicted, logistic calibration "
             "and conformal risk control fitted on them, the test slices predicted by the fold's members x "
             f"{protocol['settings']['mc']} MC samples (no mirroring), calibrated and post-processed, evaluated; and "
             "the test slices of both outer folds pooled into one evaluation. Slices per outer fold (train / val / "
             "test): " + "; ".join(f"fold {k}: {v['train']} / {v['val']} / {v['test']}" for k, v in sizes.items())
             + ".")
    rep.table(table1_display(pd.read_csv(evaluation / "table1.csv")))
    rep.text("Paper 000's Table 1 layout (table1.md; numbers in table1.csv): mean ± SD (ddof 1) over the pooled test "
             "slices; distances in pixels of the network's grid; MSD signed, negative when the prediction's surface "
             "lies inside the annotation. The single model is the first seed without MC dropout; both rows have "
             "their own calibration fitted on each fold's validation slices. A phantom, two of five outer folds and "
             "trainings of at most six epochs: the layout and the protocol, not the paper's numbers.", "note")
    for k in P000_OUTER:
        summary = evaluation / f"fold_{k}" / "ensemble" / "evaluation" / "conformal_summary.csv"
        if summary.is_file():
            rep.text(f"Outer fold {k}: the conformal masks' realised FNR on its test slices (alpha "
                     f"{protocol['settings']['alpha']}, fitted on its validation slices):", "note")
            rep.table(pd.read_csv(summary), digits=4)
    trainer = f"{P000_TRAINER}_seed{SEEDS[0]}"
    rep.figure(demo.res / P000_DATASET / f"{trainer}__{PLANS}__{CONFIG}" / f"fold_{P000_OUTER[0]}" / "progress.png",
               f"{trainer}, outer fold {P000_OUTER[0]}: losses and learning rate per epoch (= pass over the "
               "training slices)")
