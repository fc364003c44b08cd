"""Fingerprint, plan with XBoundNetPlanner, and preprocess: `nnunet-kaz plan`."""
from __future__ import annotations

import json
from typing import Sequence

from nnunet_kaz.errors import KazError
from nnunet_kaz.paths import nnunet_folder


def resolve_dataset_name(dataset_id: int | str) -> str:
    """`DatasetXXX_Name` for an id, with a clear error when nnUNet_raw holds no such dataset or no labels."""
    raw = nnunet_folder("nnUNet_raw")
    nnunet_folder("nnUNet_preprocessed")
    try:
        dataset_id = int(dataset_id)
    except ValueError:
        raise KazError(f"dataset id must be an integer (e.g. 501), got {dataset_id!r}") from None
    matches = sorted(p.name for p in raw.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
    if not matches:
        raise KazError(f"no dataset with id {dataset_id} in nnUNet_raw={raw} (expected a folder "
                       f"Dataset{dataset_id:03d}_NAME)")
    if len(matches) > 1:
        raise KazError(f"dataset id {dataset_id} is ambiguous in {raw}: {matches}")
    folder = raw / matches[0]
    if not (folder / "dataset.json").is_file():
        raise KazError(f"{folder} has no dataset.json")
    labels = folder / "labelsTr"
    if not labels.is_dir() or not any(labels.iterdir()):
        raise KazError(f"{folder} has no labels (labelsTr is missing or empty); nnU-Net trains on labelled cases")
    labels_json = json.loads((folder / "dataset.json").read_text()).get("labels", {})
    if len(labels_json) < 2:
        raise KazError(f"{folder / 'dataset.json'} declares no foreground label: {labels_json}")
    return matches[0]


def run_planning(dataset_id: int, configurations: Sequence[str] = ("2d",), num_processes: int = 2,
                 verify_dataset_integrity: bool = False, clean: bool = False,
                 gpu_memory_target_in_gb: float | None = None) -> str:
    """Run nnU-Net's fingerprint extraction, XBoundNetPlanner and preprocessing; return the plans name."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiment_dataset,
        preprocess,
    )

    from nnunet_kaz.planners.xboundnet_planner import XBoundNetPlanner

    resolve_dataset_name(dataset_id)
    if num_processes < 1:  # nnU-Net's planner calls torch.set_num_threads(n), which rejects 0
        raise KazError(f"num_processes must be >= 1, got {num_processes}")
    extract_fingerprints([dataset_id], num_processes=num_processes,
                         check_dataset_integrity=verify_dataset_integrity, clean=clean, verbose=False)
    _, plans_name = plan_experiment_dataset(dataset_id, XBoundNetPlanner, gpu_memory_target_in_gb)
    preprocess([dataset_id], plans_name, list(configurations), [num_processes] * len(configurations))
    return plans_name
