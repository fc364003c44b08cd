"""Fitting a calibrator on a folder of validation probabilities and a folder of labels (`nnunet-kaz calibrate`).

Everything is checked before anything is written: cases are matched by name, every case without a label
and every shape mismatch is listed in one error, then the cases stream through the pool one at a time
(probability values and label values are checked as each case is read).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from nnunet_kaz.errors import KazError
from nnunet_kaz.cases import (find_dataset_json, load_probabilities, match_probabilities, read_dataset_json,
                              read_segmentation)
from nnunet_kaz.postprocessing.calibration import (Calibrator, apply_calibration, classes_from_labels,
                                                   default_classes, labels_to_channels, make_calibrator,
                                                   top_label_ece)
from nnunet_kaz.postprocessing.pooling import pool_cases


@dataclass
class ValidationSet:
    """Matched validation cases: npz files, label files, the label set and where it came from."""
    cases: list[str]
    prob_files: dict[str, Path]
    label_files: dict[str, Path]
    classes: list[dict]
    ignore_label: int | None
    dataset_json: Path | None

    @classmethod
    def from_folders(cls, prob_dir: Path, label_dir: Path, dataset_json: Path | None = None) -> "ValidationSet":
        cases, prob_files, label_files, n_channels = match_probabilities(Path(prob_dir), Path(label_dir))
        dj_path = Path(dataset_json) if dataset_json else find_dataset_json(Path(prob_dir), Path(label_dir))
        if dj_path is not None:
            dj = read_dataset_json(dj_path)
            classes = classes_from_labels(dj["labels"])
            ignore = dj["labels"].get("ignore")
            if len(classes) != n_channels:
                raise KazError(f"{dj_path} lists {len(classes)} classes but the probabilities in {prob_dir} have "
                               f"{n_channels} channels (give the dataset.json of these predictions)")
        else:
            classes, ignore = default_classes(n_channels), None
        return cls(cases, prob_files, label_files, classes, None if ignore is None else int(ignore), dj_path)

    def read(self, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(checked probabilities, channel indices, ignore mask or None) of one case."""
        label, _ = read_segmentation(self.label_files[case])
        probs = load_probabilities(self.prob_files[case], label.shape)
        channels, ignore = labels_to_channels(label, self.classes, self.ignore_label, str(self.label_files[case]))
        return probs, channels, ignore

    def stream(self, progress: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        for case in tqdm(self.cases, desc="validation cases", disable=not progress):
            yield self.read(case)


def fit_on_validation(vs: ValidationSet, method: str, cap_per_class: int = 200_000, seed: int = 0,
                      progress: bool = True) -> tuple[Calibrator, dict]:
    """Fit `method` on the pooled validation voxels. Returns the calibrator and the in-sample top-label ECE
    (15 bins, importance-weighted) of the pooled sample before and after calibration."""
    pool = pool_cases(vs.stream(progress), cap_per_class, seed)
    X, y, w = pool.sample()
    cal = make_calibrator(method, vs.classes).fit(X, y, w)
    cal.fit_set_ = {**pool.summary(), "cases": list(vs.cases)}
    ece = {"before": top_label_ece(X, y, w), "after": top_label_ece(cal.transform(X), y, w)}
    return cal, ece


def write_calibrated(vs: ValidationSet, calibrator: Calibrator, folder: Path, progress: bool = True) -> None:
    """Calibrated probabilities of every validation case as folder/CASE.npz (`probabilities`)."""
    for case in tqdm(vs.cases, desc="writing calibrated npz", disable=not progress):
        probs = np.load(vs.prob_files[case])["probabilities"]  # as stored (nnU-Net's axes), checked by fitting
        np.savez_compressed(folder / f"{case}.npz",
                            probabilities=apply_calibration(probs, calibrator, str(vs.prob_files[case])))
