"""Conformal FNR control fitted on a folder of validation probabilities and a folder of labels, and its JSON form.

Targets: a label of dataset.json by name or value. For softmax models (nnU-Net's default) the target's probability
is its class channel (channel = label value, nnU-Net's consecutive labels) and its voxels are those with that
label. For region-based models (dataset.json labels that are lists, e.g. KiTS23's `kidney_and_mass: [1, 2, 3]`)
the probability is the region's sigmoid channel (channel = the region's position among the non-background
entries, nnU-Net's `foreground_regions` order) and its voxels are those whose label is in the region.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from nnunet_kaz.conformal.risk_control import FNRControl, check_alpha, min_cases
from nnunet_kaz.errors import KazError

METHOD = "conformal_risk_control_fnr"
REFERENCE = "Angelopoulos, Bates, Fisch, Lei, Schuster: Conformal Risk Control, ICLR 2024, eq. 4"


@dataclass
class Target:
    """One controlled label: its name, the label values it covers, and its probability channel."""
    name: str
    values: list[int]
    channel: int
    region: bool

    def mask(self, label_map: np.ndarray) -> np.ndarray:
        return np.isin(label_map, self.values) if self.region else label_map == self.values[0]


def foreground_labels(labels: dict) -> list[tuple[str, int | list[int]]]:
    """(name, value or region) of dataset.json `labels` without background, ignore and value 0, in order: the
    channel order of a region-based prediction."""
    return [(n, v) for n, v in labels.items() if n not in ("background", "ignore")
            and not (not isinstance(v, (list, tuple)) and int(v) == 0)]


def targets_from_dataset(labels: dict, wanted: Sequence[str]) -> list[Target]:
    """`Target`s for the names or values in `wanted` (dataset.json `labels`); unknown ones in one KazError."""
    region = any(isinstance(v, (list, tuple)) for v in labels.values())
    foreground = foreground_labels(labels)
    out, unknown = [], []
    for w in wanted:
        hit = None
        for channel, (name, v) in enumerate(foreground):
            values = [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]
            if w == name or (not region and w.isdigit() and int(w) == values[0]):
                hit = Target(name, values, channel if region else values[0], region)
        if hit is None:
            unknown.append(w)
        elif all(t.name != hit.name for t in out):
            out.append(hit)
    if unknown:
        named = ", ".join(f"{n}={v}" for n, v in foreground)
        raise KazError(f"label(s) {unknown} are not foreground labels of dataset.json ({named})", option="label")
    return out


def validation_cases(prob_dir: Path, label_dir: Path, dataset_json: Path | None, wanted: Sequence[str]
                     ) -> tuple[list[str], dict, dict, list[Target], Path]:
    """Matched cases, their npz and label files, the targets and the dataset.json used; every problem is raised
    before anything is read in full."""
    from nnunet_kaz.cases import find_dataset_json, match_probabilities, read_dataset_json

    cases, probs, labels, n_channels = match_probabilities(Path(prob_dir), Path(label_dir))
    dj_path = Path(dataset_json) if dataset_json else find_dataset_json(Path(prob_dir), Path(label_dir))
    if dj_path is None:
        raise KazError(f"no dataset.json next to {prob_dir} or {label_dir} (dataset_json)", option="dataset_json")
    targets = targets_from_dataset(read_dataset_json(dj_path)["labels"], wanted)
    for t in targets:
        if t.channel >= n_channels:
            raise KazError(f"label '{t.name}' is channel {t.channel} but the probabilities in {prob_dir} have "
                           f"{n_channels} channels")
    return cases, probs, labels, targets, dj_path


def fit_folder(prob_dir: Path, label_dir: Path, wanted: Sequence[str], alpha: float,
               dataset_json: Path | None = None, progress: bool = True) -> dict:
    """Fit one `FNRControl` per target on the validation cases; returns the conformal.json content."""
    from nnunet_kaz.cases import check_declared_labels, labels_present, load_probabilities, read_segmentation

    alpha = check_alpha(alpha)
    cases, probs, labels, targets, dj_path = validation_cases(prob_dir, label_dir, dataset_json, wanted)
    if len(cases) < min_cases(alpha):
        raise KazError(f"{len(cases)} validation case(s) cannot meet alpha = {alpha}: the bound "
                       f"n/(n+1) * risk + 1/(n+1) <= alpha needs at least {min_cases(alpha)} cases (n >= 1/alpha - 1)")
    declared = [v for n, v in read_dataset_json_labels(dj_path) if n != "ignore"]
    per_target: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {t.name: [] for t in targets}
    for case in tqdm(cases, desc="validation cases", disable=not progress):
        seg, _ = read_segmentation(labels[case])
        check_declared_labels(case, labels_present(seg), declared, str(labels[case]))
        p = load_probabilities(probs[case], seg.shape, softmax=not targets[0].region)
        for t in targets:  # keep only the labelled voxels' probabilities: memory of the labels, not the volumes
            mask = t.mask(seg)
            per_target[t.name].append((p[t.channel][mask], np.ones(int(mask.sum()), bool)))
    out = {"method": METHOD, "reference": REFERENCE, "alpha": alpha, "dataset_json": str(dj_path),
           "cases": list(cases), "labels": []}
    for t in targets:
        ctl = FNRControl(alpha=alpha).fit(per_target[t.name])
        out["labels"].append({"name": t.name, "values": t.values, "channel": t.channel, "region": t.region,
                              **ctl.to_dict()})
    return out


def read_dataset_json_labels(path: Path) -> Iterator[tuple[str, int]]:
    """(name, value) of every plain label of a dataset.json, and every value of each region."""
    from nnunet_kaz.cases import read_dataset_json

    for name, v in read_dataset_json(path)["labels"].items():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            yield name, int(x)


@dataclass
class ConformalMasks:
    """A fitted conformal.json: `masks(probabilities)` gives {label name: guaranteed mask}."""
    targets: list[Target]
    controls: list[FNRControl]
    alpha: float
    content: dict  # the file as read, written again next to the predictions

    @classmethod
    def load(cls, path: Path) -> "ConformalMasks":
        try:
            d = json.loads(Path(path).read_text())
            if d.get("method") != METHOD:
                raise KazError(f"{path} is not a conformal file (method {d.get('method')!r})")
            targets = [Target(x["name"], [int(v) for v in x["values"]], int(x["channel"]), bool(x["region"]))
                       for x in d["labels"]]
            controls = [FNRControl.from_dict(x) for x in d["labels"]]
        except KazError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KazError(f"cannot read conformal file {path}: {e}") from e
        return cls(targets, controls, float(d["alpha"]), d)

    def save(self, path: Path) -> None:
        from nnunet_kaz.io_utils import write_json_atomic

        write_json_atomic(self.content, path)

    def masks(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        if probabilities.shape[0] <= max(t.channel for t in self.targets):
            raise KazError(f"the conformal file needs channel {max(t.channel for t in self.targets)} but the "
                           f"probabilities have {probabilities.shape[0]}")
        return {t.name: c.transform(probabilities[t.channel]) for t, c in zip(self.targets, self.controls)}
