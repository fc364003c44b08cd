"""KiTS23's challenge metrics: Dice and Surface Dice over the nested regions (neheller/kits23).

Regions (`kits23/configuration/labels.py`, KITS_HEC_LABEL_MAPPING) of a label map with 1 kidney, 2 tumour,
3 cyst: kidney_and_mass = {1, 2, 3}, mass = {2, 3}, tumor = {2}. Per case and region
(`kits23/evaluation/metrics.py`, compute_metrics_for_label):
- dice = 2 |P ∩ G| / (|P| + |G|);
- surface_dice = Surface Dice at the region's tolerance (HEC_SD_TOLERANCES_MM: 1.0330772532390826,
  1.1328796488598762, 1.1498198361434828 mm), DeepMind surface-distance's surfel-area definition
  (`surface_dice` module);
- both masks empty -> both metrics 1; exactly one empty -> both 0.
Aggregate (`kits23/evaluation/readme.md`, ranking): the mean over cases and regions of Dice and of Surface
Dice (the leaderboard's "average Dice" and "average Surface Dice"); the per-region means beside them.

Inputs are label maps (a region-based nnU-Net prediction is written as a label map through
regions_class_order (1, 3, 2), so the same function serves both). Spacing in array axis order, mm.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from nnunet_kaz.evaluation.surface import bounding_box
from nnunet_kaz.evaluation.surface_dice import surface_dice

KITS23_REGIONS = {"kidney_and_mass": (1, 2, 3), "mass": (2, 3), "tumor": (2,)}
KITS23_TOLERANCES_MM = {"kidney_and_mass": 1.0330772532390826, "mass": 1.1328796488598762,
                        "tumor": 1.1498198361434828}
KITS23_COLUMNS = ("case", "region", "dice", "surface_dice")


def region_mask(labels: np.ndarray, region: Sequence[int]) -> np.ndarray:
    """Boolean mask of the voxels whose label is in `region`."""
    region = tuple(int(v) for v in region)
    if region == (1, 2, 3):
        return (labels >= 1) & (labels <= 3)
    mask = labels == region[0]
    for v in region[1:]:
        mask |= labels == v
    return mask


def region_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2 |P ∩ G| / (|P| + |G|); 1 when both are empty (KiTS23's rule)."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / total


def kits23_case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                        method: str = "auto") -> list[dict]:
    """[{region, dice, surface_dice}] for the three KiTS23 regions of one case (module docstring).

    Both label maps are cropped once to the bounding box of their foreground (every region lies inside
    it), then each region's masks are cropped again by `surface_dice`."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {pred.shape} vs {gt.shape}")
    box = bounding_box((pred > 0) | (gt > 0))
    rows = []
    for name, labels in KITS23_REGIONS.items():
        if box is None:
            rows.append({"region": name, "dice": 1.0, "surface_dice": 1.0})
            continue
        p, g = region_mask(pred[box], labels), region_mask(gt[box], labels)
        if p.any() != g.any():
            dice = sd = 0.0
        else:
            dice = region_dice(p, g)
            sd = surface_dice(p, g, spacing, KITS23_TOLERANCES_MM[name], method)
        rows.append({"region": name, "dice": dice, "surface_dice": sd})
    return rows


def kits23_summary(table: pd.DataFrame) -> dict:
    """Per-region means of dice and surface_dice, and the challenge's aggregate: the mean over every case
    and region (`mean_dice`, `mean_surface_dice`). `table` has the columns of kits23.csv."""
    out: dict = {"regions": {}}
    for name in KITS23_REGIONS:
        sub = table[table["region"] == name]
        out["regions"][name] = {"dice": float(sub["dice"].mean()), "surface_dice": float(sub["surface_dice"].mean()),
                                "n_cases": int(len(sub))}
    out["mean_dice"] = float(table["dice"].mean())
    out["mean_surface_dice"] = float(table["surface_dice"].mean())
    return out


def _label_set(value) -> tuple[int, ...]:
    """The labels a dataset.json `labels` value stands for: a region's list, or one label."""
    return tuple(sorted(int(x) for x in value)) if isinstance(value, (list, tuple)) else (int(value),)


def dataset_regions(labels: dict) -> dict[str, str]:
    """{dataset.json label name: KiTS23 region} of a region-based KiTS23 dataset.json `labels` entry
    (nnU-Net's Dataset220 names them kidney (1, 2, 3), masses (2, 3), tumor 2); {} for any other entry.
    The predictor names its per-region scores by the dataset.json names; evaluation reports KiTS23's."""
    fg = {k: _label_set(v) for k, v in labels.items() if k != "background"}
    if set(fg.values()) != set(KITS23_REGIONS.values()):
        return {}
    by_labels = {labs: name for name, labs in KITS23_REGIONS.items()}
    return {k: by_labels[labs] for k, labs in fg.items()}


def is_kits23_labels(labels: dict) -> bool:
    """Whether a dataset.json `labels` entry is KiTS23's: kidney 1, tumour 2, cyst 3 as plain labels, or the
    regions kidney (1, 2, 3), masses (2, 3), tumor 2 of a region-based dataset."""
    values = {_label_set(v) for k, v in labels.items() if k != "background"}
    return values == {(1,), (2,), (3,)} or bool(dataset_regions(labels))
