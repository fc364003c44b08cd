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


def build_report(demo, folders: dict[str, Path], comparison: Path, gradcam: Path) -> Path:
    from nnunet_kaz import __version__

    rep = HtmlReport("nnunet-kaz demo: XBoundNet++ with uncertainty on a KAZ phantom")
    meta = json.loads((demo.dataset / "kaz_meta.json").read_text())
    n_test = sum(c["split"] == "test" for c in meta["cases"].values())
    rep.text(f"nnunet-kaz {__version__}. Phantom: {demo.n_patients} patients x 12 radial slices of "
             f"{demo.original[0]} x {demo.original[1]} pixels, resized to {demo.size} x {demo.size}; "
             f"{demo.n_test} patients ({n_test} slices) held out for testing, the rest in 5 patient-wise folds. "
             "The annotations are rough, perturbed versions of the true zones, as clinicians' KAZ masks are.")

    rep.heading("Methods compared on the held-out patients")
    table = pd.read_csv(comparison / "comparison.csv")
    rep.table(table)
    rep.text("Dice and HD95 (pixels) against the annotation; ECE (15 equal-width bins) over all pixels and in "
             "the region of interest (annotation and prediction dilated by 5 pixels); uncertainty AUROC: how well "
             "normalized entropy finds the wrong pixels; Spearman: per-image scores against Dice.", "note")
    rows = table.set_index("method")
    before, after = list(folders)[-2], list(folders)[-1]
    pairs = ", ".join(f"{c}: {rows.loc[before, c]:.4f} -> {rows.loc[after, c]:.4f}"
                      for c in ("ece_all", "ece_roi", "dice_mean", "hd95_mean"))
    rep.text(f"Calibration (logistic, fitted on the fold-0 validation patients' probabilities of the same ensemble) "
             f"and post-processing (threshold 0.4, closing, largest component), before -> after: {pairs}.")
    for scope in ("all", "roi"):
        rep.figure(comparison / f"reliability_overlay_{scope}.png", f"Reliability diagrams, scope {scope}")

    rep.heading("Uncertainty against error (paper 000 Fig. 4)")
    ensemble = list(folders)[-3]  # 2 seeds x 2 folds x MC dropout
    last = comparison / "runs" / run_slug(ensemble)
    last = last if last.is_dir() else None
    for fig in sorted((last / "figures").glob("*.png"))[:1] if last else []:
        rep.figure(fig, f"{last.name}: image, annotation, prediction, probability, entropy, and the pixels left "
                        "after removing those above the uncertainty thresholds T = 100, 75, 50, 25")
    if last and (last / "uncertainty_thresholds_summary.csv").is_file():
        rep.table(pd.read_csv(last / "uncertainty_thresholds_summary.csv"))
    example = entropy_example(list(folders.values())[-3], demo.dataset / "imagesTs", demo.out / "entropy_example.png")
    if example:
        rep.figure(example, "Mean probability, normalized entropy and mutual information of 2 seeds x 2 folds x "
                            "MC-dropout samples")

    rep.heading("Per-image uncertainty scores against Dice")
    if last and (last / "score_scatter.png").is_file():
        rep.figure(last / "score_scatter.png", "Per-image scores of nnunet-kaz predict against Dice")
        rep.table(pd.read_csv(last / "score_correlations.csv"))

    rep.heading("Layer-wise Grad-CAM (paper 000 section 2.2)")
    rep.figure(gradcam, "Grad-CAM of the ablation-zone logits over the annotation, block by block")

    rep.heading("Training")
    manifest = json.loads((demo.results("XBoundNetTrainerSGDR_demo") / "fold_0" / "snapshots.json").read_text())
    rep.text(f"SGDR cycles end at epochs {manifest['cycle_ends']}; the top {manifest['top_k']} checkpoints of the "
             f"last {manifest['window']} epochs of each cycle by EMA pseudo-Dice were kept:")
    rep.table(pd.DataFrame(manifest["snapshots"]), digits=4)
    rep.figure(demo.results("XBoundNetTrainer_demo_seed0") / "fold_0" / "progress.png",
               "nnU-Net's training progress, seed 0, fold 0")
    rep.figure(demo.results("XBoundNetTrainerSGDR_demo") / "fold_0" / "progress.png",
               "SGDR run: learning rate with warm restarts")

    rep.heading("Commands run")
    rep.table(pd.DataFrame(demo.timings, columns=["command", "seconds"]), digits=1)
    rep.text(f"Everything is under {demo.out}: nnU-Net folders, predictions/ (one folder per method: "
             "segmentations, CASE.npz probabilities, CASE_uncertainty.npz, entropy images, scores.csv), "
             "comparison/, explain/, and predictions/*plus*/kaz_export/ (BMP masks at the original slice size).",
             "note")
    return rep.write(demo.out / "report.html")
