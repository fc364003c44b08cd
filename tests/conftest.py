"""Shared fixtures: nnU-Net folders in a temporary directory and a runner for the real nnU-Net commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_kaz.paths import trainer_dir

BIN = Path(sys.executable).parent


def nnunet_env(root: Path) -> dict[str, str]:
    """Environment for subprocesses: nnU-Net folders under `root`, our trainers discoverable, CPU-friendly."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env["nnUNet_extTrainer"] = str(trainer_dir())
    env["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation: 2-core CI machines
    env["nnUNet_compile"] = "f"
    env["nnUNet_def_n_proc"] = "1"  # nnU-Net's export pools spawn this many workers: slow to start on CPU
    env["OMP_NUM_THREADS"] = "2"
    return env


def run(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (nnU-Net's console scripts live next to this interpreter); show its output if it fails."""
    exe = BIN / cmd[0]
    full = [str(exe) if exe.exists() else cmd[0], *cmd[1:]]
    proc = subprocess.run(full, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def shrink_plans(preprocessed: Path, dataset: str, source: str, target: str, max_features: int = 32) -> None:
    """Copy a plans file under a new name with narrower networks and batch size 2, for fast CPU tests.

    The configurations keep their data identifiers, so the copy trains on the same preprocessed data.
    """
    plans = json.loads((preprocessed / dataset / f"{source}.json").read_text())
    plans["plans_name"] = target
    for cfg in plans["configurations"].values():
        if "architecture" not in cfg:
            continue
        kw = cfg["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [min(max_features, 8 * 2 ** i) for i in range(kw["n_stages"])]
        cfg["batch_size"] = 2
    (preprocessed / dataset / f"{target}.json").write_text(json.dumps(plans, indent=2))


KAZ_ID, KAZ = 990, "Dataset990_KazTiny"


class TinyKaz:
    """A tiny 2D KAZ phantom, planned and preprocessed once per test session, with trained models cached."""

    def __init__(self, root: Path):
        from nnunet_kaz.datasets import make_kaz2d_dataset

        self.root, self.env = root, nnunet_env(root)
        self.raw = root / "nnUNet_raw" / KAZ
        make_kaz2d_dataset(self.raw, n_patients=4, seed=0, image_size=(32, 32), slices_per_patient=3,
                           n_test_patients=1)
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it must be >= 1 here
        run(["nnUNetv2_plan_and_preprocess", "-d", str(KAZ_ID), "-c", "2d", "-np", "1",
             "--verify_dataset_integrity"], dict(self.env, nnUNet_n_proc_DA="1"))
        shrink_plans(root / "nnUNet_preprocessed", KAZ, "nnUNetPlans", "nnUNetTinyPlans")

    def results(self, trainer: str) -> Path:
        return self.root / "nnUNet_results" / KAZ / f"{trainer}__nnUNetTinyPlans__2d"

    def train(self, trainer: str, fold: int = 0) -> Path:
        """Train once per session (real nnUNetv2_train on the CPU) and return the results folder."""
        folder = self.results(trainer)
        if not (folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            run(["nnUNetv2_train", str(KAZ_ID), "2d", str(fold), "-tr", trainer, "-p", "nnUNetTinyPlans",
                 "-device", "cpu"], self.env)
        return folder


@pytest.fixture(scope="session")
def tiny_kaz(tmp_path_factory) -> TinyKaz:
    return TinyKaz(tmp_path_factory.mktemp("kaz"))
