"""Trainers with SGDR warm restarts that keep the top-k checkpoints of each cycle (Rel-UNet, paper 002)."""
from __future__ import annotations

import os
from os.path import join
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kaz.trainers.checked_resume import CheckedResumeMixin, refuse_to_start
from nnunet_kaz.trainers.sgdr import SGDRScheduler, cycle_of_epoch, sgdr_cycle_ends
from nnunet_kaz.trainers.snapshots import MANIFEST, Snapshot, SnapshotManifest, snapshot_filename
from nnunet_kaz.trainers.xboundnet_trainer import XBoundNetTrainer


class SGDRSnapshotMixin:
    """Put before an nnUNetTrainer class: SGD as nnU-Net configures it, with an SGDR schedule and snapshots.

    Defaults are paper 002's (Appendix A and section III-C/D): lr 0.1 -> 1e-4, 800 epochs, restarts at epochs
    100, 200, 400, 800, the top 3 checkpoints by pseudo-Dice around each cycle's peak, and a cycle without a
    peak dropped (the paper's run showed none around epoch 200 and ensembled 3 x 3 = 9 snapshots).

    Class attributes:
    - `sgdr_lr_max` (0.1; None: nnU-Net's `initial_lr`, 1e-2) and `sgdr_lr_min` (1e-4).
    - `sgdr_cycle_ends`: explicit epochs at which cycles end, (100, 200, 400, 800) by default; set it to None
      to use `sgdr_T0`, `sgdr_eta` (cycle lengths T_i = T0 * eta**i epochs) instead. Setting T0 / eta while
      `sgdr_cycle_ends` is still set is refused (they would be ignored).
    - `snapshot_top_k` (3) and `snapshot_window` (10): within the last `snapshot_window` epochs of each cycle
      the `snapshot_top_k` checkpoints with the best EMA pseudo-Dice are kept as
      `checkpoint_snapshot_c{cycle}_e{epoch}.pth`, listed in `snapshots.json` in the fold folder.
    - `snapshot_drop_margin` (0.0): the rule for "a cycle without a peak" (paper 002 Fig. 2: the cycle whose
      pseudo-Dice shows no peak is skipped). At its last epoch a cycle is dropped, with its snapshots, when its
      best EMA pseudo-Dice is not higher than the best of the last kept cycle minus the margin
      (best_now <= best_prev - margin); the first cycle is always kept. None: never drop.
    - `snapshot_fractions` (None): paper 002 Table II's "full-train" ensemble instead of the peaks: the
      checkpoints at these fractions of training are the snapshots, e.g. (0.6, 0.7, 0.8, 0.9, 1.0), each the
      weights after round(f x num_epochs) epochs (`fraction_epochs`); top-k, window and dropping do not apply.
    """

    sgdr_T0: int = 100
    sgdr_eta: float = 2.0
    sgdr_lr_max: float | None = 0.1
    sgdr_lr_min: float = 1e-4
    sgdr_cycle_ends: tuple[int, ...] | None = (100, 200, 400, 800)
    snapshot_top_k: int = 3
    snapshot_window: int = 10
    snapshot_drop_margin: float | None = 0.0
    snapshot_fractions: tuple[float, ...] | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 800  # Rel-UNet's run: cycles end at 100, 200, 400, 800
        if self.sgdr_lr_max is not None:
            self.initial_lr = self.sgdr_lr_max
        self.manifest: SnapshotManifest | None = None

    @property
    def cycle_ends(self) -> list[int]:
        return sgdr_cycle_ends(self.num_epochs, self.sgdr_T0, self.sgdr_eta, self.sgdr_cycle_ends)

    @property
    def fraction_epochs(self) -> list[int]:
        """0-based epochs whose end-of-epoch weights are the "full-train" snapshots: round(f x num_epochs) - 1
        per fraction f (0.6 of 800 epochs: epoch 479, the weights after 480 epochs); duplicates merged."""
        return sorted({max(1, round(f * self.num_epochs)) - 1 for f in self.snapshot_fractions or ()})

    def check_sgdr_settings(self) -> None:
        """Refuse to start on cycles that do not fit num_epochs, T0 / eta that the cycle ends would override,
        or a top-k larger than the window."""
        if self.sgdr_cycle_ends is not None:
            ignored = [name for name in ("sgdr_T0", "sgdr_eta")
                       if getattr(type(self), name) != getattr(SGDRSnapshotMixin, name)]
            if ignored:
                raise ValueError(f"{' and '.join(ignored)} are set but ignored while sgdr_cycle_ends="
                                 f"{tuple(self.sgdr_cycle_ends)} is set: set sgdr_cycle_ends = None in the subclass to "
                                 f"use them, or change sgdr_cycle_ends")
        ends = self.cycle_ends  # raises ValueError when the cycles do not fit
        if self.snapshot_fractions is not None:
            fractions = list(self.snapshot_fractions)
            if not fractions or not all(0 < f <= 1 for f in fractions):
                raise ValueError(f"snapshot_fractions must be fractions of training in (0, 1], got {fractions}")
            return
        shortest = min(b - a for a, b in zip([0] + ends, ends))
        if not 1 <= self.snapshot_top_k <= self.snapshot_window:
            raise ValueError(f"snapshot_top_k={self.snapshot_top_k} must lie in 1..snapshot_window="
                             f"{self.snapshot_window}")
        if self.snapshot_window > shortest:
            raise ValueError(f"snapshot_window={self.snapshot_window} is longer than the shortest SGDR cycle "
                             f"({shortest} epochs, cycles end at {ends})")

    def initialize(self):
        try:
            self.check_sgdr_settings()
        except ValueError as e:
            refuse_to_start(self, f"{type(self).__name__}: {e}")
        super().initialize()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, SGDRScheduler(optimizer, self.initial_lr, self.sgdr_lr_min, self.cycle_ends)

    # --- snapshots ---------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return Path(self.output_folder) / MANIFEST

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank != 0:
            return
        fresh = SnapshotManifest(self.__class__.__name__, self.cycle_ends, self.snapshot_top_k,
                                 self.snapshot_window, self.initial_lr, self.sgdr_lr_min,
                                 fractions=None if self.snapshot_fractions is None
                                 else [float(f) for f in self.snapshot_fractions])
        if self.current_epoch > 0 and self.manifest_path.is_file():
            # resumed with --c: keep what was kept before the checkpoint we resumed from
            old = SnapshotManifest.load(self.manifest_path)
            fresh.snapshots = [s for s in old.snapshots if s.epoch < self.current_epoch]
            fresh.dropped_cycles = [c for c in old.dropped_cycles if self.cycle_ends[c] <= self.current_epoch]
        kept = {s.file for s in fresh.snapshots}
        for stale in Path(self.output_folder).glob("checkpoint_snapshot_c*_e*.pth"):
            if stale.name not in kept:
                stale.unlink()
        self.manifest = fresh
        fresh.save(self.manifest_path)

    def on_epoch_end(self):
        if self.local_rank == 0:
            self._consider_snapshot(self.current_epoch)
        super().on_epoch_end()

    def _consider_snapshot(self, epoch: int) -> None:
        ends = self.cycle_ends
        cycle = cycle_of_epoch(epoch, ends)
        if self.snapshot_fractions is not None:  # "full-train": the checkpoints at the given fractions
            if epoch in self.fraction_epochs:
                snapshot = Snapshot(cycle, epoch, float(self.logger.get_value("ema_fg_dice", step=-1)),
                                    float(self.optimizer.param_groups[0]["lr"]), snapshot_filename(cycle, epoch))
                self.manifest.snapshots.append(snapshot)
                self.save_checkpoint(join(self.output_folder, snapshot.file))
                self.manifest.save(self.manifest_path)
            return
        if epoch >= ends[cycle] - self.snapshot_window:
            candidate = Snapshot(cycle, epoch, float(self.logger.get_value("ema_fg_dice", step=-1)),
                                 float(self.optimizer.param_groups[0]["lr"]), snapshot_filename(cycle, epoch))
            kept, evicted = self.manifest.offer(candidate)
            if kept:
                self.save_checkpoint(join(self.output_folder, candidate.file))
            self._remove(evicted)
            if epoch == ends[cycle] - 1:
                self._maybe_drop_cycle(cycle)
            self.manifest.save(self.manifest_path)

    def _maybe_drop_cycle(self, cycle: int) -> None:
        """Drop `cycle` if it shows no peak (class docstring: `snapshot_drop_margin`)."""
        if self.snapshot_drop_margin is None:
            return
        previous = [c for c in range(cycle) if c not in self.manifest.dropped_cycles]
        if not previous:
            return
        best_prev, best_now = self.manifest.best(previous[-1]), self.manifest.best(cycle)
        if best_prev is not None and best_now is not None and best_now <= best_prev - self.snapshot_drop_margin:
            self.print_to_log_file(f"SGDR: dropping cycle {cycle}, no peak (best pseudo-Dice {best_now:.4f} <= "
                                   f"{best_prev:.4f} of cycle {previous[-1]} - {self.snapshot_drop_margin})")
            self._remove(self.manifest.drop_cycle(cycle))

    def _remove(self, snapshots: list[Snapshot]) -> None:
        for s in snapshots:
            path = join(self.output_folder, s.file)
            if os.path.isfile(path):
                os.remove(path)


class nnUNetTrainerSGDR(SGDRSnapshotMixin, CheckedResumeMixin, nnUNetTrainer):
    """Rel-UNet (paper 002): nnU-Net's default network and loss with the paper's SGDR schedule (lr 0.1 -> 1e-4,
    restarts at 100/200/400/800 of 800 epochs) and 3 snapshots per cycle with a peak."""


class XBoundNetTrainerSGDR(SGDRSnapshotMixin, XBoundNetTrainer):
    """XBoundNet++ (LogDice + CE) with paper 002's SGDR schedule and snapshot checkpoints."""


class nnUNetTrainerSGDR_nnUNetLR(nnUNetTrainerSGDR):
    """nnUNetTrainerSGDR with nnU-Net's learning rates instead of paper 002's: lr 1e-2 -> 1e-5."""

    sgdr_lr_max = None
    sgdr_lr_min = 1e-5


class XBoundNetTrainerSGDR_nnUNetLR(XBoundNetTrainerSGDR):
    """XBoundNetTrainerSGDR with nnU-Net's learning rates instead of paper 002's: lr 1e-2 -> 1e-5."""

    sgdr_lr_max = None
    sgdr_lr_min = 1e-5
