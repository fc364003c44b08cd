"""Patient-grouped cross-validation splits in nnU-Net's `splits_final.json` format.

Slices of one patient are strongly correlated (paper 000 section 3.1: 12 radial slices per patient), so
every split here groups cases by patient: no patient is ever on both sides of a split.

- `patient_kfold_splits`: k folds (default 5) over patients; fold k validates on patient group k and trains
  on the others (80/20). This is what nnU-Net's `nnUNetv2_train D 2d k` reads from `splits_final.json`.
- `nested_cv_splits`: paper 000 section 3.1's nested patient-wise CV. Outer fold k holds out patient group k
  as its test set (20 %); of the remaining patients a seeded 20 % are its validation set (16 % overall) and
  the rest train (64 %). Proportions are exact up to rounding to whole patients. With `nested=True`
  (`splits --nested`, `convert-kaz --nested`) nnU-Net's own `splits_final.json` holds these outer folds, so the
  stock `nnUNetv2_train D 2d k` trains outer fold k on train_k, validates on val_k and never sees test_k, which
  stays in `nested_cv/nested_cv.json` for the protocol's prediction and evaluation (`nnunet-kaz nested-cv`).

Groups come from shuffling the sorted patient ids with `seed` and cutting the list into k nearly equal parts
(sizes differ by at most one patient); case lists in the outputs are sorted.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import numpy as np

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_path, write_json_atomic


def _cases_by_patient(case_patient: Mapping[str, str]) -> dict[str, list[str]]:
    by = defaultdict(list)
    for case, patient in case_patient.items():
        by[patient].append(case)
    return {p: sorted(c) for p, c in sorted(by.items())}


def patient_groups(patients: list[str], n_folds: int, seed: int) -> list[list[str]]:
    """Seeded partition of the (sorted, unique) patient ids into `n_folds` groups of nearly equal size."""
    unique = sorted(set(patients))
    if n_folds < 2 or len(unique) < n_folds:
        raise KazError(f"{n_folds} patient-wise folds need at least {max(n_folds, 2)} patients and n_folds >= 2; "
                       f"found {len(unique)} patients")
    order = np.random.default_rng(seed).permutation(len(unique))
    return [sorted(unique[i] for i in part) for part in np.array_split(order, n_folds)]


def patient_kfold_splits(case_patient: Mapping[str, str], n_folds: int = 5, seed: int = 0) -> list[dict]:
    """nnU-Net splits (list of {"train": [...], "val": [...]}) with patient group k as fold k's validation."""
    by = _cases_by_patient(case_patient)
    groups = patient_groups(list(by), n_folds, seed)
    splits = []
    for k, group in enumerate(groups):
        val = sorted(c for p in group for c in by[p])
        train = sorted(c for j, g in enumerate(groups) if j != k for p in g for c in by[p])
        splits.append({"train": train, "val": val})
    return splits


def min_nested_patients(n_outer: int) -> int:
    """The fewest patients a nested CV with `n_outer` outer folds can split so that every outer fold keeps at least
    one patient for training, one for validation and one for testing (the largest test group is ceil(n / n_outer))."""
    n = max(n_outer, 3)
    while n - math.ceil(n / n_outer) < 2:
        n += 1
    return n


def check_nested_patients(n_patients: int, n_outer: int) -> None:
    """One KazError when `n_patients` cannot be split into `n_outer` outer folds of train / validation / test."""
    if n_outer < 2:
        raise KazError(f"a nested CV needs at least 2 outer folds, got {n_outer}")
    need = min_nested_patients(n_outer)
    if n_patients < need:
        raise KazError(f"a nested CV with {n_outer} outer folds (train / validation / test = 64 / 16 / 20 % of the "
                       f"patients, paper 000 section 3.1) needs at least {need} patients, so that every outer fold "
                       f"keeps one patient each for training, validation and testing; found {n_patients}")


