"""Ensemble members: a results folder (trainer__plans__configuration) with a choice of folds and checkpoints.

Spec syntax (command line `-m`): `RESULTS_DIR[:FOLDS[:CHECKPOINTS]]`
- FOLDS: `0,1,2`, or `*` / empty for every `fold_X` folder that holds the checkpoints (default).
- CHECKPOINTS: comma list of `final` (checkpoint_final.pth, default), `best` (checkpoint_best.pth), `latest`,
  `snapshots` (every snapshot listed in the fold's snapshots.json, see XBoundNetTrainerSGDR) or a file name.
Example: `$nnUNet_results/Dataset501_KazPhantom/XBoundNetTrainerSGDR__nnUNetPlans__2d:0:snapshots`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_kaz.errors import KazError

CHECKPOINT_ALIASES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth",
                      "latest": "checkpoint_latest.pth"}


@dataclass
class Member:
    """One results folder with the checkpoint files to use from it (one model each)."""

    folder: Path
    checkpoints: list[Path]
    plans: dict = field(repr=False)
    dataset_json: dict = field(repr=False)
    configuration: str = ""
    trainer_name: str = ""

    @property
    def name(self) -> str:
        return self.folder.name


def parse_member(spec: str) -> Member:
    """Parse `RESULTS_DIR[:FOLDS[:CHECKPOINTS]]` and find its checkpoint files (clear errors otherwise)."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise KazError(f"member {spec!r}: expected RESULTS_DIR[:FOLDS[:CHECKPOINTS]]")
    folder = Path(parts[0]).expanduser()
    folds_text = parts[1] if len(parts) > 1 else ""
    chk_text = parts[2] if len(parts) > 2 else "final"
    for needed in ("plans.json", "dataset.json"):
        if not (folder / needed).is_file():
            raise KazError(f"member {spec!r}: {folder / needed} is missing; a member is an nnU-Net results folder "
                           f"such as $nnUNet_results/Dataset501_X/XBoundNetTrainer__nnUNetPlans__2d")
    try:
        configuration = folder.name.split("__")[2]
    except IndexError:
        raise KazError(f"member {spec!r}: folder name {folder.name!r} is not TRAINER__PLANS__CONFIGURATION") from None
    if folds_text in ("", "*"):
        fold_dirs = sorted(p for p in folder.glob("fold_*") if p.is_dir())
    else:
        fold_dirs = [folder / f"fold_{f.strip()}" for f in folds_text.split(",")]
    missing_folds = [str(d) for d in fold_dirs if not d.is_dir()]
    if missing_folds or not fold_dirs:
        raise KazError(f"member {spec!r}: fold folder(s) not found: {missing_folds or 'no fold_X folders'}")
    checkpoints: list[Path] = []
    missing: list[str] = []
    for fold_dir in fold_dirs:
        for token in chk_text.split(","):
            token = token.strip()
            if token == "snapshots":
                found = _snapshots(fold_dir)
                if not found:
                    missing.append(f"{fold_dir / 'snapshots.json'} (or it lists no snapshots)")
                checkpoints.extend(found)
                continue
            path = fold_dir / CHECKPOINT_ALIASES.get(token, token)
            (checkpoints if path.is_file() else missing).append(path if path.is_file() else str(path))
    if missing:
        raise KazError(f"member {spec!r}: missing checkpoint(s): {', '.join(map(str, missing))}")
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return Member(folder, checkpoints, plans, dataset_json, configuration)


def _snapshots(fold_dir: Path) -> list[Path]:
    manifest = fold_dir / "snapshots.json"
    if not manifest.is_file():
        return []
    entries = json.loads(manifest.read_text()).get("snapshots", [])
    return [fold_dir / e["file"] for e in sorted(entries, key=lambda e: (e["cycle"], e["epoch"]))]


def load_checkpoint(path: Path) -> dict:
    """torch.load on the CPU with a message naming the file when it is unreadable or not an nnU-Net checkpoint."""
    import torch  # here, so `nnunet-kaz --help` does not load torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupted files raise several different errors
        raise KazError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "trainer_name" not in ckpt:
        raise KazError(f"{path} is not an nnU-Net checkpoint (no network_weights / trainer_name)")
    return ckpt


PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_data_kwargs", "resampling_fn_probabilities",
                      "resampling_fn_probabilities_kwargs")


def check_compatible(members: list[Member]) -> None:
    """Members must share the label set and the preprocessing, so a case is read and preprocessed once."""
    ref = members[0]
    ref_cfg = ref.plans["configurations"][ref.configuration]
    problems = []
    for m in members[1:]:
        if m.dataset_json.get("labels") != ref.dataset_json.get("labels"):
            problems.append(f"{m.folder}: labels {m.dataset_json.get('labels')} differ from "
                            f"{ref.dataset_json.get('labels')} ({ref.folder})")
        if m.dataset_json.get("file_ending") != ref.dataset_json.get("file_ending"):
            problems.append(f"{m.folder}: file ending differs from {ref.folder}")
        cfg = m.plans["configurations"][m.configuration]
        diff = [k for k in PREPROCESSING_KEYS if cfg.get(k) != ref_cfg.get(k)]
        if m.plans.get("transpose_forward") != ref.plans.get("transpose_forward"):
            diff.append("transpose_forward")
        if m.plans.get("foreground_intensity_properties_per_channel") != \
                ref.plans.get("foreground_intensity_properties_per_channel"):
            diff.append("foreground_intensity_properties_per_channel")
        if diff:
            problems.append(f"{m.folder}: preprocessing differs from {ref.folder} in {diff}")
    if problems:
        raise KazError("members cannot be combined:\n  " + "\n  ".join(problems))
