"""`nnUNetv2_train --c` from a truncated or corrupt checkpoint: one clear message instead of torch's traceback."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import torch

RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's --c order


class CheckedResumeMixin:
    """Check that the checkpoint nnU-Net resumes from (`--c`, `--val`) can be read before nnU-Net initialises
    anything. If it cannot: print `nnUNetv2_train: error: ...` naming the file (and the checkpoints --c would
    fall back to once it is deleted), remove the training log this run opened, and exit with code 2
    (SystemExit: no traceback). The file is read twice (check, then nnU-Net's own load): nnU-Net 2.8's
    `load_checkpoint` only accepts a file name."""

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, (str, Path)):
            try:
                torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
            except Exception as e:  # noqa: BLE001 - truncated / corrupt files raise several types
                self._refuse_checkpoint(Path(filename_or_checkpoint), e)
        super().load_checkpoint(filename_or_checkpoint)

    def _refuse_checkpoint(self, path: Path, error: Exception) -> None:
        others = [n for n in RESUME_ORDER if n != path.name and (path.parent / n).is_file()]
        hint = f"delete it to resume from {others[0]}, or" if others else "delete it and"
        refuse_to_start(self, f"cannot read checkpoint {path}, truncated or corrupt "
                              f"({type(error).__name__}: {error}); {hint} train without --c")


def refuse_to_start(trainer, message: str) -> NoReturn:
    """End `nnUNetv2_train` before training with `nnUNetv2_train: error: MESSAGE` and exit code 2 (SystemExit: no
    traceback), leaving nothing of this run behind: the training log its __init__ opened (a timestamped name holding
    only nnU-Net's banner) and the results folders __init__ made, as far as they are still empty (fold folder,
    trainer folder, dataset folder; never nnUNet_results itself)."""
    log = Path(getattr(trainer, "log_file", "") or "")
    if log.is_file():
        log.unlink()
    folder = getattr(trainer, "output_folder", None)
    if folder:
        for f in (Path(folder), *list(Path(folder).parents)[:2]):
            try:
                f.rmdir()  # only while empty
            except OSError:
                break
    print(f"nnUNetv2_train: error: {message}", file=sys.stderr)
    raise SystemExit(2)
