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

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from nnunet_kaz.uncertainty.measures import batch_normalized_entropy, mean_pairwise_dice, slabs


class PairwiseIntersections:
    """Exact |S_i & S_j| for every pair of binary masks streamed one at a time (paper 004's mean pairwise Dice).

    Each mask is kept bit-packed (np.packbits, 1 bit per voxel, in 64-bit words) over a frame: the bounding
    box of every non-empty mask seen so far. A mask that reaches outside the frame grows it and the stored
    masks are re-packed into the larger frame. Each new mask is intersected with every stored one by AND and
    popcount (np.bitwise_count), so the (N, N) intersection matrix is exact and complete after the last
    sample; time: N^2 / 2 popcounts over the frame.

    Memory: rows are stored in blocks of up to 4 MiB; a full block is zlib-compressed (level 1, lossless) and
    inflated one block at a time while a new mask is intersected. Segmentation masks are blobs, whose packed
    words are long runs of zeros and ones, so the blocks shrink many times (bench_predict_3d: 50 samples of a
    256^3 volume); at worst (noise) they stay N * ceil(|frame| / 64) * 8 bytes, |frame| the union bounding box's
    voxel count. Plus the open block (<= 4 MiB) and, while adding, one inflated block. Compressed rather than
    capped, so that the pairwise Dice stays exact whatever N.
    """

    BLOCK_BYTES = 4 << 20

    def __init__(self, spatial_shape: Sequence[int]):
        self.shape = tuple(int(s) for s in spatial_shape)
        self.lo: np.ndarray | None = None  # frame box [lo, hi) per axis
        self.hi: np.ndarray | None = None
        # (rows, words) uint64 blocks of packed masks (zeros: empty mask): the last one open (an array), the
        # others full and compressed, (zlib bytes, shape)
        self._blocks: list[np.ndarray | tuple[bytes, tuple[int, int]]] = []
        self._n_rows = 0
        self._open_rows = 0                # filled rows of the open (last) block
        self._words = 0                    # uint64 words per packed row of the current frame
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
        """Bytes of the stored masks: the compressed blocks and the filled rows of the open block (which may hold
        up to 4 MiB of not yet used rows)."""
        return sum(len(b[0]) for b in self._blocks[:-1]) + self._open_rows * self._words * 8

    @property
    def packed_nbytes(self) -> int:
        """Bytes the stored masks would hold uncompressed: N * ceil(|frame| / 64) * 8."""
        return self._n_rows * self._words * 8

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

    def _unpack(self, row: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.unpackbits(row.view(np.uint8), count=int(np.prod(shape))).reshape(shape).astype(bool)

    @staticmethod
    def _inflate(block) -> np.ndarray:
        if isinstance(block, np.ndarray):
            return block
        data, shape = block
        return np.frombuffer(zlib.decompress(data), dtype=np.uint64).reshape(shape)

    def _rows(self, blocks=None, n_rows=None):
        """(block array, number of filled rows) pairs, compressed blocks inflated one at a time."""
        blocks = self._blocks if blocks is None else blocks
        left = self._n_rows if n_rows is None else n_rows
        for block in blocks:
            arr = self._inflate(block)
            yield arr, min(left, len(arr))
            left -= len(arr)

    def _append(self, row: np.ndarray) -> None:
        if not self._blocks or self._open_rows == len(self._blocks[-1]):
            if self._blocks:  # the open block is full: compress it
                full = self._blocks[-1]
                self._blocks[-1] = (zlib.compress(full.tobytes(), 1), full.shape)
            per_block = max(1, min(256, self.BLOCK_BYTES // max(row.nbytes, 1)))
            self._blocks.append(np.zeros((per_block, row.size), dtype=np.uint64))
            self._open_rows = 0
        self._blocks[-1][self._open_rows] = row
        self._open_rows += 1
        self._n_rows += 1
        self._words = row.size

    def _reframe(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Re-pack every stored mask into the larger frame [lo, hi), one old block inflated at a time."""
        old_shape = self._frame_shape()
        old = tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(self.lo, self.hi, lo))
        new_shape = tuple(int(b - a) for a, b in zip(lo, hi))
        blocks, n_rows = self._blocks, self._n_rows
        self._blocks, self._n_rows, self._open_rows = [], 0, 0
        for block, filled in self._rows(blocks, n_rows):
            for k in range(filled):
                grown = np.zeros(new_shape, dtype=bool)
                grown[old] = self._unpack(block[k], old_shape)
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
                self._append(np.zeros(self._words, dtype=np.uint64))
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


def count_dtype(max_samples: int | None) -> torch.dtype:
    """The smallest integer type that counts up to `max_samples` exactly (uint8 up to 255 samples, int16 up to
    32767, else int32): the per-voxel counts are exact in any of them, so this is memory only (issue 15)."""
    if max_samples is not None and max_samples <= 255:
        return torch.uint8
    if max_samples is not None and max_samples <= 32767:
        return torch.int16
    return torch.int32


def accumulator_bytes_per_voxel(n_channels: int, max_samples: int | None = None) -> int:
    """Bytes per voxel of `StreamingStats`' dense accumulators (running mean, M2, sum p ln p: float32 per class;
    sum of sample entropies: float32; 0.5-counts per class in `count_dtype`), without the bit-packed masks; for
    one sample, the sample itself (float32 per class)."""
    if max_samples == 1:
        return 4 * n_channels
    return 12 * n_channels + 4 + n_channels * torch.empty(0, dtype=count_dtype(max_samples)).element_size()


@dataclass
class AccumulatedStats:
    """What the maps and scores need, in the space the samples were added in (see `StreamingStats`).

    The arrays share the accumulators' memory where they lie on the CPU (no copy at the end of a case); a
    consumer that is done with one may set it to None to free it before the next one is exported."""

    n_samples: int
    mean: np.ndarray            # (C, *spatial) mean probability (paper 002 eq. 3)
    var: np.ndarray | None      # (C, *spatial) population variance (Welford); None: one sample, all 0
    mean_plogp: np.ndarray | None  # (C, *spatial) (1/N) sum_i p_i ln p_i per class; None: from `mean` (1 sample)
    mean_entropy: np.ndarray | None  # (*spatial) (1/N) sum_i normalized_entropy(p_i); None: from `mean`
    counts: np.ndarray          # (C, *spatial) number of samples with p_i >= 0.5 (`count_dtype`)
    volumes: np.ndarray         # (N, C) voxels with p_i >= 0.5, per sample and class
    intersections: dict[int, np.ndarray] | None = None  # channel -> (N, N) |S_i & S_j| of the 0.5-masks
    pairwise_nbytes: int = 0    # bytes the bit-packed sample masks held (the exact pairwise Dice's memory)

    regions: bool = False

    @property
    def variance(self) -> np.ndarray:
        return self.var if self.var is not None else np.zeros(self.counts.shape, dtype=np.float32)  # N = 1: 0

    def sample_entropy(self) -> np.ndarray:
        """(*spatial) mean normalised entropy of the samples; of the one sample `mean` is when it was not stored
        (`batch_normalized_entropy`, slab by slab)."""
        if self.mean_entropy is not None:
            return self.mean_entropy
        mean = torch.from_numpy(self.mean)
        out = torch.empty(mean.shape[1:], dtype=torch.float32)
        for sl in slabs(mean.shape[1:], StreamingStats.SLAB_VOXELS):
            out[sl] = batch_normalized_entropy(mean[None, :, sl], self.regions)[0]
        return out.numpy()

    def u_sample(self, channel: int) -> np.ndarray:
        """Paper 004's U(x) = -(1/N) sum_i p_i ln p_i of one class (nats)."""
        if self.mean_plogp is not None:
            return -self.mean_plogp[channel]
        p = torch.from_numpy(self.mean[channel])
        return torch.xlogy(p, p).neg_().numpy()

    @property
    def mean_sq(self) -> np.ndarray:
        """(C, *spatial) mean of squared probabilities, var + mean^2 (computed on demand: a new array)."""
        return self.var + self.mean * self.mean

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
    `max_samples`: the number of samples that will be added, if known: the counts then use the smallest exact
    integer type (`count_dtype`). `pin_memory`: CPU accumulators in page-locked memory (the GPU fallback: device
    batches are copied into them slab by slab).

    Memory (issue 15, measured in benchmarks/bench_predict_3d.py): the dense accumulators hold
    `accumulator_bytes_per_voxel` (13 C + 4 bytes for up to 255 samples, 14 C + 4 up to 32767); `add` works through the
    batch in slabs of the first spatial axis of about `SLAB_VOXELS` voxels, so its temporaries (batch mean,
    deltas, squares, p ln p, entropies, masks: ~10 float32 copies of the batch when done on the whole volume,
    which was most of the predictor's peak on 3D volumes) are bounded by a few MiB whatever the volume. Every
    voxel's arithmetic is the same as on the whole volume, so the results are identical (bit for bit).
    """

    SLAB_VOXELS = 1 << 18

    def __init__(self, n_channels: int, spatial_shape: tuple[int, ...], regions: bool = False,
                 device: torch.device | str = "cpu", pairwise_channels: Sequence[int] | None = None,
                 max_samples: int | None = None, pin_memory: bool = False):
        self.regions = regions
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        shape = (n_channels, *self.spatial_shape)
        device = torch.device(device)
        pin = bool(pin_memory) and device.type == "cpu" and torch.cuda.is_available()

        def zeros(size, dtype=torch.float32):
            return torch.zeros(size, dtype=dtype, device=device, pin_memory=pin)

        self.shape, self.device, self.max_samples = shape, device, max_samples
        # one sample (one member, no MC): nothing is accumulated, the sample is kept as the mean and everything
        # else derived from it on demand (var 0, p ln p, entropy, counts: the values the accumulators give for
        # N = 1). On a 3D volume this keeps 4 C instead of 13 C + 4 bytes per voxel (bench_predict_3d).
        self.single = max_samples == 1
        if self.single:
            self.sum_mean = self.m2 = self.sum_plogp = self.sum_entropy = self.counts = None
        else:
            self.sum_mean = zeros(shape)  # running mean (Welford)
            self.m2 = zeros(shape)        # sum of squared deviations
            self.sum_plogp = zeros(shape)
            self.sum_entropy = zeros(self.spatial_shape)
            self.counts = zeros(shape, count_dtype(max_samples))
        self.volumes: list[np.ndarray] = []
        if pairwise_channels is None:
            pairwise_channels = range(n_channels) if regions else range(1, n_channels)
        self.pairwise = {int(c): PairwiseIntersections(self.spatial_shape) for c in pairwise_channels}
        self._result: AccumulatedStats | None = None

    def _slabs(self) -> list[slice]:
        return slabs(self.spatial_shape, self.SLAB_VOXELS)

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        if self._result is not None:
            raise ValueError("samples added after result(): the accumulators were turned into the statistics")
        if probs.ndim == len(self.shape):
            probs = probs[None]
        if tuple(probs.shape[1:]) != self.shape:
            raise ValueError(f"probabilities of shape {tuple(probs.shape[1:])} added to accumulators of shape "
                             f"{self.shape}")
        n_before, b = self.n_samples, probs.shape[0]
        if self.max_samples is not None and n_before + b > self.max_samples:
            raise ValueError(f"{n_before + b} samples added to accumulators sized for {self.max_samples}")
        if self.single:
            self.sum_mean = probs[0].to(self.device, torch.float32)  # kept as is when float32 on this device
            volumes = torch.zeros(probs.shape[1], dtype=torch.int64)
            for sl in self._slabs():  # torch sums a bool tensor through an int64 copy of it: slab by slab
                volumes += (self.sum_mean[:, sl] >= 0.5).flatten(1).sum(-1).cpu()
            self.volumes.append(volumes.numpy())
            self._add_masks(probs)
            return
        self._accumulate(probs.shape[0], lambda sl: probs[:, :, sl])
        self._add_masks(probs)

    @torch.no_grad()
    def add_logits(self, logits: torch.Tensor, nonlin) -> None:
        """`add(nonlin(logits))` for a (B, C, *spatial) batch of logits, without the batch's probabilities as a
        whole: `nonlin` (voxel-wise: softmax or sigmoid) is applied slab by slab and each slab accumulated, so the
        float32 probabilities of the whole volume (4 C bytes per voxel and sample) never exist (issue 15). The same
        values as `add` of probabilities made slab by slab, as the predictor's `probabilities` makes them (torch's
        softmax of a whole volume may round 1 ulp apart). One sample (`max_samples == 1`) is kept as the mean, so
        there it is `add`."""
        if self.single or self._result is not None:
            return self.add(nonlin(logits))
        if tuple(logits.shape[1:]) != self.shape:
            raise ValueError(f"logits of shape {tuple(logits.shape[1:])} added to accumulators of shape {self.shape}")
        b = logits.shape[0]
        if self.max_samples is not None and self.n_samples + b > self.max_samples:
            raise ValueError(f"{self.n_samples + b} samples added to accumulators sized for {self.max_samples}")
        # the pairwise Dice's 0.5-masks, one sample at a time (1 byte per voxel and tracked class): gathered while
        # accumulating for one sample, else from a second slab-wise pass per sample (a few percent of a sample's
        # cost, against b x classes bytes per voxel of CPU memory for a GPU batch of b)
        def new_masks():
            return {c: np.empty(self.spatial_shape, dtype=bool) for c in self.pairwise}

        def fill(masks, p, sl):  # p: (1, C, *slab) probabilities of one sample
            for c, m in masks.items():
                m[sl] = (p[0, c] >= 0.5).cpu().numpy()

        first = new_masks() if b == 1 else None

        def slab(sl):
            p = nonlin(logits[:, :, sl])
            if first is not None:
                fill(first, p, sl)
            return p

        self._accumulate(b, slab)
        for s in range(b):
            masks = first
            if masks is None:
                masks = new_masks()
                for sl in self._slabs():
                    fill(masks, nonlin(logits[s:s + 1, :, sl]), sl)
            for c, acc in self.pairwise.items():
                acc.add(masks[c])

    def _accumulate(self, b: int, probs_of_slab) -> None:
        """Chan et al.'s batched Welford update of `b` samples, slab by slab (class docstring); `probs_of_slab(sl)`
        gives the (b, C, *slab) probabilities of the slab `sl` of the first spatial axis."""
        n_before = self.n_samples
        n_after = n_before + b
        volumes = torch.zeros((b, self.shape[0]), dtype=torch.int64)
        for sl in self._slabs():
            p = probs_of_slab(sl).to(self.sum_mean.device, torch.float32)
            mean, m2 = self.sum_mean[:, sl], self.m2[:, sl]
            batch_mean = p.mean(0)
            delta = batch_mean - mean
            mean += delta * (b / n_after)
            m2 += ((p - batch_mean) ** 2).sum(0) + delta * delta * (n_before * b / n_after)
            self.sum_plogp[:, sl] += torch.xlogy(p, p).sum(0)
            self.sum_entropy[sl] += batch_normalized_entropy(p, self.regions).sum(0)
            binary = p >= 0.5
            self.counts[:, sl] += binary.sum(0, dtype=self.counts.dtype)
            volumes += binary.flatten(2).sum(-1).cpu()  # per slab: torch sums bool through an int64 copy
        self.volumes.extend(volumes.numpy())

    def _add_masks(self, probs: torch.Tensor) -> None:
        for channel, acc in self.pairwise.items():
            for s in range(probs.shape[0]):  # one whole-volume mask (1 byte per voxel) at a time
                acc.add((probs[s, channel] >= 0.5).cpu().numpy())

    @property
    def n_samples(self) -> int:
        return len(self.volumes)

    @property
    def pairwise_nbytes(self) -> int:
        """Bytes held by the bit-packed sample masks (the exact pairwise Dice's memory)."""
        return sum(acc.nbytes for acc in self.pairwise.values())

    def result(self) -> AccumulatedStats:
        """The statistics, computed in place: on the CPU the arrays ARE the accumulators (no copy), so nothing
        can be added afterwards; later calls return the same object."""
        if self._result is not None:
            return self._result
        n = self.n_samples
        if n == 0:
            raise ValueError("no samples were added")
        mean = self.sum_mean.cpu().numpy()
        if self.single:
            var = plogp = entropy = None
            counts = (self.sum_mean >= 0.5).to(count_dtype(1)).cpu().numpy()
        else:
            var = self.m2.div_(n).clamp_min_(0.0).cpu().numpy()
            plogp = self.sum_plogp.div_(n).cpu().numpy()
            entropy = self.sum_entropy.div_(n).cpu().numpy()
            counts = self.counts.cpu().numpy()
        nbytes = self.pairwise_nbytes
        self.sum_mean = self.m2 = self.sum_plogp = self.sum_entropy = None
        self._result = AccumulatedStats(n, mean, var, plogp, entropy, counts, np.stack(self.volumes).astype(np.int64),
                                        intersections={c: acc.inter.copy() for c, acc in self.pairwise.items()},
                                        pairwise_nbytes=nbytes, regions=self.regions)
        return self._result
