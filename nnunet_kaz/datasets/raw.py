"""nnU-Net v2 raw-dataset conventions shared by the phantoms and converters: folder names, the
overwrite guard and `dataset.json`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nnunet_kaz.errors import KazError

DATASET_NAME_RE = re.compile(r"^Dataset(\d{3,})_([A-Za-z0-9][A-Za-z0-9_\-]*)$")


def parse_dataset_folder(folder: str | Path) -> tuple[int, str]:
    """Dataset id and name from a folder named like nnU-Net's `DatasetXXX_Name` (e.g. Dataset501_KAZ).

    nnU-Net finds raw datasets by this name (`Dataset%03d_` + name); anything else is never found, so it
    is refused here rather than discovered at planning time.
    """
    name = Path(folder).name
    m = DATASET_NAME_RE.match(name)
    if not m:
        raise KazError(f"{folder}: dataset folder must be named DatasetXXX_Name (three or more digits, then "
                       f"a name of letters, digits, '_' or '-'), e.g. Dataset501_KAZ")
    return int(m.group(1)), m.group(2)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """`DatasetXXX_Name` for an id and a name, validated."""
    if not 0 < int(dataset_id) < 100000:
        raise KazError(f"dataset id must be a positive integer, got {dataset_id}")
    folder = f"Dataset{int(dataset_id):03d}_{name}"
    parse_dataset_folder(folder)
    return folder


def check_writable(target: str | Path, overwrite: bool) -> Path:
    """Refuse to replace an existing non-empty folder (or any file) at `target` unless `overwrite`."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise KazError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise KazError(f"{target} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    return target


def dataset_json(channel_names: dict[str, str], labels: dict[str, Any], num_training: int, file_ending: str,
                 name: str, description: str = "", regions_class_order: list[int] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The `dataset.json` nnU-Net v2 reads (required keys: channel_names, labels, numTraining, file_ending).

    `labels` maps names to ints, or to lists of ints for region-based training, in which case
    `regions_class_order` (the label written for each region, in order) is required by nnU-Net.
    Extra keys are kept; nnU-Net ignores them.
    """
    d: dict[str, Any] = {
        "channel_names": dict(channel_names),
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": file_ending,
        "name": name,
        "description": description,
    }
    if regions_class_order is not None:
        d["regions_class_order"] = list(regions_class_order)
    d.update(extra)
    return d


def raw_target(raw_root: str | Path, dataset_id: int, name: str, overwrite: bool) -> Path:
    """`raw_root/DatasetXXX_Name`, checked: a valid name, no other folder with the same id (nnU-Net would
    refuse the id as ambiguous), and no non-empty folder unless `overwrite`."""
    raw_root = Path(raw_root)
    target = raw_root / dataset_folder_name(dataset_id, name)
    clashes = sorted(p.name for p in raw_root.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != target.name) \
        if raw_root.is_dir() else []
    if clashes:
        raise KazError(f"dataset id {dataset_id} is already used by {', '.join(clashes)} in {raw_root}")
    return check_writable(target, overwrite)
