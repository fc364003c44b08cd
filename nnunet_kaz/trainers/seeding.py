"""Seeded training (paper 000 section 2.1: 5 seeds x 5 folds). nnU-Net itself sets no seeds.

The seed fixes the weight initialisation, the augmentation stream and the dropout masks:
- `torch`, `numpy` and `random` are seeded before the network is built, so initialisation and, with
  `nnUNet_n_proc_DA=0`, the single-threaded augmentation and the dropout masks follow from it: on the CPU the
  same seed gives bit-identical weights after N iterations. Under DDP every rank r gets its own stream,
  `rank_seed(seed, r)`: rank 0 (a single-process run) the seed itself, rank r >= 1 `derive_seed(seed, r)`; the
  old seed + r gave rank 1 of seed s the stream of rank 0 of seed s + 1.
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


def rank_seed(seed: int, rank: int) -> int:
    """The seed of DDP rank `rank` in a run seeded `seed`: `seed` on rank 0, so a single-process run (rank 0)
    keeps its stream, and `derive_seed(seed, rank)` on the other ranks (a 32-bit SeedSequence hash of the pair).
    Distinct (seed, rank) pairs share a stream only if a hash equals a seed or another hash, 2^-32 per pair;
    tests/test_ddp.py checks seeds 0-999 x ranks 0-7."""
    return seed if rank == 0 else derive_seed(seed, rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeededTrainerMixin:
    """Put before an nnUNetTrainer class; `seed` (class attribute) seeds init, augmentation and dropout."""

    seed: int = 0

    def initialize(self):
        seed = rank_seed(self.seed, self.local_rank)
        seed_everything(seed)
        self.print_to_log_file(f"Seed {self.seed} (rank {self.local_rank}: stream seed {seed})")
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