def nested_cv_splits(case_patient: Mapping[str, str], n_outer: int = 5, val_fraction: float = 0.2,
                     seed: int = 0) -> list[dict]:
    """Paper 000 section 3.1 nested patient-wise CV: per outer fold, cases and patients of train / val / test.

    Outer fold k: test = patient group k; validation = round(val_fraction * remaining) of the remaining
    patients (at least one), drawn with `seed + 1 + k`; train = the rest. With 5 outer folds and
    val_fraction 0.2 this is 64 / 16 / 20 % of patients. Too few patients (`check_nested_patients`): KazError.
    """
    by = _cases_by_patient(case_patient)
    check_nested_patients(len(by), n_outer)
    groups = patient_groups(list(by), n_outer, seed)
    folds = []
    for k, test_patients in enumerate(groups):
        rest = sorted(p for j, g in enumerate(groups) if j != k for p in g)
        n_val = min(len(rest) - 1, max(1, int(round(val_fraction * len(rest)))))
        pick = np.random.default_rng(seed + 1 + k).permutation(len(rest))[:n_val]
        val_patients = sorted(rest[i] for i in pick)
        train_patients = sorted(set(rest) - set(val_patients))
        folds.append({
            "patients": {"train": train_patients, "val": val_patients, "test": test_patients},
            "train": sorted(c for p in train_patients for c in by[p]),
            "val": sorted(c for p in val_patients for c in by[p]),
            "test": sorted(c for p in test_patients for c in by[p]),
        })
    return folds


def write_patient_splits(preprocessed_dataset_dir: str | Path, case_patient: Mapping[str, str],
                         n_folds: int = 5, seed: int = 0, nested: bool = False) -> dict[str, Path]:
    """Write the patient-wise splits of one dataset into its nnU-Net preprocessed folder.

    - `splits_final.json`: `patient_kfold_splits` (what `nnUNetv2_train D 2d k` uses for fold k), or with
      `nested=True` the nested CV's outer folds (entry k = outer fold k's train and validation cases), so that
      `nnUNetv2_train D 2d k` trains outer fold k and never sees its test patients;
    - `nested_cv/splits_final.json`: the nested CV's outer folds in nnU-Net's format (what `nested=True` installs);
    - `nested_cv/test_fold{k}.txt`: outer fold k's test cases, one per line;
    - `nested_cv/nested_cv.json`: patients and cases of every role per outer fold, and which splits
      `splits_final.json` holds (`"splits_final": "nested"` or `"patient_kfold"`).
    Every split is computed (and too few patients refused) before anything is written. Returns the written
    paths by name.
    """
    base = Path(preprocessed_dataset_dir)
    nested_folds = nested_cv_splits(case_patient, n_folds, 0.2, seed)
    nested_splits = [{"train": f["train"], "val": f["val"]} for f in nested_folds]
    plain = nested_splits if nested else patient_kfold_splits(case_patient, n_folds, seed)
    out = {"splits_final": base / "splits_final.json", "nested_splits": base / "nested_cv" / "splits_final.json",
           "nested_cv": base / "nested_cv" / "nested_cv.json"}
    write_json_atomic(plain, out["splits_final"])
    write_json_atomic(nested_splits, out["nested_splits"])
    write_json_atomic({"seed": seed, "n_outer": n_folds, "proportions": "train 64 % / val 16 % / test 20 % "
                       "of patients (paper 000 section 3.1)", "splits_final": "nested" if nested else "patient_kfold",
                       "folds": nested_folds}, out["nested_cv"])
    for stale in (base / "nested_cv").glob("test_fold*.txt"):  # from an earlier run with more folds
        if stale.stem[len("test_fold"):] not in {str(k) for k in range(len(nested_folds))}:
            stale.unlink()
    for k, fold in enumerate(nested_folds):
        out[f"test_fold{k}"] = base / "nested_cv" / f"test_fold{k}.txt"
        with atomic_path(out[f"test_fold{k}"]) as tmp:
            tmp.write_text("".join(c + "\n" for c in fold["test"]))
    return out


CASE_PATIENT_PATTERN = r"^.+?_(?P<patient>.+)_a\d+"


