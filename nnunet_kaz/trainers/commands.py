"""`nnunet-kaz trainer-dir` (where nnU-Net finds our trainers) and `nnunet-kaz train-ensemble`."""
from __future__ import annotations

import argparse


def _trainer_dir(args: argparse.Namespace) -> int:
    from nnunet_kaz.paths import trainer_dir

    print(trainer_dir())
    return 0


def _train_ensemble(args: argparse.Namespace) -> int:
    from nnunet_kaz.trainers.ensemble import check_training_inputs, ensemble_commands, parse_range, run_commands

    extra = ["--c"] if args.c else []
    commands = ensemble_commands(args.d, args.c_config, args.tr, parse_range(args.seeds), parse_range(args.folds),
                                 args.p, args.device, extra)
    if not args.dry_run:  # a dry run may print commands for another machine's data
        check_training_inputs(args.d, args.c_config, args.p)
    return run_commands(commands, args.dry_run)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trainer-dir", help="print the folder for nnUNet_extTrainer",
                       description="Print the folder to export as nnUNet_extTrainer, so the stock nnUNetv2_train "
                                   "and nnUNetv2_predict find XBoundNetTrainer and its variants: "
                                   "export nnUNet_extTrainer=$(nnunet-kaz trainer-dir)")
    p.set_defaults(func=_trainer_dir)

    p = sub.add_parser("train-ensemble", help="train a seeds x folds grid with nnUNetv2_train",
                       description="Run nnUNetv2_train for every seed and fold (seed s uses TRAINER_seed{s}), one "
                                   "after another, or print the commands for a cluster job array (--dry-run).")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", dest="c_config", required=True, help="configuration, e.g. 2d")
    p.add_argument("-tr", default="XBoundNetTrainer", help="trainer with seed variants (default XBoundNetTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,2 (default 0-4)")
    p.add_argument("--folds", default="0-4", help="folds, e.g. 0-4 (default 0-4)")
    p.add_argument("-device", "--device", default="cuda", help="passed to nnUNetv2_train: cuda, cpu or mps "
                                                               "(default cuda, nnU-Net's)")
    p.add_argument("--c", action="store_true", help="continue runs from their latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.set_defaults(func=_train_ensemble)
