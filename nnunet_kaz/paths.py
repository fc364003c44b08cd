"""Where things are: the trainer folder for `nnUNet_extTrainer`, and nnU-Net's folder variables checked early."""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_kaz.errors import KazError

TRAINER_DIR = Path(__file__).resolve().parent / "trainer_dir"


def trainer_dir() -> Path:
    """The folder to export as `nnUNet_extTrainer`: one module there re-exports every trainer of nnunet_kaz.

    nnU-Net imports the modules of that folder as top-level names, so it must not be the package itself.
    """
    return TRAINER_DIR


def nnunet_folder(variable: str) -> Path:
    """The folder named by one of nnU-Net's variables (nnUNet_raw, nnUNet_preprocessed, nnUNet_results)."""
    value = os.environ.get(variable)
    if not value:
        raise KazError(f"environment variable {variable} is not set; nnU-Net needs nnUNet_raw, "
                       f"nnUNet_preprocessed and nnUNet_results (see nnU-Net's setting_up_paths.md)")
    return Path(value)
