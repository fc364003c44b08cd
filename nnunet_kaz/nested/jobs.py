"""The nested protocol's training as a job list: one stock `nnUNetv2_train D C k -tr TRAINER_seedS` per outer fold
k and seed S (nnU-Net fold k = outer fold k once `splits --nested` installed the nested folds), as plain lines
(`train_jobs.txt`, for any scheduler), a Slurm array script (`train_array.sbatch`: task i runs line i + 1) and
the evaluation that follows (`evaluate.sbatch`: `nnunet-kaz nested-cv evaluate`, one job after the array)."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _exports() -> list[str]:
    lines = []
    for name in NNUNET_FOLDERS:
        value = os.environ.get(name)
        lines.append(f"export {name}={shlex.quote(str(Path(value).resolve()))}" if value else
                     f"# export {name}=...   (not set when this script was written: set it here)")
    lines.append('export nnUNet_extTrainer="$(nnunet-kaz trainer-dir)"')
    return lines


def slurm_array_script(jobs_file: Path, n_jobs: int, name: str, options: list[str], logs: Path) -> str:
    """A Slurm array of `n_jobs` tasks, task i running line i + 1 of `jobs_file`, one GPU each."""
    head = ["#!/bin/bash", f"# {n_jobs} nnUNetv2_train runs of {jobs_file.name}, one per array task "
            "(written by nnunet-kaz nested-cv jobs). Submit: sbatch " + shlex.quote(str(jobs_file.parent /
                                                                                      'train_array.sbatch')),
            f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{n_jobs - 1}", "#SBATCH --gres=gpu:1",
            "#SBATCH --cpus-per-task=8", f"#SBATCH --output={logs}/%x_%A_%a.out"]
    head += [f"#SBATCH {o}" for o in options]
    body = ["set -euo pipefail", *_exports(),
            f'CMD="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(jobs_file))})"',
            'echo "task $SLURM_ARRAY_TASK_ID: $CMD"', 'eval "$CMD"']
    return "\n".join(head + [""] + body) + "\n"


def slurm_single_script(command: list[str], name: str, options: list[str], logs: Path) -> str:
    head = ["#!/bin/bash", "# the nested protocol's evaluation, after every training of train_array.sbatch: "
            "sbatch --dependency=afterok:ARRAY_JOB_ID evaluate.sbatch",
            f"#SBATCH --job-name={name}", "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8",
            f"#SBATCH --output={logs}/%x_%j.out"]
    head += [f"#SBATCH {o}" for o in options]
    return "\n".join(head + ["", "set -euo pipefail", *_exports(), shlex.join(command)]) + "\n"


def write_jobs(out: Path, train_commands: list[list[str]], evaluate_command: list[str], name: str,
               sbatch_options: list[str] | None = None) -> dict[str, Path]:
    """train_jobs.txt, train_array.sbatch and evaluate.sbatch in `out` (logs/ beside them)."""
    if not train_commands:
        raise KazError("no training jobs (no seeds or outer folds)")
    out = Path(out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    paths = {"jobs": out / "train_jobs.txt", "array": out / "train_array.sbatch", "evaluate": out / "evaluate.sbatch"}
    texts = {"jobs": "".join(shlex.join(c) + "\n" for c in train_commands),
             "array": slurm_array_script(paths["jobs"], len(train_commands), name, list(sbatch_options or []), logs),
             "evaluate": slurm_single_script(evaluate_command, f"{name}_eval", list(sbatch_options or []), logs)}
    for key, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_text(texts[key])
        if key != "jobs":
            path.chmod(0o755)
    return paths


__all__ = ["write_jobs", "slurm_array_script", "slurm_single_script"]
