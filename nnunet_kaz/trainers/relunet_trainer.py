"""Rel-UNet's training recipe (paper 002 section III-C and Appendix A) as one trainer for the stock command:

    nnUNetv2_plan_and_preprocess -d D -pl nnUNetPlannerResEncL -c 2d       # nnU-Net ResEnc L, 2D axial slices
    nnUNetv2_train D 2d F -tr RelUNetTrainer -p nnUNetResEncUNetLPlans

- network: whatever the plans build; the recipe is nnU-Net's ResEnc L (`nnUNetPlannerResEncL`) on the 2d
  configuration (nnU-Net's own axial slicing). Other plans train too, with one warning in the training log.
- loss: soft Dice only ("The loss function is Dice Loss"), nnU-Net's `MemoryEfficientSoftDiceLoss` exactly as
  nnU-Net's own `nnUNetTrainerDiceLoss` builds it (foreground classes, or every region with a sigmoid; batch Dice
  as planned; smooth 1e-5), with deep supervision as nnU-Net's (a network with one output keeps it).
- optimiser and schedule: SGD (nnU-Net's: momentum 0.99, Nesterov, weight decay 3e-5) with SGDR, lr 0.1 -> 1e-4,
  restarts at 100 / 200 / 400 / 800 of 800 epochs, top 3 snapshots around each cycle's peak, the cycle without a
  peak dropped (`SGDRSnapshotMixin`, as `nnUNetTrainerSGDR`).
- batch size 40 (`relunet_batch_size`; None keeps the plans' batch size), split over DDP workers as nnU-Net
  splits a planned one. Written into the trainer's configuration before nnU-Net reads it, so `debug.json` and
  the data loaders see 40; the plans files are not changed.

The authors' fork (sinaziaee/sgdr) trains with Dice + CE in its published trainer; the paper states Dice loss,
and the paper wins (AUTHORS_CODE.md). `RelUNetTrainer_fullTrain` is Table II's "full-train" ensemble: the same
recipe, the checkpoints at 60 / 70 / 80 / 90 / 100 % of training as the snapshots (`snapshot_fractions`).
"""
from __future__ import annotations

import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import nn

from nnunet_kaz.trainers.checked_resume import CheckedResumeMixin
from nnunet_kaz.trainers.sgdr_trainer import SGDRSnapshotMixin
from nnunet_kaz.trainers.xboundnet_trainer import wrap_deep_supervision

RELUNET_NETWORK = "ResidualEncoderUNet"  # nnU-Net ResEnc L (nnUNetPlannerResEncL -> nnUNetResEncUNetLPlans)
FULL_TRAIN_FRACTIONS = (0.6, 0.7, 0.8, 0.9, 1.0)  # paper 002 Table II, "full-train"


class RelUNetTrainer(SGDRSnapshotMixin, CheckedResumeMixin, nnUNetTrainer):
    """Rel-UNet (paper 002): SGDR snapshots of nnU-Net ResEnc L on 2D slices, Dice loss only, batch size 40
    (module docstring). Class attributes: `relunet_batch_size` (40; None: the plans'), and those of
    `SGDRSnapshotMixin` (`snapshot_fractions` for the full-train ensemble)."""

    relunet_batch_size: int | None = 40

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.relunet_batch_size is not None:
            # the trainer's own copy of the configuration (deep-copied from the plans): nnU-Net reads the batch
            # size from it in initialize() (_set_batch_size_and_oversample), DDP split included
            self.configuration_manager.configuration["batch_size"] = int(self.relunet_batch_size)

    def initialize(self):
        super().initialize()
        network = self.configuration_manager.network_arch_class_name
        if not network.endswith(RELUNET_NETWORK):
            self.print_to_log_file(f"warning: {type(self).__name__} follows Rel-UNet (paper 002), which trains nnU-Net "
                                   f"ResEnc L (nnUNetPlannerResEncL, -p nnUNetResEncUNetLPlans); these plans build "
                                   f"{network.rsplit('.', 1)[-1]}")

    def _build_loss(self) -> nn.Module:
        loss = MemoryEfficientSoftDiceLoss(batch_dice=self.configuration_manager.batch_dice,
                                           do_bg=self.label_manager.has_regions, smooth=1e-5, ddp=self.is_ddp,
                                           apply_nonlin=torch.sigmoid if self.label_manager.has_regions
                                           else softmax_helper_dim1)
        if self.enable_deep_supervision:
            loss = wrap_deep_supervision(loss, len(self._get_deep_supervision_scales()), self.is_ddp,
                                         self._do_i_compile())
        return loss


class RelUNetTrainer_fullTrain(RelUNetTrainer):
    """Paper 002 Table II's "full-train" ensemble: `RelUNetTrainer`'s recipe, and the checkpoints at 60, 70, 80,
    90 and 100 % of training kept as the snapshots (`snapshot_fractions`) instead of the SGDR peaks; predict them
    with `RESULTS_DIR:FOLD:snapshots` like any snapshot run."""

    snapshot_fractions = FULL_TRAIN_FRACTIONS
