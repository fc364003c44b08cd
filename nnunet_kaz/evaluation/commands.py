"""Sub-commands `evaluate` and `compare` of `nnunet-kaz`."""
from __future__ import annotations

import argparse
from pathlib import Path


def _evaluate(args: argparse.Namespace) -> int:
    from nnunet_kaz.evaluation.evaluate import EvaluationSettings, evaluate_folder, report

    settings = EvaluationSettings(labels=args.labels, n_bins=args.n_bins, roi_margin=args.roi_margin,
                                  entropy_scaling=args.entropy_scaling, figure_cases=args.figure_cases,
                                  pred_subset=args.pred_subset, uncertainty_pattern=args.uncertainty_pattern,
                                  uncertainty_key=args.uncertainty_key, probs_entropy=args.probs_entropy,
                                  allow_undeclared_labels=args.allow_undeclared_labels,
                                  kits23=args.kits23, nsd_tolerance=args.nsd_tolerance, bootstrap=args.bootstrap,
                                  bootstrap_seed=args.bootstrap_seed, patient_pattern=args.patient_pattern)
    result = evaluate_folder(args.pred, args.gt, args.o, args.probs, settings, args.images, args.uncertainty,
                             args.scores, progress=not args.quiet, raters_dir=args.raters,
                             conformal_dir=args.conformal, calibration=args.calibration)
    print(report(result))
    print(f"wrote {args.o}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from nnunet_kaz.evaluation.compare import compare_runs

    compare_runs(args.runs, args.o, progress=not args.quiet, reference=args.reference, bootstrap=args.bootstrap)
    print((args.o / "comparison.md").read_text())
    print(f"wrote {args.o}")
    return 0


def _add_bootstrap(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--bootstrap", type=int, default=default, metavar="N",
                   help="patient-level bootstrap resamples of the 95 %% intervals (percentile method; a patient's "
                        "cases are drawn together; 0: no intervals)" + (" (default 2000)" if default else
                                                                         " (default: RUNS.yaml's, else 2000)"))


def register(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz import cli_options as o

    p = sub.add_parser(
        "evaluate", help="overlap/surface metrics, calibration, uncertainty-vs-error of a prediction folder",
        description="Evaluate segmentations {case}{ending} (nnU-Net's or this project's prediction folder) "
                    "against ground truth with the same names. Writes metrics.csv (dice, jaccard, precision, "
                    "recall, specificity, rvd, hd, hd95, assd, mad, msd; distances in the images' spacing unit) "
                    "and summary.csv; with --probs ({case}.npz, key 'probabilities') also calibration.csv "
                    "(ECE, adaptive ECE, MCE, Brier; scopes all and roi) and reliability diagrams; with "
                    "uncertainty maps (CASE_uncertainty.npz of nnunet-kaz predict, read whenever it sits next to "
                    "the predictions, or --uncertainty; or --probs-entropy) the uncertainty threshold analysis "
                    "(T = 100/75/50/25) and the AUROC of voxel uncertainty for voxel errors; with --scores the Spearman correlation of per-image scores with Dice. "
                    "For KiTS23 datasets kits23.csv (region Dice and Surface Dice); failure_detection.csv (AURC, "
                    "E-AURC, AUGRC of every score and uncertainty aggregation); --nsd-tolerance adds nsd to "
                    "metrics.csv; --raters adds rater_agreement.csv (NCC, ROI AUROC). Every mean (summary.csv), "
                    "calibration row and failure-detection row gets a 95 % interval over patients (KAZ slices "
                    "grouped by patient as the splits group them: kaz_meta.json or --patient-pattern; 3D cases each "
                    "their own patient), written with the grouping into evaluation.json.")
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted segmentations")
    o.add_gt(p, required=True, help="folder of ground-truth segmentations (e.g. labelsTs)")
    o.add_probs(p, help="folder of {case}.npz probabilities (nnU-Net --save_probabilities or nnunet-kaz "
                        "predict); often the same as --pred")
    p.add_argument("--labels", type=int, nargs="+", help="foreground labels to evaluate (default: dataset.json's, "
                                                         "else every label found)")
    o.add_output(p, help="output folder (created; replaced if it holds an earlier evaluation)")
    p.add_argument("--n-bins", type=int, default=15, help="calibration bins (default 15)")
    p.add_argument("--roi-margin", type=float, default=5.0,
                   help="roi scope: voxels within this distance (mm; pixels for PNG/BMP) of ground truth or "
                        "prediction (default 5)")
    p.add_argument("--uncertainty", type=Path,
                   help="folder of uncertainty maps (default: the --pred folder when it holds them, as nnunet-kaz "
                        "predict writes CASE_uncertainty.npz: the entropy of the uncalibrated samples)")
    p.add_argument("--probs-entropy", action="store_true",
                   help="use the normalized entropy of the --probs probabilities as the uncertainty (named "
                        "probs_entropy in the outputs; of calibrated probabilities when they were calibrated)")
    p.add_argument("--uncertainty-pattern", default="{case}_uncertainty.npz",
                   help="file name of a case's uncertainty map in --uncertainty (default {case}_uncertainty.npz)")
    p.add_argument("--uncertainty-key", default="entropy", help="array in an .npz uncertainty file "
                                                                "(default entropy; or mutual_information, variance)")
    p.add_argument("--entropy-scaling", choices=("slice", "case", "absolute"), default="slice",
                   help="0..100 scaling for the thresholds: 100 U / max U per 2D slice (paper 000's authors, "
                        "default), over the whole case, or 100 U")
    p.add_argument("--images", type=Path, help="images folder ({case}_0000{ending}) for the figures' image panel")
    p.add_argument("--figure-cases", type=int, default=3, help="uncertainty figures for the first N cases "
                                                               "(default 3; 0 for none)")
    p.add_argument("--scores", type=Path, help="per-image scores.csv of nnunet-kaz predict: Spearman vs Dice")
    p.add_argument("--pred-subset", action="store_true",
                   help="evaluate only the predicted cases (default: every ground-truth case must be predicted)")
    p.add_argument("--allow-undeclared-labels", action="store_true",
                   help="a ground-truth label that dataset.json does not declare is a warning naming the label and "
                        "case, not an error (default: error)")
    p.add_argument("--kits23", action=argparse.BooleanOptionalAction, default=None,
                   help="KiTS23 regions kidney_and_mass / mass / tumor: Dice and Surface Dice at the challenge's "
                        "tolerances in kits23.csv (default: on when dataset.json has KiTS23's labels or regions)")
    p.add_argument("--nsd-tolerance", nargs="+", metavar="[LABEL:]MM",
                   help="normalised surface Dice at this tolerance (mm; pixels for PNG/BMP) as column nsd of "
                        "metrics.csv; LABEL:MM for one label, e.g. --nsd-tolerance 2 1:1.5")
    p.add_argument("--conformal", type=Path, metavar="DIR",
                   help="folder of `nnunet-kaz predict --conformal` outputs (conformal.json, "
                        "CASE_conformal_LABEL.ext): conformal.csv / conformal_summary.csv with each case's realised "
                        "false-negative rate, the mean against alpha, and the masks' size against the segmentation "
                        "and the ground truth")
    p.add_argument("--raters", type=Path, metavar="DIR",
                   help="folder of per-case rater-disagreement maps {case}{ending} (convert-kits23's "
                        "raterDisagreementTr/): NCC and ROI AUROC of the uncertainty against them")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="calibrator of `nnunet-kaz calibrate` applied to the --probs probabilities on the fly (which "
                        "must be uncalibrated); the segmentation is then their argmax: a calibrator evaluated "
                        "without predicting again")
    _add_bootstrap(p, 2000)
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--patient-pattern", metavar="REGEX",
                   help="regex with a group (?P<patient>...) on the case names: the resampling unit of the "
                        "intervals (default: kaz_meta.json next to --gt, else the splits' default for 2D names "
                        "like KAZ_P003_a045, else each case its own patient)")
    o.add_quiet(p)
    p.set_defaults(func=_evaluate)

    c = sub.add_parser(
        "compare", help="one table comparing methods (Dice, HD95, ECE, Brier, AUROC, AURC, Spearman, raters)",
        description="Evaluate several prediction folders against the same ground truth and write "
                    "comparison.csv / comparison.md, overlaid reliability diagrams and each run's evaluation. "
                    "RUNS.yaml: 'gt: DIR' and 'runs:' a list of {label: NAME, pred: DIR} with optional probs, "
                    "uncertainty, scores, and calibration: FILE or calibrations: {NAME: FILE or null} (one "
                    "folder of uncalibrated probabilities evaluated under several calibrators without predicting "
                    "again); optional top-level labels, n_bins, roi_margin, images, figure_cases, "
                    "pred_subset, raters (rater-disagreement maps: each run's NCC and ROI AUROC against them), "
                    "reference, bootstrap, bootstrap_seed, patient_pattern. Every figure gets a 95 % interval "
                    "over patients and, against the reference run, its difference with an interval and a "
                    "Holm-adjusted Wilcoxon p over patients. See nnunet_kaz/evaluation/compare.py.")
    c.add_argument("runs", type=Path, metavar="RUNS.yaml")
    c.add_argument("--reference", metavar="LABEL",
                   help="the run the others are compared with (default: RUNS.yaml's reference, else the first run)")
    _add_bootstrap(c, None)
    o.add_output(c)
    o.add_quiet(c)
    c.set_defaults(func=_compare)
