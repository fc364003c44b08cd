"""Streaming accumulation of sample probabilities: memory stays constant however many members x samples
(except the bit-packed sample masks that the exact pairwise Dice needs, see `PairwiseIntersections`).

Written by hand rather than stacking samples and calling numpy: each sample is added and dropped, which is
what lets 5 seeds x 5 folds x 50 MC samples (paper 000) fit in the memory of a single prediction.

Mean and variance are accumulated with Welford's update in Chan et al.'s batched form (mean and sum of squared
deviations M2, combined batch by batch), not as E[p^2] - E[p]^2: in float32 that difference cancels
catastrophically when the variance is small next to p^2 (a variance of 1e-6 at p ~ 0.5 came out with a
relative error of several per cent); Welford's M2 keeps the relative error at float32 precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from nnunet_kaz.uncertainty.measures import batch_normalized_entropy, mean_pairwise_dice


class PairwiseIntersections:
    """Exact |S_i & S_j| for every pair of binary masks streamed one at a time (paper 004's mean pairwise Dice).

    Each mask is kept bit-packed (np.packbits, 1 bit per voxel, in 64-bit words) over a frame: the bounding
    box of every non-empty mask seen so far. A mask that reaches outside the frame grows it and the stored
    masks are re-packed into the larger frame. Each new mask is intersected with every stored one by AND and
    popcount (np.bitwise_count), so the (N, N) intersection matrix is exact and complete after the last
    sample. Memory: N * ceil(|frame| / 64) * 8 bytes (`nbytes`; rows are stored in blocks of up to 4 MiB, so
    at most one block is partly empty), where |frame| is the union bounding box's voxel count; time: N^2 / 2
    popcounts over the frame.
    """

    BLOCK_BYTES = 4 << 20

    def __init__(self, spatial_shape: Sequence[int]):
        self.shape = tuple(int(s) for s in spatial_shape)
        self.lo: np.ndarray | None = None  # frame box [lo, hi) per axis
        self.hi: np.ndarray | None = None
        self._blocks: list[np.ndarray] = []  # (rows, words) uint64 blocks of packed masks (zeros: empty mask)
        self._n_rows = 0
        self._inter = np.zeros((16, 16), dtype=np.int64)  # capacity grows by half, so growing is O(N^2) in all
        self._n_before_frame = 0           # empty masks added before any frame existed

    @property
    def n(self) -> int:
        return self._n_before_frame + self._n_rows

    @property
    def inter(self) -> np.ndarray:
        """(N, N) int64: |S_i & S_j|, the diagonal holding the volumes |S_i|."""
        return self._inter[: self.n, : self.n]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored packed masks (the last block may hold up to 4 MiB of not yet used rows)."""
        return self._n_rows * (self._blocks[0].shape[1] * 8 if self._blocks else 0)

    def _frame(self) -> tuple[slice, ...]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))

    def _frame_shape(self) -> tuple[int, ...]:
        return tuple(int(b - a) for a, b in zip(self.lo, self.hi))

    @staticmethod
    def _pack(mask: np.ndarray) -> np.ndarray:
        packed = np.packbits(mask.ravel())
        pad = (-packed.size) % 8
        if pad:
            packed = np.concatenate([packed, np.zeros(pad, dtype=np.uint8)])
        return packed.view(np.uint64)

    def _unpack(self, row: np.ndarray) -> np.ndarray:
        shape = self._frame_shape()
        return np.unpackbits(row.view(np.uint8), count=int(np.prod(shape))).reshape(shape).astype(bool)

    def _rows(self):
        """(block, number of filled rows) pairs."""
        left = self._n_rows
        for block in self._blocks:
            yield block, min(left, len(block))
            left -= len(block)

    def _append(self, row: np.ndarray) -> None:
        filled = self._n_rows - sum(len(b) for b in self._blocks[:-1]) if self._blocks else 0
        if not self._blocks or filled == len(self._blocks[-1]):
            per_block = max(1, min(256, self.BLOCK_BYTES // max(row.nbytes, 1)))
            self._blocks.append(np.zeros((per_block, row.size), dtype=np.uint64))
            filled = 0
        self._blocks[-1][filled] = row
        self._n_rows += 1

    def _reframe(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Re-pack every stored mask into the larger frame [lo, hi)."""
        old = tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(self.lo, self.hi, lo))
        new_shape = tuple(int(b - a) for a, b in zip(lo, hi))
        rows = [block[k] for block, filled in self._rows() for k in range(filled)]
        self._blocks, self._n_rows = [], 0
        for row in rows:
            grown = np.zeros(new_shape, dtype=bool)
            grown[old] = self._unpack(row)
            self._append(self._pack(grown))
        self.lo, self.hi = lo, hi

    def add(self, mask: np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise ValueError(f"mask of shape {mask.shape} added to pairwise intersections of shape {self.shape}")
        n = self.n
        if n == len(self._inter):
            grown = np.zeros((n + n // 2, n + n // 2), dtype=np.int64)
            grown[:n, :n] = self._inter
            self._inter = grown
        if not mask.any():
            if self.lo is None:
                self._n_before_frame += 1
            else:
                self._append(np.zeros(self._blocks[0].shape[1], dtype=np.uint64))
            return
        extent = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != d)))
                  for d in range(mask.ndim)]
        lo = np.array([e[0] for e in extent])
        hi = np.array([e[-1] + 1 for e in extent])
        if self.lo is None:
            self.lo, self.hi = lo, hi
            empty = self._pack(np.zeros(self._frame_shape(), dtype=bool))
            for _ in range(self._n_before_frame):
                self._append(empty)
            self._n_before_frame = 0
        elif (lo < self.lo).any() or (hi > self.hi).any():
            self._reframe(np.minimum(lo, self.lo), np.maximum(hi, self.hi))
        row = self._pack(mask[self._frame()])
        counts = [np.bitwise_count(block[:filled] & row).sum(axis=1, dtype=np.int64)
                  for block, filled in self._rows() if filled]
        counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
        self._inter[n, :n] = self._inter[:n, n] = counts
        self._inter[n, n] = int(mask.sum())
        self._append(row)


@dataclass
class AccumulatedStats:
    """What the maps and scores need, in the space the samples were added in (see `StreamingStats`)."""

    n_samples: int
    mean: np.ndarray            # (C, *spatial) mean probability (paper 002 eq. 3)
    mean_sq: np.ndarray         # (C, *spatial) mean of squared probabilities (= var + mean^2)
    mean_plogp: np.ndarray      # (C, *spatial) (1/N) sum_i p_i ln p_i, per class
    mean_entropy: np.ndarray    # (*spatial) (1/N) sum_i normalized_entropy(p_i)
    counts: np.ndarray          # (C, *spatial) number of samples with p_i >= 0.5
    volumes: np.ndarray         # (N, C) voxels with p_i >= 0.5, per sample and class
    var: np.ndarray | None = None  # (C, *spatial) population variance (Welford); None: from mean_sq
    intersections: dict[int, np.ndarray] | None = None  # channel -> (N, N) |S_i & S_j| of the 0.5-masks

    @property
    def variance(self) -> np.ndarray:
        if self.var is not None:
            return self.var
        return np.clip(self.mean_sq - self.mean ** 2, 0.0, None)

    def pairwise_dice(self, channel: int) -> float:
        """Paper 004's exact mean pairwise Dice of the samples' 0.5-thresholded masks of `channel`
        (`measures.mean_pairwise_dice`); NaN if that channel was not tracked."""
        if not self.intersections or channel not in self.intersections:
            return float("nan")
        return mean_pairwise_dice(self.intersections[channel], self.volumes[:, channel])


class StreamingStats:
    """Add (B, C, *spatial) probability batches one after another; `result()` gives `AccumulatedStats`.

    `pairwise_channels`: channels whose sample masks are kept bit-packed for the exact pairwise Dice
    (default: every foreground channel, i.e. all channels for regions, channels 1.. for softmax; () for none).
    """

    def __init__(self, n_channels: int, spatial_shape: tuple[int, ...], regions: bool = False,
                 device: torch.device | str = "cpu", pairwise_channels: Sequence[int] | None = None):
        self.regions = regions
        shape = (n_channels, *spatial_shape)
        self.sum_mean = torch.zeros(shape, dtype=torch.float32, device=device)  # running mean (Welford)
        self.m2 = torch.zeros(shape, dtype=torch.float32, device=device)        # sum of squared deviations
        self.sum_plogp = torch.zeros(shape, dtype=torch.float32, device=device)
        self.sum_entropy = torch.zeros(spatial_shape, dtype=torch.float32, device=device)
        self.counts = torch.zeros(shape, dtype=torch.int32, device=device)
        self.volumes: list[np.ndarray] = []
        if pairwise_channels is None:
            pairwise_channels = range(n_channels) if regions else range(1, n_channels)
        self.pairwise = {int(c): PairwiseIntersections(spatial_shape) for c in pairwise_channels}

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        probs = probs.to(self.sum_mean.device, torch.float32)
        if probs.ndim == self.sum_mean.ndim:
            probs = probs[None]
        n_before, b = self.n_samples, probs.shape[0]
        n_after = n_before + b
        batch_mean = probs.mean(0)
        delta = batch_mean - self.sum_mean
        self.sum_mean += delta * (b / n_after)
        self.m2 += ((probs - batch_mean) ** 2).sum(0) + delta * delta * (n_before * b / n_after)
        self.sum_plogp += torch.xlogy(probs, probs).sum(0)
        self.sum_entropy += batch_normalized_entropy(probs, self.regions).sum(0)
        binary = probs >= 0.5
        self.counts += binary.sum(0, dtype=torch.int32)
        self.volumes.extend(binary.flatten(2).sum(-1).cpu().numpy())
        for channel, acc in self.pairwise.items():
            masks = binary[:, channel].cpu().numpy()
            for mask in masks:
                acc.add(mask)

    @property
    def n_samples(self) -> int:
        return len(self.volumes)

    @property
    def pairwise_nbytes(self) -> int:
        """Bytes held by the bit-packed sample masks (the exact pairwise Dice's memory)."""
        return sum(acc.nbytes for acc in self.pairwise.values())

    def result(self) -> AccumulatedStats:
        n = self.n_samples
        if n == 0:
            raise ValueError("no samples were added")
        mean = self.sum_mean.cpu().numpy()
        var = (self.m2 / n).clamp_min_(0.0).cpu().numpy()
        return AccumulatedStats(n, mean, var + mean * mean, (self.sum_plogp / n).cpu().numpy(),
                                (self.sum_entropy / n).cpu().numpy(), self.counts.cpu().numpy(),
                                np.stack(self.volumes).astype(np.int64), var=var,
                                intersections={c: acc.inter.copy() for c, acc in self.pairwise.items()})
