"""Weighted cross-entropy ("wcc", paper 004 section 3.1 and table 1) with inverse-class-frequency weights.

Paper 004 compares soft Dice with a weighted categorical cross-entropy but does not state its weights; here they
are the inverse class frequencies of the fold's training labels, as issue 3 asks:

    n_c = number of voxels of class c in the preprocessed segmentations of the fold's training cases
          (nnU-Net's `*_seg` arrays at training resolution, validation cases excluded; voxels of the ignore label
          are not counted; nnU-Net's -1 "outside the nonzero crop" voxels count as background 0, since training
          turns them into 0 before the loss sees them)
    w_c = (1 / n_c) / mean_k (1 / n_k)        so that the weights average 1 (sum to C)

A class without voxels in the training cases gets the largest weight of the classes present (it is at least as
rare as the rarest one seen). The loss is torch's weighted mean over the voxels that are not ignored,

    WCE = sum_i w_{y_i} * (-log softmax(z_i)_{y_i}) / sum_i w_{y_i},

which is `torch.nn.CrossEntropyLoss(weight=w, ignore_index=ignore_label)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from tqdm import tqdm

from nnunet_kaz.io_utils import write_json_atomic
from nnunet_kaz.trainers.checked_resume import CheckedResumeMixin
from nnunet_kaz.trainers.xboundnet_trainer import XBoundNetTrainer, wrap_deep_supervision

CLASS_WEIGHTS_FILE = "class_weights.json"


def count_classes(segmentations: Iterable[np.ndarray], num_classes: int,
                  ignore_label: int | None = None) -> np.ndarray:
    """Voxels per class 0..num_classes-1 over label arrays; -1 counts as 0, `ignore_label` is not counted.

    Raises ValueError naming the label if an array holds a label >= num_classes other than the ignore label.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for seg in segmentations:
        found = _label_histogram(np.asarray(seg))  # found[v + 1] = voxels of label v
        for v in np.flatnonzero(found).tolist():
            v -= 1
            if v == ignore_label:
                continue
            c = 0 if v == -1 else v
            if not 0 <= c < num_classes:
                raise ValueError(f"label {v} outside 0..{num_classes - 1} (ignore label: {ignore_label})")
            counts[c] += found[v + 1]
    return counts


