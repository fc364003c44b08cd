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


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    return BIN
