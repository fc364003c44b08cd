"""`nnunet-kaz trainer-dir`: where nnU-Net finds this package's trainers."""
from __future__ import annotations

import argparse


def _trainer_dir(args: argparse.Namespace) -> int:
    from nnunet_kaz.paths import trainer_dir

    print(trainer_dir())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trainer-dir", help="print the folder for nnUNet_extTrainer",
                       description="Print the folder to export as nnUNet_extTrainer, so the stock nnUNetv2_train "
                                   "and nnUNetv2_predict find XBoundNetTrainer and its variants: "
                                   "export nnUNet_extTrainer=$(nnunet-kaz trainer-dir)")
    p.set_defaults(func=_trainer_dir)