def _label_histogram(seg: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """bincount of seg + 1 (labels >= -1), in chunks so a large 3D volume needs no full int64 copy."""
    flat = seg.reshape(-1)
    hist = np.zeros(1, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk].astype(np.int64) + 1
        if part.size and part.min() < 0:
            raise ValueError(f"label {int(part.min()) - 1} below -1 in a segmentation")
        h = np.bincount(part)
        if h.size > hist.size:
            h[:hist.size] += hist
            hist = h
        else:
            hist[:h.size] += h
    return hist


def inverse_frequency_weights(counts: Sequence[int]) -> np.ndarray:
    """w_c = (1 / n_c) / mean_k(1 / n_k): inverse class frequency, averaging 1 (see the module docstring).

    Classes with n_c = 0 get the largest weight of the present classes; all counts 0 raises ValueError.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("no labelled voxels: cannot compute class frequencies")
    inverse = np.zeros_like(counts)
    inverse[present] = 1.0 / counts[present]
    inverse[~present] = inverse[present].max()
    return inverse / inverse.mean()


def count_classes_in_preprocessed(folder: str | Path, identifiers: Sequence[str], num_classes: int,
                                  ignore_label: int | None = None) -> np.ndarray:
    """`count_classes` over nnU-Net's preprocessed segmentations (any of its dataset formats) of `identifiers`."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(str(folder))(str(folder), list(identifiers))
    segs = (np.asarray(dataset.load_case(k)[1][:]) for k in identifiers)  # load_case opens lazily: [1] is seg
    return count_classes(tqdm(segs, total=len(identifiers), desc="class frequencies", disable=len(identifiers) < 50),
                         num_classes, ignore_label)


def build_weighted_ce_loss(weights: Sequence[float], ignore_label: int | None = None,
                           device: torch.device | str = "cpu") -> nn.Module:
    """Weighted cross-entropy on logits (module docstring), taking nnU-Net's (b, 1, ...) float targets."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=device)
    return RobustCrossEntropyLoss(weight=w, ignore_index=ignore_label if ignore_label is not None else -100)


class WeightedCEMixin:
    """Put before an nnUNetTrainer class: the loss is the weighted CE alone, deep supervision as nnU-Net's.

    Class attribute `class_weights`: explicit weights, one per output class; None (default) computes inverse
    class frequencies from the fold's preprocessed training cases. The weights used, the voxel counts and the
    cases counted are written to `class_weights.json` in the fold folder (and reused on `--c` when the training
    cases are unchanged). Region training (sigmoid outputs) has no softmax CE: the trainer refuses it.
    """

    class_weights: tuple[float, ...] | None = None

    def _class_weights(self) -> np.ndarray:
        lm = self.label_manager
        num_classes = lm.num_segmentation_heads
        path = Path(self.output_folder) / CLASS_WEIGHTS_FILE
        if self.class_weights is not None:
            weights = np.asarray(self.class_weights, dtype=np.float64)
            if weights.shape != (num_classes,) or not np.all(weights >= 0) or not weights.any():
                raise ValueError(f"{type(self).__name__}.class_weights must hold {num_classes} non-negative "
                                 f"weights (not all 0), got {self.class_weights}")
            record = {"source": "class attribute class_weights", "weights": weights.tolist()}
        else:
            tr_keys, _ = self.do_split()
            tr_keys = sorted(tr_keys)
            old = _read_json(path)
            if old and old.get("training_cases") == tr_keys and len(old.get("weights", [])) == num_classes:
                return np.asarray(old["weights"], dtype=np.float64)
            counts = count_classes_in_preprocessed(self.preprocessed_dataset_folder, tr_keys, num_classes,
                                                   lm.ignore_label)
            weights = inverse_frequency_weights(counts)
            record = {"source": "inverse class frequency in the preprocessed training cases of the fold",
                      "definition": "w_c = (1/n_c) / mean_k(1/n_k); absent classes get the largest weight",
                      "classes": list(range(num_classes)), "voxel_counts": counts.tolist(),
                      "weights": weights.tolist(), "ignore_label": lm.ignore_label, "training_cases": tr_keys}
        if self.local_rank == 0:
            write_json_atomic(record, path)
        return weights

    def _build_loss(self) -> nn.Module:
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__}: weighted cross-entropy needs label (softmax) training, but "
                             f"dataset.json defines regions; use a Dice/BCE trainer for region training")
        weights = self._class_weights()
        self.print_to_log_file(f"Weighted CE class weights: {np.round(weights, 4).tolist()}")
        loss = build_weighted_ce_loss(weights, self.label_manager.ignore_label, self.device)
        if self.enable_deep_supervision:
            loss = wrap_deep_supervision(loss, len(self._get_deep_supervision_scales()), self.is_ddp,
                                         self._do_i_compile())
        return loss


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class nnUNetTrainerWCE(WeightedCEMixin, CheckedResumeMixin, nnUNetTrainer):
    """nnU-Net's planned network trained with inverse-frequency weighted cross-entropy (paper 004's wcc)."""


class XBoundNetTrainerWCE(WeightedCEMixin, XBoundNetTrainer):
    """XBoundNet++ trained with inverse-frequency weighted cross-entropy instead of LogDice + CE."""


__all__ = ["count_classes", "count_classes_in_preprocessed", "inverse_frequency_weights", "build_weighted_ce_loss",
           "WeightedCEMixin", "nnUNetTrainerWCE", "XBoundNetTrainerWCE", "CLASS_WEIGHTS_FILE"]
