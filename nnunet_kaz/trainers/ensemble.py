"""`nnunet-kaz train-ensemble`: the seeds x folds grid of paper 000 (5 seeds x 5 folds) as nnUNetv2_train runs."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from nnunet_kaz.errors import KazError


def parse_range(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2,5' -> [0, 2, 5]; '3' -> [3]."""
    values: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                values.extend(range(lo, hi + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise KazError(f"cannot read {text!r} as a range: use e.g. 0-4 or 0,2,3") from None
    return sorted(set(values))


def ensemble_commands(dataset: str, configuration: str, trainer: str, seeds: list[int], folds: list[int],
                      plans: str = "nnUNetPlans", device: str = "cuda", extra: list[str] | None = None) -> list[list[str]]:
    """One `nnUNetv2_train` command per (seed, fold); seed s uses the trainer `{trainer}_seed{s}`."""
    from nnunet_kaz import trainers

    missing = [f"{trainer}_seed{s}" for s in seeds if not hasattr(trainers, f"{trainer}_seed{s}")]
    if missing:
        have = sorted({n.rsplit("_seed", 1)[0] for n in trainers.__all__ if "_seed" in n})
        raise KazError(f"no seeded trainer(s) {missing}; trainers with seed variants: {have}")
    return [["nnUNetv2_train", str(dataset), configuration, str(f), "-tr", f"{trainer}_seed{s}", "-p", plans,
             "-device", device, *(extra or [])] for s in seeds for f in folds]


def check_training_inputs(dataset: str, configuration: str, plans: str = "nnUNetPlans") -> None:
    """The dataset, its plans file and the configuration exist, checked before any nnUNetv2_train starts (whose
    own failure would be a traceback per run)."""
    from nnunet_kaz.paths import nnunet_folder

    preprocessed = nnunet_folder("nnUNet_preprocessed")  # clear message when the variable is not set
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError):
        raise KazError(f"no dataset {dataset!r} in nnUNet_preprocessed={preprocessed} (or nnUNet_raw / "
                       f"nnUNet_results); plan it first (nnunet-kaz plan -d ID)") from None
    plans_file = preprocessed / name / f"{plans}.json"
    if not plans_file.is_file():
        raise KazError(f"plans {plans_file} not found; plan first (nnunet-kaz plan -d ID, or "
                       f"nnUNetv2_plan_and_preprocess) or pass the plans name with -p")
    configurations = json.loads(plans_file.read_text()).get("configurations", {})
    if configuration not in configurations:
        raise KazError(f"configuration {configuration!r} is not in {plans_file} (it has {sorted(configurations)})")


def run_commands(commands: list[list[str]], dry_run: bool) -> int:
    """Print the commands (a cluster job array takes one line each), or run them one after another."""
    if dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    bin_dir = Path(sys.executable).parent
    for i, cmd in enumerate(commands, 1):
        print(f"[{i}/{len(commands)}] {shlex.join(cmd)}", flush=True)
        exe = bin_dir / cmd[0]
        code = subprocess.call([str(exe) if exe.exists() else cmd[0], *cmd[1:]])
        if code != 0:
            raise KazError(f"{shlex.join(cmd)} exited with {code}; finished runs are kept, rerun with --c to resume")
    return 0
