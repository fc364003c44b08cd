"""Fingerprint, plan with XBoundNetPlanner, and preprocess: `nnunet-kaz plan`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
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

    name = resolve_dataset_name(dataset_id)
    if num_processes < 1:  # nnU-Net's planner calls torch.set_num_threads(n), which rejects 0
        raise KazError(f"num_processes must be >= 1, got {num_processes}")
    raw = nnunet_folder("nnUNet_raw") / name
    check_raw_dataset(raw)
    if verify_dataset_integrity:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity as verify

        try:
            verify(str(raw), num_processes)
        except (RuntimeError, AssertionError) as e:
            raise KazError(f"nnU-Net's integrity check of {raw} failed: {e}") from None
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects the valid setting 0
    if os.environ.get("nnUNet_n_proc_DA", "").strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    out = nnunet_folder("nnUNet_preprocessed") / name
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=False,
                             clean=clean, verbose=False)
        _, plans_name = plan_experiment_dataset(dataset_id, XBoundNetPlanner, gpu_memory_target_in_gb)
        preprocess([dataset_id], plans_name, list(configurations), [num_processes] * len(configurations))
    except BaseException:  # no half-written output: remove what this run added, keep what was there
        for p in (set(out.iterdir()) - (before or set())) if out.is_dir() else ():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if before is None and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return plans_name


def check_raw_dataset(raw: Path, max_listed: int = 20) -> None:
    """Every training image and label of a raw dataset is complete and readable and a case's files share one
    size (`nnunet_kaz.input_checks`), before nnU-Net reads them in worker processes (where a truncated PNG
    ends in a traceback and a truncated .nii.gz is silently read as zeros). KazError lists the problems."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from tqdm import tqdm

    from nnunet_kaz.input_checks import check_case_files

    cases = get_filenames_of_train_images_and_targets(str(raw))
    problems = []
    for case, files in tqdm(sorted(cases.items()), desc="checking raw files", unit="case",
                            disable=len(cases) < 50):
        try:
            check_case_files([*files["images"], files["label"]])
        except KazError as e:
            problems.append(str(e))
    if problems:
        shown = problems[:max_listed] + ([f"... and {len(problems) - max_listed} more"]
                                         if len(problems) > max_listed else [])
        raise KazError(f"{len(problems)} problem(s) in {raw}, nothing written:\n  " + "\n  ".join(shown))
