"""Streaming accumulation of sample probabilities: memory stays constant however many members x samples.

Written by hand rather than stacking samples and calling numpy: each sample is added and dropped, which is
what lets 5 seeds x 5 folds x 50 MC samples (paper 000) fit in the memory of a single prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nnunet_kaz.uncertainty.measures import batch_normalized_entropy


@dataclass
class AccumulatedStats:
    """What the maps and scores need, in the space the samples were added in (see `StreamingStats`)."""

    n_samples: int
    mean: np.ndarray            # (C, *spatial) mean probability (paper 002 eq. 3)
    mean_sq: np.ndarray         # (C, *spatial) mean of squared probabilities
    mean_plogp: np.ndarray      # (C, *spatial) (1/N) sum_i p_i ln p_i, per class
    mean_entropy: np.ndarray    # (*spatial) (1/N) sum_i normalized_entropy(p_i)
    counts: np.ndarray          # (C, *spatial) number of samples with p_i >= 0.5
    volumes: np.ndarray         # (N, C) voxels with p_i >= 0.5, per sample and class

    @property
    def variance(self) -> np.ndarray:
        return np.clip(self.mean_sq - self.mean ** 2, 0.0, None)


class StreamingStats:
    """Add (B, C, *spatial) probability batches one after another; `result()` gives `AccumulatedStats`."""

    def __init__(self, n_channels: int, spatial_shape: tuple[int, ...], regions: bool = False,
                 device: torch.device | str = "cpu"):
        self.regions = regions
        shape = (n_channels, *spatial_shape)
        self.sum_p = torch.zeros(shape, dtype=torch.float32, device=device)
        self.sum_p2 = torch.zeros(shape, dtype=torch.float32, device=device)
        self.sum_plogp = torch.zeros(shape, dtype=torch.float32, device=device)
        self.sum_entropy = torch.zeros(spatial_shape, dtype=torch.float32, device=device)
        self.counts = torch.zeros(shape, dtype=torch.int32, device=device)
        self.volumes: list[np.ndarray] = []

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        probs = probs.to(self.sum_p.device, torch.float32)
        if probs.ndim == self.sum_p.ndim:
            probs = probs[None]
        self.sum_p += probs.sum(0)
        self.sum_p2 += (probs * probs).sum(0)
        self.sum_plogp += torch.xlogy(probs, probs).sum(0)
        self.sum_entropy += batch_normalized_entropy(probs, self.regions).sum(0)
        binary = probs >= 0.5
        self.counts += binary.sum(0, dtype=torch.int32)
        self.volumes.extend(binary.flatten(2).sum(-1).cpu().numpy())

    @property
    def n_samples(self) -> int:
        return len(self.volumes)

    def result(self) -> AccumulatedStats:
        n = self.n_samples
        if n == 0:
            raise ValueError("no samples were added")
        return AccumulatedStats(n, (self.sum_p / n).cpu().numpy(), (self.sum_p2 / n).cpu().numpy(),
                                (self.sum_plogp / n).cpu().numpy(), (self.sum_entropy / n).cpu().numpy(),
                                self.counts.cpu().numpy(),
                                np.stack(self.volumes).astype(np.int64))
