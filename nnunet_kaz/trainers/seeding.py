"""Seeded training (paper 000 section 2.1: 5 seeds x 5 folds). nnU-Net itself sets no seeds.

The seed fixes the weight initialisation, the augmentation stream and the dropout masks:
- `torch`, `numpy` and `random` are seeded (rank-aware: rank r uses seed + r) before the network is built,
  so initialisation and, with `nnUNet_n_proc_DA=0`, the single-threaded augmentation and the dropout masks
  follow from it: on the CPU the same seed gives bit-identical weights after N iterations.
- With augmentation workers (`nnUNet_n_proc_DA` > 0) each worker w gets the seed
  `derive_seed(seed, rank, w)`, so every worker's stream is fixed; the order in which nnU-Net's
  NonDetMultiThreadedAugmenter hands their batches over is not, so runs are then repeatable in distribution
  only.
- Not deterministic on GPUs even with a seed: cuDNN autotuning (`nnUNetv2_train` sets
  `cudnn.benchmark = True`), atomic-add reductions in convolution backward passes and interpolation, and
  mixed-precision loss scaling make weights drift apart after a few iterations.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(seed: int, *stream: int) -> int:
    """A 32-bit seed for a sub-stream (rank, worker, ...) derived from `seed` with numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeededTrainerMixin:
    """Put before an nnUNetTrainer class; `seed` (class attribute) seeds init, augmentation and dropout."""

    seed: int = 0

    def initialize(self):
        seed_everything(self.seed + self.local_rank)
        self.print_to_log_file(f"Seed {self.seed} (rank {self.local_rank})")
        super().initialize()

    def get_dataloaders(self):
        train, val = super().get_dataloaders()
        for gen, offset in ((train, 0), (val, 1000)):
            if hasattr(gen, "seeds") and hasattr(gen, "restart"):
                # nnU-Net starts its workers with seeds=None (OS entropy); restart them with derived seeds
                gen.seeds = [derive_seed(self.seed, self.local_rank, offset + w) for w in range(len(gen.seeds))]
                gen.restart()
                next(gen)
        return train, val