def write_dataset_splits(dataset_id: int, pattern: str | None = None, n_folds: int = 5, seed: int = 0,
                         raw_root: str | Path | None = None, preprocessed_root: str | Path | None = None,
                         overwrite: bool = False, nested: bool = False) -> dict[str, Path]:
    """Patient-wise splits for an existing raw dataset (`write_patient_splits`; `nested=True` puts the nested
    CV's outer folds into splits_final.json).

    Patients come from the dataset's `kaz_meta.json` when present (convert-kaz), otherwise from
    `pattern` (named group `patient`) matched at the start of each case name; default
    CASE_PATIENT_PATTERN reads `KAZ_P003_a045` as patient P003 (the phantom's and convert-kaz's names).
    """
    import re

    from nnunet_kaz.paths import nnunet_folder

    raw_root = Path(raw_root) if raw_root else nnunet_folder("nnUNet_raw")
    pre_root = Path(preprocessed_root) if preprocessed_root else nnunet_folder("nnUNet_preprocessed")
    found = sorted(raw_root.glob(f"Dataset{int(dataset_id):03d}_*")) if raw_root.is_dir() else []
    if len(found) != 1:
        raise KazError(f"no dataset with id {dataset_id} in {raw_root}" if not found else
                       f"dataset id {dataset_id} is ambiguous: {', '.join(p.name for p in found)}")
    folder = found[0]
    try:
        file_ending = json.loads((folder / "dataset.json").read_text())["file_ending"]
    except (OSError, ValueError, KeyError) as e:
        raise KazError(f"{folder / 'dataset.json'}: missing or without file_ending ({e})") from None
    cases = sorted(p.name[: -len(file_ending)] for p in (folder / "labelsTr").glob(f"*{file_ending}"))
    if not cases:
        raise KazError(f"{folder / 'labelsTr'}: no labelled cases")
    meta = folder / "kaz_meta.json"
    if meta.is_file() and pattern is None:
        info = json.loads(meta.read_text())["cases"]
        missing = [c for c in cases if c not in info]
        if missing:
            raise KazError(f"{meta}: no patient for cases {', '.join(missing)}")
        case_patient = {c: info[c]["patient"] for c in cases}
    else:
        rx = re.compile(pattern or CASE_PATIENT_PATTERN)
        if "patient" not in rx.groupindex:
            raise KazError(f"--pattern {rx.pattern!r} needs a named group (?P<patient>...)")
        bad = [c for c in cases if not rx.match(c)]
        if bad:
            raise KazError(f"case names not matching {rx.pattern!r}: {', '.join(bad)}")
        case_patient = {c: rx.match(c).group("patient") for c in cases}
    if (pre_root / folder.name / "splits_final.json").exists() and not overwrite:
        raise KazError(f"{pre_root / folder.name / 'splits_final.json'} exists; pass --overwrite to replace it")
    return write_patient_splits(pre_root / folder.name, case_patient, n_folds, seed, nested)


def read_nested_cv(preprocessed_dataset_dir: str | Path, require_installed: bool = True) -> dict:
    """`nested_cv/nested_cv.json` of a dataset, checked against its `splits_final.json`: with `require_installed`
    the file nnU-Net trains from must hold the nested outer folds (entry k = train_k / val_k), else KazError
    naming the command that installs them. Also re-checks what the protocol relies on: per outer fold the three
    case and patient sets are disjoint, and every patient is tested exactly once."""
    base = Path(preprocessed_dataset_dir)
    path = base / "nested_cv" / "nested_cv.json"
    if not path.is_file():
        raise KazError(f"{path} not found; write the nested CV first (nnunet-kaz splits -d ID --nested, or "
                       "convert-kaz ... --nested)")
    info = json.loads(path.read_text())
    folds = info["folds"]
    tested: list[str] = []
    for k, f in enumerate(folds):
        for what in ("patients", None):
            sets = [set((f[what] if what else f)[r]) for r in ("train", "val", "test")]
            if any(a & b for i, a in enumerate(sets) for b in sets[i + 1:]):
                raise KazError(f"{path}: outer fold {k} shares {what or 'cases'} between train, val and test")
        tested += f["patients"]["test"]
    if len(tested) != len(set(tested)):
        raise KazError(f"{path}: a patient is in the test set of more than one outer fold")
    if require_installed:
        splits_file = base / "splits_final.json"
        splits = json.loads(splits_file.read_text()) if splits_file.is_file() else None
        same = splits is not None and len(splits) >= len(folds) and all(
            set(s["train"]) == set(f["train"]) and set(s["val"]) == set(f["val"]) for s, f in zip(splits, folds))
        if not same:
            raise KazError(f"{splits_file} does not hold the nested CV's outer folds, so nnUNetv2_train fold k would "
                           f"not train outer fold k (its models could see test_k); install them with nnunet-kaz "
                           f"splits -d ID --nested --overwrite (same --folds and --seed) and train again")
    return info
