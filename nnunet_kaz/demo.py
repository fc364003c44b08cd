"""`nnunet-kaz demo` / `make demo`: the whole mission end to end on a generated KAZ-like phantom.

Every step runs the command a user would type (printed before it runs), inside OUT:
1. phantom KAZ slices as BMP folders (images/, masks/ = rough annotations, truth/ = true zones);
2. `nnunet-kaz convert-kaz` -> nnU-Net raw dataset, patient-wise splits, held-out test patients;
3. `nnUNetv2_plan_and_preprocess` (stock);
4. `nnUNetv2_train -tr XBoundNetTrainer_demo_seed{0,1}` on folds 0 and 1, and `-tr XBoundNetTrainerSGDR_demo_seed0`
   (two SGDR cycles, snapshots);
5. `nnunet-kaz predict` on the fold-0 validation patients with the fold-0 seed ensemble and MC dropout,
   `nnunet-kaz calibrate` on those probabilities (paper 000: calibrate the ensemble on its validation slices;
   logistic, and platt, temperature, isotonic for the side-by-side table) and `nnunet-kaz conformal fit` on the
   same uncalibrated probabilities (conformal risk control: expected false-negative rate of the ablation zone
   <= alpha = 0.1);
6. `nnunet-kaz predict` for each method: single model, fold ensemble, MC dropout, seed ensemble, SGDR
   snapshots, test-time augmentation (`--tta`: the 4 mirror flips as samples), 2 seeds x 2 folds x MC dropout,
   the fold-0 seed ensemble x MC (with `--conformal`: the conformal masks), and that calibrated and
   post-processed;
7. `nnunet-kaz compare` with `raters:` (metrics, ECE, reliability diagrams, uncertainty against error, scores
   against Dice, and NCC / ROI AUROC of each method's uncertainty map against where the annotation and the true
   zone disagree, in one table; 95 % intervals over the test patients, differences from the single model with
   Holm-adjusted Wilcoxon tests), and `nnunet-kaz compare` with `calibrations:` (the fold-0 seed ensemble x MC
   under no calibrator and the four calibrators, evaluated without predicting again);
8. `nnunet-kaz evaluate --conformal` for the fold-0 seed ensemble x MC (realised false-negative rate per case
   against alpha);
9. `nnunet-kaz explain` (layer-wise Grad-CAM of one test case);
10. the KiTS23 3D part: `nnunet-kaz phantom --kind kits3d --format kits23` (three raters per case) ->
   `nnunet-kaz convert-kits23 --regions` -> `nnunet-kaz splits` -> `nnunet-kaz plan -c 3d_fullres` ->
   `nnUNetv2_train ... -p nnUNetXBoundNetPlans -tr XBoundNetTrainer_demo_seed0` (fold 0) -> `nnunet-kaz predict --mc`
   on fold 0's validation cases -> `nnunet-kaz evaluate --kits23 --uncertainty --scores --raters` (region Dice and
   Surface Dice, failure detection, rater agreement);
11. paper 000 reproduced in miniature (`run_paper000`): `nnunet-kaz convert-kaz --nested --normalization
   rgb_to_0_1` of the same slices (every patient in the nested CV) -> `nnUNetv2_plan_and_preprocess` ->
   `nnunet-kaz nested-cv jobs` (2 seeds x outer folds 0 and 1 of 5) -> each job line, i.e. the stock
   `nnUNetv2_train ... -tr XBoundNetTrainerPaper_demo_seedS` -> `nnunet-kaz nested-cv evaluate` (per outer fold:
   calibration and conformal on val_k, test_k predicted by 2 seeds x MC, post-processed, evaluated; pooled Table 1);
12. `report.html`, self-contained.
OUT/nnUNet_raw, OUT/nnUNet_preprocessed and OUT/nnUNet_results are the nnU-Net folders. A step whose outputs
exist is skipped, so a second run reuses finished work (`--fresh` starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 501
NAME = "KazPhantom"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
CONFIG = "2d"
PLANS = "nnUNetPlans"
SEEDS = (0, 1)
FOLDS = (0, 1)
SGDR = "XBoundNetTrainerSGDR_demo_seed0"  # seeded, as every demo trainer: the same figures run after run
LABEL = "ablation_zone"  # the demo dataset.json's foreground label
ALPHA = 0.1  # conformal risk control: bound on the expected false-negative rate
CALIBRATORS = ("logistic", "platt", "temperature", "isotonic")  # logistic (paper 000's) is calibration.json
K23_ID = 503
K23_NAME = "KiTS23Phantom"
K23_DATASET = f"Dataset{K23_ID:03d}_{K23_NAME}"
K23_CONFIG = "3d_fullres"
K23_PLANS = "nnUNetXBoundNetPlans"
K23_TRAINER = "XBoundNetTrainer_demo_seed0"
NO_TTA = "--disable-tta"  # paper 000's inference (Keras) does not mirror; nnU-Net's and Rel-UNet's does
# paper 000 in miniature: its own dataset (nested splits, x / 255), 2 of the 5 outer folds, 2 seeds
P000_ID = 504
P000_NAME = "KazPhantomNested"
P000_DATASET = f"Dataset{P000_ID:03d}_{P000_NAME}"
P000_TRAINER = "XBoundNetTrainerPaper_demo"
P000_OUTER = (0, 1)


def seeded(seed: int) -> str:
    return f"XBoundNetTrainer_demo_seed{seed}"


def _bin(name: str) -> str:
    """nnU-Net's and our console scripts sit next to the running interpreter (the .venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Demo:
    def __init__(self, out: Path, n_patients: int, n_test: int, size: int, original: tuple[int, int], seed: int,
                 mc: int, k23_cases: int = 12, k23_size: tuple[int, int, int] = (16, 32, 32), k23_mc: int = 5):
        self.out = out.resolve()
        self.n_patients, self.n_test, self.size, self.original, self.seed, self.mc = \
            n_patients, n_test, size, original, seed, mc
        self.k23_cases, self.k23_size, self.k23_mc = k23_cases, tuple(k23_size), k23_mc
        self.raw = self.out / "nnUNet_raw"
        self.pre = self.out / "nnUNet_preprocessed"
        self.res = self.out / "nnUNet_results"
        self.dataset = self.raw / DATASET
        self.t0 = time.time()
        self.timings: list[tuple[str, float]] = []

    # --- plumbing -------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        from nnunet_kaz.paths import trainer_dir

        return dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                    nnUNet_results=str(self.res), nnUNet_extTrainer=str(trainer_dir()), nnUNet_compile="f",
                    nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0")

    def step(self, title: str, done: Path | None = None) -> bool:
        """Announce a step; return False (and say so) when `done` already exists."""
        elapsed = time.time() - self.t0
        if done is not None and done.exists():
            print(f"\n[{elapsed:5.0f}s] {title}: done before ({done.relative_to(self.out)}), reused", flush=True)
            return False
        print(f"\n[{elapsed:5.0f}s] {title}", flush=True)
        return True

    def run(self, cmd: list[str], quiet: bool = False, **env_overrides: str) -> None:
        print("  $ " + shlex.join(cmd), flush=True)
        start = time.time()
        proc = subprocess.run([_bin(cmd[0]), *cmd[1:]], env=dict(self.env, **env_overrides),
                              stdout=subprocess.DEVNULL if quiet else None)
        self.timings.append((shlex.join(cmd[:2]), time.time() - start))
        if proc.returncode != 0:
            raise SystemExit(f"demo: step failed (exit {proc.returncode}): {shlex.join(cmd)}")

    def results(self, trainer: str) -> Path:
        return self.res / DATASET / f"{trainer}__{PLANS}__{CONFIG}"

    def link_cases(self, cases: list[str], images: Path, folder: Path, ending: str) -> Path:
        """`folder` with symlinks {case}_0000{ending} -> images/{case}_0000{ending} (predict's input)."""
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = folder / f"{case}_0000{ending}"
            if not link.exists():
                link.symlink_to(images / f"{case}_0000{ending}")
        return folder

    # --- steps ----------------------------------------------------------------------------------------
    def make_data(self) -> None:
        bmp = self.out / "kaz_bmp"
        if self.step("1. Phantom KAZ slices as BMP folders (12 radial slices per patient)", bmp / "images"):
            self.run(["nnunet-kaz", "phantom", "--kind", "kaz2d", "--format", "bmp", "-o", str(bmp),
                      "-n", str(self.n_patients), "--seed", str(self.seed), "--size", *map(str, self.original)])
        if self.step("2. Convert to an nnU-Net dataset with patient-wise splits", self.dataset / "dataset.json"):
            self.run(["nnunet-kaz", "convert-kaz", "--images", str(bmp / "images"), "--masks", str(bmp / "masks"),
                      "--truth", str(bmp / "truth"), "-d", str(DATASET_ID), "--name", NAME,
                      "--resize", str(self.size), "--test-patients", str(self.n_test)])

    def plan(self) -> None:
        if self.step("3. Plan and preprocess (stock nnU-Net)", self.pre / DATASET / f"{PLANS}.json"):
            # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it must be >= 1 here
            self.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG, "-np", "2",
                      "--verify_dataset_integrity"], quiet=True, nnUNet_n_proc_DA="1")

    def train(self) -> None:
        for seed in SEEDS:
            for fold in FOLDS:
                done = self.results(seeded(seed)) / f"fold_{fold}" / "checkpoint_final.pth"
                if self.step(f"4. Train XBoundNet++ seed {seed}, fold {fold} on the CPU", done):
                    self.run(["nnUNetv2_train", str(DATASET_ID), CONFIG, str(fold), "-tr", seeded(seed),
                              "-device", "cpu"], quiet=True)
        done = self.results(SGDR) / "fold_0" / "checkpoint_final.pth"
        if self.step("4. Train XBoundNet++ with SGDR warm restarts and snapshots (fold 0)", done):
            self.run(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", SGDR, "-device", "cpu"], quiet=True)
        manifest = json.loads((self.results(SGDR) / "fold_0" / "snapshots.json").read_text())
        print("  snapshots kept (cycle, epoch, EMA pseudo-Dice, lr):")
        for s in manifest["snapshots"]:
            print(f"    c{s['cycle']} e{s['epoch']:>3}  {s['pseudo_dice']:.3f}  {s['lr']:.2e}  {s['file']}")

    def calibrate(self) -> Path:
        """Paper 000 section 2.3: fit the calibrator on the validation slices' raw predictions of the same
        ensemble it will calibrate (here the fold-0 seed ensemble with MC dropout)."""
        calib = self.out / "calibration.json"
        val_images = self.out / "validation_fold0" / "images"
        val_preds = self.out / "validation_fold0" / "predictions"
        if self.step("5. Predict the fold-0 validation patients with the fold-0 seed ensemble x MC dropout",
                     val_preds / "scores.csv"):
            splits = json.loads((self.pre / DATASET / "splits_final.json").read_text())
            self.link_cases(splits[0]["val"], self.dataset / "imagesTr", val_images, ".png")
            self.run(["nnunet-kaz", "predict", "-i", str(val_images), "-o", str(val_preds), *self.fold0_ensemble,
                      "-device", "cpu"])
        for method in CALIBRATORS:
            target = self.calibrator_file(method)
            if self.step(f"5. Fit {method} calibration on those validation probabilities", target):
                self.run(["nnunet-kaz", "calibrate", "--probs", str(val_preds), "--gt",
                          str(self.dataset / "labelsTr"), "-o", str(target), "--method", method])
        if self.step(f"5. Fit conformal risk control (expected FNR of {LABEL} <= {ALPHA}) on the same, uncalibrated, "
                     "validation probabilities", self.conformal_json):
            self.run(["nnunet-kaz", "conformal", "fit", "--probs", str(val_preds), "--gt",
                      str(self.dataset / "labelsTr"), "--label", LABEL, "--alpha", str(ALPHA), "-o",
                      str(self.conformal_json), "-q"])
        chain = self.out / "postprocessing.json"
        if not chain.exists():
            from nnunet_kaz.postprocessing import PostprocessingChain

            PostprocessingChain.paper000(size=list(self.original), threshold=0.4, radius_mm=1.0).save(chain)
        return calib

    def calibrator_file(self, method: str) -> Path:
        """calibration.json for paper 000's logistic calibrator (used by predict), calibration_METHOD.json else."""
        return self.out / ("calibration.json" if method == "logistic" else f"calibration_{method}.json")

    @property
    def conformal_json(self) -> Path:
        return self.out / "conformal.json"

    @property
    def conformal_method(self) -> str:
        """The method predicted with --conformal: the ensemble whose validation probabilities were fitted."""
        return f"2 seeds (fold 0) x MC {self.mc // 2}"

    @property
    def fold0_ensemble(self) -> list[str]:
        return ["-m", *(f"{self.results(seeded(s))}:0" for s in SEEDS), "--mc", str(self.mc // 2), NO_TTA]

    def methods(self) -> dict[str, list[str]]:
        """Method name -> `nnunet-kaz predict` arguments (members and options); the last two differ only by
        calibration and post-processing. Paper 000's methods predict without test-time mirroring (its Keras
        inference, `--disable-tta`); the SGDR snapshots mirror as Rel-UNet (paper 002) predicts with nnU-Net."""
        s0, s1, sgdr = self.results(seeded(0)), self.results(seeded(1)), self.results(SGDR)
        return {
            "single model": ["-m", f"{s0}:0", NO_TTA],
            "fold ensemble (2 folds)": ["-m", f"{s0}:0,1", NO_TTA],
            f"MC dropout ({self.mc} samples)": ["-m", f"{s0}:0", "--mc", str(self.mc), NO_TTA],
            "seed ensemble (2 seeds)": ["-m", f"{s0}:0", f"{s1}:0", NO_TTA],
            "SGDR snapshots": ["-m", f"{sgdr}:0:snapshots"],
            "test-time augmentation (4 flips)": ["-m", f"{s0}:0", "--tta"],
            f"2 seeds x 2 folds x MC {self.mc // 2}": ["-m", f"{s0}:0,1", f"{s1}:0,1", "--mc", str(self.mc // 2),
                                                       NO_TTA],
            self.conformal_method: [*self.fold0_ensemble, "--conformal", str(self.conformal_json)],
            "+ calibration + post-processing": [*self.fold0_ensemble, "--calibration",
                                                str(self.out / "calibration.json"), "--postprocessing",
                                                str(self.out / "postprocessing.json")],
        }

    def predict(self) -> dict[str, Path]:
        folders = {}
        for i, (name, args) in enumerate(self.methods().items()):
            folder = self.out / "predictions" / f"{i}_{name.split(' (')[0].replace(' ', '_').replace('+', 'plus')}"
            folders[name] = folder
            if self.step(f"6. Predict the held-out patients: {name}", folder / "scores.csv"):
                self.run(["nnunet-kaz", "predict", "-i", str(self.dataset / "imagesTs"), "-o", str(folder), *args,
                          "-device", "cpu"])
        return folders

    def compare(self, folders: dict[str, Path]) -> Path:
        import yaml

        out = self.out / "comparison"
        runs_yaml = self.out / "runs.yaml"
        # each run's own uncertainty maps (entropy of the uncalibrated samples' mean, paper 004's default), and
        # the raters' disagreement (convert-kaz's raterDisagreementTs/: the rough annotation vs the true zone)
        runs_yaml.write_text(yaml.safe_dump({
            "gt": str(self.dataset / "labelsTs"), "images": str(self.dataset / "imagesTs"), "figure_cases": 1,
            "raters": str(self.dataset / "raterDisagreementTs"),
            "runs": [{"label": name, "pred": str(folder), "uncertainty": str(folder)}
                     for name, folder in folders.items()]}, sort_keys=False))
        # done when the paired columns are there too (a comparison of an older demo run lacks them)
        if self.step("7. Compare the methods (metrics, calibration, uncertainty against error and against the "
                     "raters; intervals over patients, differences from the single model)",
                     out / "comparison.csv" if _has_column(out / "comparison.csv", "dice_mean_p_holm") else None):
            self.run(["nnunet-kaz", "compare", str(runs_yaml), "-o", str(out), "-q"], quiet=True)  # table below
        print((out / "comparison.md").read_text())
        import pandas as pd

        table = pd.read_csv(out / "comparison.csv").set_index("method")
        before, after = list(folders)[-2], list(folders)[-1]
        print(f"  ECE before -> after calibration (test patients): all pixels "
              f"{table.loc[before, 'ece_all']:.4f} -> {table.loc[after, 'ece_all']:.4f}, region of interest "
              f"{table.loc[before, 'ece_roi']:.4f} -> {table.loc[after, 'ece_roi']:.4f}")
        print("  rater agreement (mean over test slices):\n" + "\n".join(
            f"    {name:<34} NCC {r.ncc_raters:.3f}  ROI AUROC {r.roi_auroc_raters:.3f} (pooled "
            f"{r.roi_auroc_raters_pooled:.3f})" for name, r in table.iterrows()))
        return out

    @property
    def calibrator_comparison(self) -> Path:
        return self.out / "comparison_calibrators"

    def compare_calibrators(self, folders: dict[str, Path]) -> Path:
        """One prediction folder (the fold-0 seed ensemble x MC, uncalibrated) under no calibrator and each
        calibrator, evaluated without predicting again (`compare` with `calibrations:`)."""
        import yaml

        out = self.calibrator_comparison
        runs_yaml = self.out / "calibrators.yaml"
        folder = folders[self.conformal_method]
        cals = {"none": None, **{("logistic (paper 000)" if m == "logistic" else m): str(self.calibrator_file(m))
                                 for m in CALIBRATORS}}
        runs_yaml.write_text(yaml.safe_dump({
            "gt": str(self.dataset / "labelsTs"), "figure_cases": 0,
            "runs": [{"label": self.conformal_method, "pred": str(folder), "uncertainty": str(folder),
                      "calibrations": cals}]}, sort_keys=False))
        if self.step("7. Compare the calibrators on one prediction folder, without predicting again",
                     out / "comparison.csv"):
            self.run(["nnunet-kaz", "compare", str(runs_yaml), "-o", str(out), "-q"], quiet=True)
        print((out / "comparison.md").read_text())
        return out

    def evaluate_conformal(self, folders: dict[str, Path], comparison: Path) -> dict[str, Path]:
        """The conformal method's realised FNR (evaluate --conformal into evaluations/); returns each method's
        evaluate outputs under comparison/runs/ (its rater_agreement.csv among them) for the report."""
        slugs = json.loads((comparison / "comparison.json").read_text())["runs"]
        folder = folders[self.conformal_method]
        target = self.out / "evaluations" / folder.name
        if self.step(f"8. The conformal masks' realised FNR: {self.conformal_method}",
                     target / "conformal_summary.csv"):
            self.run(["nnunet-kaz", "evaluate", "--pred", str(folder), "--gt", str(self.dataset / "labelsTs"),
                      "--conformal", str(folder), "--figure-cases", "0", "-o", str(target), "-q"], quiet=True)
        return {name: comparison / "runs" / slugs[name] for name in folders}

    def explain(self) -> Path:
        image = sorted((self.dataset / "imagesTs").glob("*_0000.png"))[len(list((self.dataset / "imagesTs")
                                                                                  .glob("*_0000.png"))) // 2]
        out = self.out / "explain"
        grid = out / image.name.replace("_0000.png", "_gradcam.png")
        if self.step("9. Layer-wise Grad-CAM of one test case (seed 0, fold 0)", grid):
            self.run(["nnunet-kaz", "explain", "-i", str(image), "-m", f"{self.results(seeded(0))}:0", "-o", str(out),
                      "--target", "gt", "--gt", str(self.dataset / "labelsTs")])
        return grid

    # --- the KiTS23 3D part ---------------------------------------------------------------------------
    @property
    def k23_dataset(self) -> Path:
        return self.raw / K23_DATASET

    @property
    def k23_results(self) -> Path:
        return self.res / K23_DATASET / f"{K23_TRAINER}__{K23_PLANS}__{K23_CONFIG}"

    @property
    def k23_evaluation(self) -> Path:
        return self.out / "kits23" / "evaluation"

    def kits23(self) -> Path:
        """Phantom in the KiTS23 layout -> convert-kits23 --regions -> splits -> plan -> a tiny 3D XBoundNet++
        (stock nnUNetv2_train, fold 0) -> MC-dropout predictions of fold 0's validation cases -> evaluate
        --kits23 with the entropy maps against the raters' disagreement."""
        k23 = self.out / "kits23" / "raw"
        if self.step(f"10. KiTS23-layout phantom: {self.k23_cases} cases, three raters each", k23 / "case_00000"):
            self.run(["nnunet-kaz", "phantom", "--kind", "kits3d", "--format", "kits23", "-n", str(self.k23_cases),
                      "--size", *map(str, self.k23_size), "--seed", str(self.seed), "-o", str(k23)])
        if self.step("10. Convert to a region-based nnU-Net dataset (kidney+masses, masses, tumour)",
                     self.k23_dataset / "dataset.json"):
            self.run(["nnunet-kaz", "convert-kits23", "--kits", str(k23), "-d", str(K23_ID), "--name", K23_NAME,
                      "--regions"])
        splits_file = self.pre / K23_DATASET / "splits_final.json"
        if self.step("10. Patient-wise splits (2 folds)", splits_file):
            self.run(["nnunet-kaz", "splits", "-d", str(K23_ID), "--folds", "2", "--pattern", r"(?P<patient>case_\d+)"])
        if self.step("10. Plan (XBoundNetPlanner) and preprocess 3d_fullres",
                     self.pre / K23_DATASET / f"{K23_PLANS}.json"):
            self.run(["nnunet-kaz", "plan", "-d", str(K23_ID), "-c", K23_CONFIG, "-np", "1"], quiet=True,
                     nnUNet_n_proc_DA="1")
        done = self.k23_results / "fold_0" / "checkpoint_final.pth"
        if self.step("10. Train a tiny 3D XBoundNet++ (fold 0, stock nnUNetv2_train) on the CPU", done):
            self.run(["nnUNetv2_train", str(K23_ID), K23_CONFIG, "0", "-p", K23_PLANS, "-tr", K23_TRAINER,
                      "-device", "cpu"], quiet=True)
        losses = training_losses(self.k23_results / "fold_0")
        print(f"  training losses (first, last epoch): {losses[0]:.4f}, {losses[-1]:.4f}; all finite: "
              f"{all(map(__import__('math').isfinite, losses))}" if losses else "  (no losses in the training log)")
        val_images = self.out / "kits23" / "validation_fold0" / "images"
        preds = self.out / "kits23" / "validation_fold0" / "predictions"
        if self.step(f"10. Predict fold 0's validation cases with MC dropout ({self.k23_mc} samples)",
                     preds / "scores.csv"):
            splits = json.loads(splits_file.read_text())
            self.link_cases(splits[0]["val"], self.k23_dataset / "imagesTr", val_images, ".nii.gz")
            self.run(["nnunet-kaz", "predict", "-i", str(val_images), "-o", str(preds), "-m",
                      f"{self.k23_results}:0", "--mc", str(self.k23_mc), NO_TTA, "-device", "cpu"])
        out = self.k23_evaluation
        if self.step("10. Evaluate: KiTS23 region Dice / Surface Dice, failure detection, rater agreement",
                     out / "kits23_summary.csv"):
            self.run(["nnunet-kaz", "evaluate", "--pred", str(preds), "--gt", str(self.k23_dataset / "labelsTr"),
                      "--pred-subset", "--kits23", "--uncertainty", str(preds), "--scores", str(preds / "scores.csv"),
                      "--raters", str(self.k23_dataset / "raterDisagreementTr"),
                      "--figure-cases", "0", "-o", str(out), "-q"], quiet=True)
        import pandas as pd

        print("  KiTS23 regions (fold-0 validation cases):")
        print(pd.read_csv(out / "kits23_summary.csv").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        from nnunet_kaz.demo_report import rater_summary

        r = rater_summary(out)
        print(f"  rater agreement (entropy vs the raters' disagreement): NCC {r['mean_ncc']:.3f}, ROI AUROC "
              f"{r['mean_roi_auroc']:.3f} (pooled {r.get('pooled_roi_auroc', float('nan')):.3f}) over "
              f"{r['n_cases']} cases")
        return out

    # --- paper 000 in miniature ----------------------------------------------------------------------------
    @property
    def p000(self) -> Path:
        return self.out / "paper000"

    def run_paper000(self) -> Path:
        """Paper 000's nested protocol with its training recipe, in miniature (module docstring, step 11): the
        commands of the README's "Reproduce paper 000" on the phantom's slices."""
        bmp, dataset = self.out / "kaz_bmp", self.raw / P000_DATASET
        if self.step("11. Paper 000 in miniature: the slices again, splits_final.json = the nested CV's outer folds "
                     "(64/16/20 % of the patients), pixel values x / 255", dataset / "dataset.json"):
            self.run(["nnunet-kaz", "convert-kaz", "--images", str(bmp / "images"), "--masks", str(bmp / "masks"),
                      "-d", str(P000_ID), "--name", P000_NAME, "--resize", str(self.size), "--nested",
                      "--normalization", "rgb_to_0_1"])
        if self.step("11. Plan and preprocess (stock nnU-Net)", self.pre / P000_DATASET / f"{PLANS}.json"):
            self.run(["nnUNetv2_plan_and_preprocess", "-d", str(P000_ID), "-c", CONFIG, "-np", "2"], quiet=True,
                     nnUNet_n_proc_DA="1")
        common = ["-d", str(P000_ID), "-tr", P000_TRAINER, "--seeds", ",".join(map(str, SEEDS)),
                  "--outer-folds", ",".join(map(str, P000_OUTER))]
        jobs = self.p000 / "train_jobs.txt"
        if self.step("11. The training job list (also as a Slurm array: paper000/train_array.sbatch)", jobs):
            self.run(["nnunet-kaz", "nested-cv", "jobs", *common, "-device", "cpu", "-o", str(self.p000)],
                     quiet=True)
        for line in jobs.read_text().splitlines():
            cmd = shlex.split(line)
            fold, trainer = cmd[3], cmd[cmd.index("-tr") + 1]
            done = self.res / P000_DATASET / f"{trainer}__{PLANS}__{CONFIG}" / f"fold_{fold}" / "checkpoint_final.pth"
            if self.step(f"11. Train outer fold {fold} with paper 000's recipe ({trainer}, epochs = passes over the "
                         "training slices)", done):
                self.run(cmd, quiet=True)
        evaluation = self.p000 / "evaluation"
        if self.step("11. Per outer fold: predict val_k, calibrate, conformal, predict test_k (2 seeds x MC, no "
                     "mirroring), post-process, evaluate; pooled Table 1", evaluation / "table1.csv"):
            self.run(["nnunet-kaz", "nested-cv", "evaluate", *common, "--mc", str(self.mc // 2), "--postprocessing",
                      str(self.out / "postprocessing.json"), "-device", "cpu", "-q", "-o", str(evaluation)],
                     quiet=True)
        print((evaluation / "table1.md").read_text())
        return evaluation

    def report(self, folders: dict[str, Path], comparison: Path, gradcam: Path,
               evaluations: dict[str, Path]) -> Path:
        from nnunet_kaz.demo_report import build_report

        return build_report(self, folders, comparison, gradcam, evaluations)

    def run_all(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.make_data()
        self.plan()
        self.train()
        self.calibrate()
        folders = self.predict()
        comparison = self.compare(folders)
        self.compare_calibrators(folders)
        evaluations = self.evaluate_conformal(folders, comparison)
        from nnunet_kaz.demo_report import conformal_table

        fnr = conformal_table(folders[self.conformal_method], self.dataset / "labelsTs", LABEL)
        print(f"  conformal masks ({self.conformal_method}): realised mean FNR {fnr['fnr'].mean():.4f} vs alpha "
              f"{ALPHA} over {len(fnr)} test slices; mask / segmentation {fnr['mask_vs_segmentation'].mean():.2f}, "
              f"mask / ground truth {fnr['mask_vs_gt'].mean():.2f} (means over slices)")
        gradcam = self.explain()
        self.kits23()
        self.run_paper000()
        self.step("12. Write the report")
        report = self.report(folders, comparison, gradcam, evaluations)
        print(f"\nDemo finished in {time.time() - self.t0:.0f}s. Report: {report}")
        return report


def _has_column(csv: Path, column: str) -> bool:
    """Whether `csv` exists and its header names `column` (an output of an older version may lack it)."""
    try:
        with open(csv) as f:
            return column in f.readline().strip().split(",")
    except OSError:
        return False


def training_losses(fold_dir: Path) -> list[float]:
    """Every epoch's train_loss from nnU-Net's training log (lines 'train_loss VALUE')."""
    import re

    losses = []
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        losses += [float(m) for m in re.findall(r"train_loss (\S+)", log.read_text())]
    return losses


def _demo(args: argparse.Namespace) -> int:
    if args.fresh and args.o.exists():
        shutil.rmtree(args.o)
    Demo(args.o, args.patients, args.test_patients, args.size, tuple(args.original), args.seed, args.mc,
         args.kits_cases, tuple(args.kits_size), args.kits_mc).run_all()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole job on a generated phantom (what `make demo` runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    p.add_argument("--patients", type=int, default=14, help="phantom patients, 12 radial slices each (default 14)")
    p.add_argument("--test-patients", type=int, default=3, help="of which held out for testing (default 3)")
    p.add_argument("--size", type=int, default=48, help="network input size in pixels (default 48)")
    p.add_argument("--original", type=int, nargs=2, default=(170, 262), metavar=("H", "W"),
                   help="phantom slice size before resizing, exported back to it (default 170 262)")
    p.add_argument("--mc", type=int, default=10, help="MC-dropout samples of the MC method (default 10)")
    p.add_argument("--kits-cases", type=int, default=12, help="cases of the KiTS23 3D phantom (default 12)")
    p.add_argument("--kits-size", type=int, nargs=3, default=(16, 32, 32), metavar=("Z", "Y", "X"),
                   help="KiTS23 phantom volume size (default 16 32 32)")
    p.add_argument("--kits-mc", type=int, default=5, help="MC-dropout samples of the 3D predictions (default 5)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing finished steps")
    p.set_defaults(func=_demo)
