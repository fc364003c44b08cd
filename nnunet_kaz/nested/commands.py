"""`nnunet-kaz nested-cv jobs | evaluate | table1`: paper 000's nested cross-validation on nnU-Net's commands."""
from __future__ import annotations

import argparse
from pathlib import Path


def _outer_folds(text: str | None, n_outer: int) -> list[int]:
    from nnunet_kaz.errors import KazError
    from nnunet_kaz.trainers.ensemble import parse_range

    folds = list(range(n_outer)) if text is None else parse_range(text)
    bad = [k for k in folds if not 0 <= k < n_outer]
    if bad:
        raise KazError(f"outer fold(s) {bad} do not exist; the nested CV has {n_outer} (--outer-folds)")
    return folds


def _jobs(args: argparse.Namespace) -> int:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_kaz.datasets.splits import read_nested_cv
    from nnunet_kaz.nested.jobs import write_jobs
    from nnunet_kaz.paths import nnunet_folder
    from nnunet_kaz.trainers.ensemble import check_training_inputs, ensemble_commands, parse_range

    check_training_inputs(args.d, args.c_config, args.p)
    name = maybe_convert_to_dataset_name(args.d)
    nested = read_nested_cv(nnunet_folder("nnUNet_preprocessed") / name, require_installed=True)
    folds, seeds = _outer_folds(args.outer_folds, len(nested["folds"])), parse_range(args.seeds)
    train = ensemble_commands(args.d, args.c_config, args.tr, seeds, folds, args.p, args.device)
    evaluate = ["nnunet-kaz", "nested-cv", "evaluate", "-d", str(args.d), "-c", args.c_config, "-tr", args.tr,
                "--seeds", ",".join(map(str, seeds)), "--outer-folds", ",".join(map(str, folds)), "-p", args.p,
                "--mc", str(args.mc), "-o", str(Path(args.o).resolve() / "evaluation")]
    paths = write_jobs(args.o, train, evaluate, f"nested_{name}", args.sbatch)
    print(paths["jobs"].read_text(), end="")
    print(f"wrote {len(train)} training jobs to {paths['jobs']}, the Slurm array {paths['array']} and the evaluation "
          f"{paths['evaluate']}:\n  sbatch --dependency=afterok:$(sbatch --parsable {paths['array']}) "
          f"{paths['evaluate']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from nnunet_kaz.nested.protocol import NestedSettings, prepare, run
    from nnunet_kaz.trainers.ensemble import parse_range

    settings = NestedSettings(args.d, args.c_config, args.tr, parse_range(args.seeds),
                              parse_range(args.outer_folds) if args.outer_folds else None, args.p, args.mc,
                              args.mc_batch, args.device, args.seed, None if args.no_conformal else args.alpha,
                              args.calibration_method, str(args.postprocessing) if args.postprocessing else None,
                              not args.no_single_model)
    proto = prepare(settings, args.o)
    run(proto, progress=not args.quiet)
    print((args.o / "table1.md").read_text())
    print(f"wrote {args.o} (per outer fold fold_K/, pooled/, table1.csv, table1.md)")
    return 0


def _table1(args: argparse.Namespace) -> int:
    from nnunet_kaz.errors import KazError
    from nnunet_kaz.evaluation.table1 import table1_from_evaluations

    evaluations = {}
    for item in args.evaluations:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise KazError(f"{item!r}: give NAME=EVALUATION_DIR")
        if name in evaluations:
            raise KazError(f"method name {name!r} given twice")
        evaluations[name] = Path(folder)
    table1_from_evaluations(evaluations, args.o)
    print((args.o / "table1.md").read_text())
    print(f"wrote {args.o}/table1.csv, table1.md")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", dest="c_config", default="2d", help="configuration (default 2d)")
    p.add_argument("-tr", default="XBoundNetTrainerPaper", help="trainer with seed variants TRAINER_seedS "
                                                                "(default XBoundNetTrainerPaper: paper 000's recipe)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 (default; paper 000: five per outer fold)")
    p.add_argument("--outer-folds", default=None, help="outer folds, e.g. 0-4 or 0,1 (default: all)")
    p.add_argument("--mc", type=int, default=50, help="MC-dropout samples per member (default 50: 5 x 50 = 250 "
                                                      "predictions per slice)")


def register(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz import cli_options as o

    p = sub.add_parser("nested-cv", help="paper 000's nested CV: training job list, per-fold evaluation, Table 1",
                       description="Paper 000's nested patient-wise cross-validation (sections 2.3, 3.1) with "
                                   "nnU-Net's own commands. After `nnunet-kaz splits -d D --nested` (or convert-kaz "
                                   "--nested) nnU-Net fold k is outer fold k: `jobs` writes the nnUNetv2_train runs "
                                   "(seeds x outer folds) as a list and a Slurm array; `evaluate` predicts, "
                                   "calibrates, post-processes and evaluates every outer fold's test patients with "
                                   "that fold's members and pools them into Table 1; `table1` joins evaluations.")
    steps = p.add_subparsers(dest="nested_command", metavar="STEP", required=True)

    j = steps.add_parser("jobs", help="the nnUNetv2_train runs as train_jobs.txt and a Slurm array script",
                         description="One `nnUNetv2_train D C k -tr TRAINER_seedS` per seed S and outer fold k "
                                     "(train_jobs.txt, printed too), train_array.sbatch (task i runs line i + 1) and "
                                     "evaluate.sbatch (nested-cv evaluate, to run after the array). Checks that "
                                     "splits_final.json holds the nested folds.")
    _common(j)
    j.add_argument("-device", "--device", default="cuda", help="nnUNetv2_train's device (default cuda)")
    j.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH line, e.g. --sbatch=--partition=gpu --sbatch=--time=24:00:00 (repeatable)")
    o.add_output(j, "folder for train_jobs.txt, train_array.sbatch, evaluate.sbatch and logs/")
    j.set_defaults(func=_jobs)

    e = steps.add_parser("evaluate", help="per outer fold: predict val, calibrate, conformal, predict test, evaluate; "
                                          "then pooled evaluation and Table 1",
                         description="For every outer fold k: predict val_k with the S members (TRAINER_seedS, fold "
                                     "k) x --mc samples (no mirroring, as paper 000), fit logistic calibration on "
                                     "them and conformal risk control on the calibrated ones, predict test_k "
                                     "calibrated and post-processed (paper 000's chain) with the conformal masks, "
                                     "evaluate; then one evaluation pooled over the outer folds' test slices and "
                                     "Table 1 (table1.csv, table1.md: precision, recall, DSC, Jaccard, MAD, MSD, HD "
                                     "as mean +- SD over test slices). Also the first seed's single model (no MC) "
                                     "unless --no-single-model. A rerun reuses finished steps.")
    _common(e)
    e.add_argument("--mc-batch", type=int, default=None, help="MC samples per forward pass (predict's --mc-batch)")
    e.add_argument("--alpha", type=float, default=0.1, help="conformal bound on the expected FNR (default 0.1)")
    e.add_argument("--no-conformal", action="store_true", help="skip the conformal fit and masks")
    e.add_argument("--calibration-method", default="logistic",
                   choices=("logistic", "platt", "temperature", "isotonic"),
                   help="calibrator fitted on val_k (default logistic: paper 000)")
    e.add_argument("--postprocessing", type=Path, help="post-processing chain JSON (default: paper 000's, resized "
                                                       "to the original slice size for the BMP export when "
                                                       "kaz_meta.json gives one size)")
    e.add_argument("--no-single-model", action="store_true", help="evaluate the ensemble only")
    o.add_seed(e, "of the MC-dropout masks")
    o.add_device(e)
    o.add_output(e, "output folder (fold_K/, pooled/, table1.csv, table1.md)")
    o.add_quiet(e)
    e.set_defaults(func=_evaluate)

    t = steps.add_parser("table1", help="Table 1 of several evaluate outputs (one row per method)",
                         description="Paper 000's Table 1 (precision, recall, DSC, Jaccard, MAD, MSD, HD as mean +- SD "
                                     "over the slices of each evaluation's metrics.csv) with one row per NAME.")
    t.add_argument("evaluations", nargs="+", metavar="NAME=EVALUATION_DIR")
    o.add_output(t, "folder for table1.csv, table1.md")
    t.set_defaults(func=_table1)
