"""Losses for XBoundNet++: alpha * LogDice + (1 - alpha) * cross-entropy (paper 000 eq. 1).

Built from nnU-Net's own compound losses so ignore labels, region training (sigmoid / BCE), batch Dice and
deep supervision behave exactly as in nnU-Net; only the Dice term is replaced by its negative log.
"""
from __future__ import annotations

import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

LOGDICE_EPS = 1e-7


class MemoryEfficientLogDiceLoss(MemoryEfficientSoftDiceLoss):
    """LogDice = -log(soft Dice), soft Dice as nnU-Net's MemoryEfficientSoftDiceLoss computes it.

    soft Dice = mean over classes of (2 * sum(p * y) + smooth) / (sum(p) + sum(y) + smooth), with p the
    softmax (or sigmoid for regions) probabilities; the log is taken of the class mean (paper 000 eq. 1,
    "LogDiceLoss"). The Dice is clamped at 1e-7 so an all-wrong batch gives a finite loss.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        soft_dice = -super().forward(x, y, loss_mask)
        return -torch.log(soft_dice.clamp_min(LOGDICE_EPS))


def build_logdice_ce_loss(has_regions: bool, batch_dice: bool, alpha: float = 0.7,
                          ignore_label: int | None = None, is_ddp: bool = False) -> nn.Module:
    """alpha * LogDice + (1 - alpha) * CE (softmax labels) or BCE (regions), paper 000 eq. 1 with alpha = 0.7.

    Background is excluded from the Dice for labels and included for regions, as nnU-Net does.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if has_regions:
        return DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": is_ddp},
                               weight_ce=1 - alpha, weight_dice=alpha,
                               use_ignore_label=ignore_label is not None,
                               dice_class=MemoryEfficientLogDiceLoss)
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": is_ddp}, {},
                          weight_ce=1 - alpha, weight_dice=alpha, ignore_label=ignore_label,
                          dice_class=MemoryEfficientLogDiceLoss)
