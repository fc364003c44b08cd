"""SGDR warm restarts with snapshot checkpoints (Rel-UNet, paper 002 section III-C).

Learning rate (standard SGDR; paper 002's eq. 2 is garbled, see papers/INDEX.md):
    lr(t) = lr_min + (lr_max - lr_min) / 2 * (1 + cos(pi * t_cur / T_i))
with t_cur the epochs since the last restart and T_i = T_0 * eta**i the length of cycle i, or cycle ends given
explicitly (Rel-UNet's 800-epoch run ends cycles at epochs 100, 200, 400, 800: paper 002 Appendix A gives
T_0 = 100 and T_mult = 2 but restarts "around epochs 100, 200, 400, and 800", which T_i = T_0 * 2^i, ending
cycles at 100, 300, 700, cannot produce; the authors' scheduler compares the global epoch with a doubling
period, which gives the doubling ends. Within each cycle the rate is torch's CosineAnnealingWarmRestarts.)
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler


def sgdr_cycle_ends(num_epochs: int, t0: int, eta: float = 1.0,
                    cycle_ends: Sequence[int] | None = None) -> list[int]:
    """Epochs (exclusive) at which the cycles end; they must tile [0, num_epochs) exactly.

    Raises ValueError naming the fix when the cycles do not fit `num_epochs`.
    """
    if cycle_ends is not None:
        ends = [int(e) for e in cycle_ends]
        if not ends or any(b <= a for a, b in zip([0] + ends, ends)):
            raise ValueError(f"sgdr_cycle_ends must be strictly increasing positive epochs, got {list(cycle_ends)}")
    else:
        if t0 < 1 or eta < 1:
            raise ValueError(f"need sgdr_T0 >= 1 and sgdr_eta >= 1, got T0={t0}, eta={eta}")
        ends, length = [], float(t0)
        while not ends or ends[-1] < num_epochs:
            ends.append((ends[-1] if ends else 0) + int(round(length)))
            length *= eta
    if ends[-1] != num_epochs:
        fix = (f"change sgdr_cycle_ends so that its last epoch is num_epochs, or set sgdr_cycle_ends = None to use "
               f"sgdr_T0 / sgdr_eta" if cycle_ends is not None else
               "change num_epochs or sgdr_T0 / sgdr_eta, or give sgdr_cycle_ends")
        raise ValueError(f"SGDR cycles ending at epochs {ends} do not fit num_epochs={num_epochs}: the last "
                         f"cycle must end exactly at num_epochs ({fix})")
    return ends


def sgdr_lr(epoch: int, cycle_ends: Sequence[int], lr_max: float, lr_min: float) -> float:
    """Cosine annealing with warm restarts at `cycle_ends` (paper 002 section III-C, standard SGDR formula)."""
    cycle = cycle_of_epoch(epoch, cycle_ends)
    start = cycle_ends[cycle - 1] if cycle > 0 else 0
    t_i = cycle_ends[cycle] - start
    return lr_min + (lr_max - lr_min) / 2 * (1 + math.cos(math.pi * (epoch - start) / t_i))


def cycle_of_epoch(epoch: int, cycle_ends: Sequence[int]) -> int:
    """Index of the cycle an epoch belongs to (the last cycle for epochs past the end)."""
    return min(bisect.bisect_right(cycle_ends, epoch), len(cycle_ends) - 1)


class SGDRScheduler(_LRScheduler):
    """Stepped with the epoch number, like nnU-Net's PolyLRScheduler (`step(current_epoch)`), so resuming
    a run with `--c` lands on the same learning rate without any scheduler state."""

    def __init__(self, optimizer: Optimizer, lr_max: float, lr_min: float, cycle_ends: Sequence[int]):
        self.lr_max, self.lr_min, self.cycle_ends = lr_max, lr_min, list(cycle_ends)
        self.ctr = 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = sgdr_lr(current_step, self.cycle_ends, self.lr_max, self.lr_min)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)
