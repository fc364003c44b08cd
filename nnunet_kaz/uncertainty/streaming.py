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

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from nnunet_kaz.uncertainty.measures import (batch_normalized_entropy, mean_pairwise_dice,
                                              pooled_pairwise_dice, slabs)


def _and_popcount(rows: np.ndarray, row: np.ndarray) -> np.ndarray:
    """(R,) int64: sum over words of popcount(rows[r] & row), for (R, L) uint64 rows and an (L,) row."""
    if rows.shape[1] == 0:
        return np.zeros(rows.shape[0], dtype=np.int64)
    return np.bitwise_count(np.bitwise_and(rows, row)).sum(axis=1, dtype=np.int64)


class MaskPacker:
    """A mask of `n_voxels` (the flattened volume, C order) fed slab by slab (consecutive runs of voxels, e.g. the
    predictor's slabs of the first axis), bit-packed into uint64 words (np.packbits, 8 voxels per byte) without
    the mask ever existing as a whole: 1 bit instead of 1 byte per voxel (issue 23.7). Bits past the last voxel
    are 0."""

    def __init__(self, n_voxels: int):
        self.n_voxels = int(n_voxels)
        self.words = np.zeros(-(-self.n_voxels // 64), dtype=np.uint64)
        self._bytes = self.words.view(np.uint8)
        self._packed = 0                     # voxels packed so far (a multiple of 8 until `finish`)
        self._carry = np.zeros(0, dtype=bool)  # < 8 voxels waiting for their byte

    def feed(self, mask) -> None:
        m = np.asarray(mask, dtype=bool).ravel()
        if self._carry.size:
            m = np.concatenate([self._carry, m])
        whole = m.size - m.size % 8
        at = self._packed // 8
        self._bytes[at:at + whole // 8] = np.packbits(m[:whole])
        self._packed += whole
        self._carry = m[whole:].copy()

    def finish(self) -> np.ndarray:
        if self._carry.size:
            self._bytes[self._packed // 8] = np.packbits(self._carry)[0]
            self._packed += self._carry.size
            self._carry = np.zeros(0, dtype=bool)
        if self._packed != self.n_voxels:
            raise ValueError(f"{self._packed} voxels packed for a mask of {self.n_voxels}")
        return self.words


class PairwiseIntersections:
    """Exact |S_i & S_j| for every pair of binary masks streamed one at a time (paper 004's mean pairwise Dice).

    Masks are bit-packed over the whole volume in 64-voxel words (`MaskPacker`). Only the words where the masks
    seen so far disagree (the *band*: words where the union of all masks differs from their intersection) are
    stored per mask; outside the band every mask holds the same word, the intersection A of all masks, so each
    pair shares K = popcount(A outside the band). The band only grows; a word joins it when a new mask breaks
    the agreement, and every older mask holds there the word all masks agreed on (kept once, `_fill`), so stored
    rows are never re-packed: a row keeps the band words it had when it was stored, the later ones come from
    `_fill`. Then |S_i & S_j| = K + popcount(S_i & S_j over the band).

    Cost (issue 23.4): new masks wait in the open block (up to `BLOCK_BYTES` of rows, at most `MAX_BLOCK_ROWS`);
    when it is full, or the matrix is read, every stored block is inflated ONCE and intersected with all waiting
    masks, so a block pass is linear in the number of new masks and the inflation is shared by the batch. Per
    new mask: a few passes over the volume's words (1/64 of its voxels) and one AND + popcount per stored mask
    over the band only, not over the masks' bounding box: blobs whose union spans the volume but that agree
    everywhere except near their borders cost what their borders cost.

    Memory: the intersection A and union U of all masks (1 bit per voxel each) and, per mask, its band words;
    full blocks of rows are zlib-compressed (level 1, lossless: segmentation masks are blobs, whose packed band
    words are long runs of zeros and ones). At worst (noise) the rows hold N * band / 8 bytes, band <= the
    volume. Compressed rather than capped, so the pairwise Dice stays exact whatever N.
    """

    BLOCK_BYTES = 4 << 20
    MAX_BLOCK_ROWS = 256

    def __init__(self, spatial_shape: Sequence[int]):
        self.shape = tuple(int(s) for s in spatial_shape)
        self.n_voxels = int(np.prod(self.shape))
        n_words = -(-self.n_voxels // 64)
        self._all = np.zeros(n_words, dtype=np.uint64)   # A: AND of every mask so far
        self._any = np.zeros(n_words, dtype=np.uint64)   # U: OR of every mask so far
        self._in_band = np.zeros(n_words, dtype=bool)
        self._band = np.zeros(0, dtype=np.int64)         # word indices of the band, in the order they joined
        self._fill = np.zeros(0, dtype=np.uint64)        # per band word: what every mask older than its joining holds
        self._closed: list[tuple[bytes, int, int]] = []  # (zlib bytes, rows, band words per row)
        self._closed_rows = 0
        self._packed_closed = 0                          # uncompressed bytes of the closed rows
        self._open = np.zeros((0, 0), dtype=np.uint64)   # the open block: rows x (capacity >= band words)
        self._open_rows = 0
        self._flushed = 0                                # open rows whose intersections are all known
        self._n = 0
        self._inter = np.zeros((16, 16), dtype=np.int64)  # capacity grows by half, so growing is O(N^2) in all

    @property
    def n(self) -> int:
        return self._n

    @property
    def band_words(self) -> int:
        """Words (64 voxels each) where the masks seen so far disagree."""
        return int(self._band.size)

    @property
    def inter(self) -> np.ndarray:
        """(N, N) int64: |S_i & S_j|, the diagonal holding the volumes |S_i|."""
        self._flush()
        return self._inter[: self.n, : self.n]

    @property
    def nbytes(self) -> int:
        """Bytes held: the compressed blocks, the filled rows of the open block, the band's indices and fill
        words, and the volume-wide A, U and band flags."""
        L = self._band.size
        return (sum(len(b[0]) for b in self._closed) + self._open_rows * L * 8 + 16 * L
                + self._all.nbytes + self._any.nbytes + self._in_band.nbytes)

    @property
    def packed_nbytes(self) -> int:
        """Bytes the stored rows would hold uncompressed (N rows of their band words, 8 bytes each)."""
        return self._packed_closed + self._open_rows * self._band.size * 8

    def add(self, mask: np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise ValueError(f"mask of shape {mask.shape} added to pairwise intersections of shape {self.shape}")
        packer = MaskPacker(self.n_voxels)
        packer.feed(mask)
        self.add_words(packer.finish())

    def add_words(self, words: np.ndarray, volume: int | None = None) -> None:
        """Add one mask given as `MaskPacker` words (and its voxel count, if known)."""
        if words.shape != self._all.shape or words.dtype != np.uint64:
            raise ValueError(f"{words.shape} {words.dtype} words added to pairwise intersections of "
                             f"{self._all.shape} uint64 words")
        n = self._n
        if n == len(self._inter):
            grown = np.zeros((n + n // 2, n + n // 2), dtype=np.int64)
            grown[:n, :n] = self._inter
            self._inter = grown
        if n == 0:
            self._all[:] = words
            self._any[:] = words
        else:
            both, either = self._all & words, self._any | words
            joined = np.flatnonzero((both != either) & ~self._in_band)
            if joined.size:  # words where the masks disagree from now on; older masks all hold A there
                self._grow_band(joined, self._all[joined])
            self._all, self._any = both, either
        self._append(words[self._band])
        self._inter[n, n] = int(np.bitwise_count(words).sum()) if volume is None else int(volume)
        self._n += 1
        if self._open_rows == len(self._open) or self._open_rows * self._band.size * 8 >= self.BLOCK_BYTES:
            self._flush()
            self._close()

    def _grow_band(self, joined: np.ndarray, fill: np.ndarray) -> None:
        L = self._band.size
        self._band = np.concatenate([self._band, joined])
        self._fill = np.concatenate([self._fill, fill])
        self._in_band[joined] = True
        if self._open_rows:  # the open rows are older than the new band words: they hold the fill there
            if self._open.shape[1] < self._band.size:
                wider = np.empty((len(self._open), max(self._band.size, self._open.shape[1] * 5 // 4)),
                                 dtype=np.uint64)
                wider[: self._open_rows, :L] = self._open[: self._open_rows, :L]
                self._open = wider
            self._open[: self._open_rows, L: self._band.size] = fill

    def _append(self, row: np.ndarray) -> None:
        if self._open_rows == 0:
            per_block = max(1, min(self.MAX_BLOCK_ROWS, self.BLOCK_BYTES // max(row.nbytes, 1)))
            self._open = np.empty((per_block, max(row.size, 1)), dtype=np.uint64)
        self._open[self._open_rows, : row.size] = row
        self._open_rows += 1

    def _flush(self) -> None:
        """Intersections of the waiting (not yet flushed) open rows with every other row: each closed block
        inflated once for all of them."""
        if self._flushed == self._open_rows:
            return
        L = self._band.size
        band_all = self._all[self._band]
        shared = int(np.bitwise_count(self._all).sum(dtype=np.int64)) - int(np.bitwise_count(band_all).sum())
        rows = self._open[: self._open_rows, :L]
        first = self._closed_rows + self._flushed  # index of the first waiting mask
        waiting = rows[self._flushed:]
        at = 0
        for data, n_rows, length in self._closed:
            block = np.frombuffer(zlib.decompress(data), dtype=np.uint64).reshape(n_rows, length)
            for k, row in enumerate(waiting):
                # the block's rows hold the fill on the band words that joined after they were stored
                tail = int(np.bitwise_count(row[length:] & self._fill[length:L]).sum())
                counts = _and_popcount(block, row[:length]) + (tail + shared)
                self._inter[first + k, at:at + n_rows] = self._inter[at:at + n_rows, first + k] = counts
            at += n_rows
        for k, row in enumerate(waiting):
            before = self._flushed + k  # open rows older than this one
            counts = _and_popcount(rows[:before], row) + shared
            i = first + k
            self._inter[i, self._closed_rows:i] = self._inter[self._closed_rows:i, i] = counts
        self._flushed = self._open_rows

    def _close(self) -> None:
        L = self._band.size
        block = np.ascontiguousarray(self._open[: self._open_rows, :L])
        self._closed.append((zlib.compress(block.tobytes(), 1), self._open_rows, L))
        self._closed_rows += self._open_rows
        self._packed_closed += block.nbytes
        self._open = np.zeros((0, 0), dtype=np.uint64)
        self._open_rows = self._flushed = 0


def accumulator_bytes_per_voxel(n_channels: int, max_samples: int | None = None, regions: bool = False) -> int:
    """Bytes per voxel of `StreamingStats`' dense accumulators (running mean, M2, sum p ln p: float32 per class;
    for regions also the sum of the samples' entropies, float32), without the bit-packed masks (CPU memory, see
    `PairwiseIntersections`); for one sample, the sample itself (float32 per class)."""
    if max_samples == 1:
        return 4 * n_channels
    return 12 * n_channels + (4 if regions else 0)


@dataclass
class AccumulatedStats:
    """What the maps and scores need, in the space the samples were added in (see `StreamingStats`).

    The arrays share the accumulators' memory where they lie on the CPU (no copy at the end of a case); a
    consumer that is done with one may set it to None to free it before the next one is exported."""

    n_samples: int
    mean: np.ndarray            # (C, *spatial) mean probability (paper 002 eq. 3)
    var: np.ndarray | None      # (C, *spatial) population variance (Welford); None: one sample, all 0
    mean_plogp: np.ndarray | None  # (C, *spatial) (1/N) sum_i p_i ln p_i per class; None: from `mean` (1 sample)
    mean_entropy: np.ndarray | None  # (*spatial) (1/N) sum_i normalized_entropy(p_i) (regions); None: derived
    volumes: np.ndarray         # (N, C) voxels with p_i >= 0.5, per sample and class
    intersections: dict[int, np.ndarray] | None = None  # channel -> (N, N) |S_i & S_j| of the 0.5-masks
    pairwise_nbytes: int = 0    # bytes the bit-packed sample masks held (the exact pairwise Dice's memory)

    regions: bool = False

    @property
    def variance(self) -> np.ndarray:
        return self.var if self.var is not None else np.zeros(self.mean.shape, dtype=np.float32)  # N = 1: 0

    def sample_entropy(self) -> np.ndarray:
        """(*spatial) mean normalised entropy of the samples, slab by slab when derived: for softmax outputs from
        the mean p ln p, -sum_c mean(p_c ln p_c) / ln C (the normalised entropy is linear in p ln p: C = 2 gives the
        binary entropy of the foreground, module `measures`), so it needs no accumulator of its own; of the one
        sample `mean` is when nothing was accumulated (`batch_normalized_entropy`)."""
        if self.mean_entropy is not None:
            return self.mean_entropy
        if self.mean_plogp is not None and not self.regions:
            plogp = torch.from_numpy(self.mean_plogp)
            out = torch.empty(plogp.shape[1:], dtype=torch.float32)
            for sl in slabs(plogp.shape[1:], StreamingStats.SLAB_VOXELS):
                out[sl] = plogp[:, sl].sum(0).mul_(-1.0 / math.log(plogp.shape[0]))
            return out.numpy()
        mean = torch.from_numpy(self.mean)
        out = torch.empty(mean.shape[1:], dtype=torch.float32)
        for sl in slabs(mean.shape[1:], StreamingStats.SLAB_VOXELS):
            out[sl] = batch_normalized_entropy(mean[None, :, sl], self.regions)[0]
        return out.numpy()

    def u_sample(self, channel: int, consume: bool = False) -> np.ndarray:
        """Paper 004's U(x) = -(1/N) sum_i p_i ln p_i of one class (nats). `consume`: the class's mean p ln p is
        not needed afterwards, so it is negated in place instead of copied."""
        if self.mean_plogp is not None:
            plogp = self.mean_plogp[channel]
            return np.negative(plogp, out=plogp) if consume else -plogp
        p = torch.from_numpy(self.mean[channel])
        return torch.xlogy(p, p).neg_().numpy()

    def pairwise_dice(self, channel: int) -> float:
        """Paper 004's exact mean pairwise Dice of the samples' 0.5-thresholded masks of `channel`
        (`measures.mean_pairwise_dice`); NaN if that channel was not tracked."""
        if not self.intersections or channel not in self.intersections:
            return float("nan")
        return mean_pairwise_dice(self.intersections[channel], self.volumes[:, channel])

    def pooled_pairwise_dice(self, channel: int) -> float:
        """The pooled variant (`measures.pooled_pairwise_dice`) from the same intersections; NaN if `channel` was
        not tracked."""
        if not self.intersections or channel not in self.intersections:
            return float("nan")
        return pooled_pairwise_dice(self.intersections[channel], self.volumes[:, channel])


class StreamingStats:
    """Add (B, C, *spatial) probability batches one after another; `result()` gives `AccumulatedStats`.

    `pairwise_channels`: channels whose sample masks are kept bit-packed for the exact pairwise Dice
    (default: every foreground channel, i.e. all channels for regions, channels 1.. for softmax; () for none:
    the pairwise Dice scores are then NaN). `max_samples`: the number of samples that will be added, if known
    (one sample is kept as the mean, nothing accumulated).

    Memory (issues 15 and 23, measured in benchmarks/bench_predict_3d.py): the dense accumulators hold
    `accumulator_bytes_per_voxel` (12 C bytes, 12 C + 4 for regions); the masks of the tracked classes are packed
    slab by slab (`MaskPacker`, never a whole bool volume) into `PairwiseIntersections` in CPU memory. `add`
    works through the batch in slabs of the first spatial axis of about `SLAB_VOXELS` voxels, so its temporaries
    (batch mean, deltas, squares, p ln p, entropies, masks: ~10 float32 copies of the batch when done on the
    whole volume, which was most of the predictor's peak on 3D volumes) are bounded by a few MiB whatever the
    volume. Every voxel's arithmetic is the same as on the whole volume, so the results are identical (bit for
    bit). Nothing is pinned: the accumulators are written by the device they live on (issue 23.3).
    """

    SLAB_VOXELS = 1 << 18

    def __init__(self, n_channels: int, spatial_shape: tuple[int, ...], regions: bool = False,
                 device: torch.device | str = "cpu", pairwise_channels: Sequence[int] | None = None,
                 max_samples: int | None = None):
        self.regions = regions
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        shape = (n_channels, *self.spatial_shape)
        device = torch.device(device)

        def zeros(size):
            return torch.zeros(size, dtype=torch.float32, device=device)

        self.shape, self.device, self.max_samples = shape, device, max_samples
        self.n_voxels = int(np.prod(self.spatial_shape))
        # one sample (one member, no MC): nothing is accumulated, the sample is kept as the mean and everything
        # else derived from it on demand (var 0, p ln p, entropy: the values the accumulators give for N = 1).
        # On a 3D volume this keeps 4 C instead of 12 C bytes per voxel (bench_predict_3d).
        self.single = max_samples == 1
        self.sum_mean = self.m2 = self.sum_plogp = self.sum_entropy = None
        if not self.single:
            self.sum_mean = zeros(shape)  # running mean (Welford)
            self.m2 = zeros(shape)        # sum of squared deviations
            self.sum_plogp = zeros(shape)
            if regions:  # softmax: the mean sample entropy follows from sum_plogp (`AccumulatedStats.sample_entropy`)
                self.sum_entropy = zeros(self.spatial_shape)
        self.volumes: list[np.ndarray] = []
        if pairwise_channels is None:
            pairwise_channels = range(n_channels) if regions else range(1, n_channels)
        if self.single:  # one sample has no pairs: its pairwise Dice is NaN without any mask kept
            pairwise_channels = ()
        self.pairwise = {int(c): PairwiseIntersections(self.spatial_shape) for c in pairwise_channels}
        self._result: AccumulatedStats | None = None

    def _slabs(self) -> list[slice]:
        return slabs(self.spatial_shape, self.SLAB_VOXELS)

    def add(self, probs: torch.Tensor) -> None:
        """Add a (B, C, *spatial) batch of probabilities (or one (C, *spatial) sample)."""
        if probs.ndim == len(self.shape):
            probs = probs[None]
        self._add_whole(probs, lambda p: p, "probabilities")

    def add_logits(self, logits: torch.Tensor, nonlin) -> None:
        """`add(nonlin(logits))` for a (B, C, *spatial) batch of logits, without the batch's probabilities as a
        whole: `nonlin` (voxel-wise: softmax or sigmoid) is applied slab by slab and each slab accumulated, so the
        float32 probabilities of the whole volume (4 C bytes per voxel and sample) never exist (issue 15). The same
        values as `add` of probabilities made slab by slab, as the predictor's `probabilities` makes them (torch's
        softmax of a whole volume may round 1 ulp apart)."""
        self._add_whole(logits, nonlin, "logits")

    def _add_whole(self, batch: torch.Tensor, nonlin, what: str) -> None:
        if tuple(batch.shape[1:]) != self.shape:
            raise ValueError(f"{what} of shape {tuple(batch.shape[1:])} added to accumulators of shape {self.shape}")
        sink = self.batch(batch.shape[0], nonlin)
        for sl in self._slabs():
            sink.slab(sl, batch[:, :, sl])
        sink.end()

    def batch(self, b: int, nonlin) -> "SampleBatch":
        """A batch of `b` samples whose (b, C, rows, *rest) logits (or probabilities, with an identity `nonlin`)
        arrive slab by slab of the first spatial axis, in order (`SampleBatch.slab`), as the predictor's stitching
        hands them over (`tiling.stitch_tiles(emit=...)`): the batch's logits never exist whole (issue 23.7)."""
        if self._result is not None:
            raise ValueError("samples added after result(): the accumulators were turned into the statistics")
        if self.max_samples is not None and self.n_samples + b > self.max_samples:
            raise ValueError(f"{self.n_samples + b} samples added to accumulators sized for {self.max_samples}")
        return SampleBatch(self, b, nonlin)

    def _packers(self) -> dict[int, MaskPacker]:
        return {c: MaskPacker(self.n_voxels) for c in self.pairwise}

    @torch.no_grad()
    def _welford(self, sl: slice, p: torch.Tensor, n_before: int) -> None:
        """Chan et al.'s batched Welford update of rows `sl` with the (b, C, *slab) probabilities `p` of `b` samples
        that follow `n_before` others (class docstring: the same arithmetic for every voxel, whatever the slab)."""
        b = p.shape[0]
        n_after = n_before + b
        p = p.to(self.sum_mean.device, torch.float32)
        mean, m2 = self.sum_mean[:, sl], self.m2[:, sl]
        batch_mean = p.mean(0)
        delta = batch_mean - mean
        mean += delta * (b / n_after)
        m2 += ((p - batch_mean) ** 2).sum(0) + delta * delta * (n_before * b / n_after)
        self.sum_plogp[:, sl] += torch.xlogy(p, p).sum(0)
        if self.sum_entropy is not None:
            self.sum_entropy[sl] += batch_normalized_entropy(p, self.regions).sum(0)

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
        var = plogp = entropy = None
        if not self.single:
            var = self.m2.div_(n).clamp_min_(0.0).cpu().numpy()
            plogp = self.sum_plogp.div_(n).cpu().numpy()
            if self.sum_entropy is not None:
                entropy = self.sum_entropy.div_(n).cpu().numpy()
        nbytes = self.pairwise_nbytes
        self.sum_mean = self.m2 = self.sum_plogp = self.sum_entropy = None
        self._result = AccumulatedStats(n, mean, var, plogp, entropy, np.stack(self.volumes).astype(np.int64),
                                        intersections={c: acc.inter.copy() for c, acc in self.pairwise.items()},
                                        pairwise_nbytes=nbytes, regions=self.regions)
        return self._result


class SampleBatch:
    """`StreamingStats.batch`: b samples accumulated slab by slab of the first spatial axis (`slab`, in order),
    completed by `end` (volumes, the pairwise Dice's masks; one sample: the kept mean).

    One sample given as float16 logits (the predictor's stitching) is kept as its logits until `end`, and its
    float32 probabilities (the mean) are then made in place, in the same buffer (issue 23.7): class c's logits sit
    in the first half of the bytes its float32 probabilities will take, and the probabilities are written from
    the last voxel to the first, so each write lands on logits already read (float32 voxel v covers float16
    positions 2v and 2v + 1 of its class, both >= v). While the tiles run (and their activations are alive) the
    case holds 2 C bytes per voxel instead of 4 C; the buffer's untouched second halves are not resident until
    written (pages of a large allocation are mapped lazily). The probabilities are the nonlinearity of the same
    float16 logits, so the values are those of converting each slab as it comes."""

    def __init__(self, stats: StreamingStats, b: int, nonlin):
        self.stats, self.b, self.nonlin = stats, b, nonlin
        self.n_before = stats.n_samples
        self.volumes = torch.zeros((b, stats.shape[0]), dtype=torch.int64)
        # the masks of the tracked classes, packed as the slabs arrive (1 bit per voxel, class and sample)
        self.packers = [stats._packers() for _ in range(b)]
        # one sample: its probabilities are the mean, made on the accumulators' device (which may differ from the
        # logits': the predictor keeps one sample's mean in CPU memory while stitching on the GPU)
        self.mean = torch.empty(stats.shape, dtype=torch.float32, device=stats.device) if stats.single else None
        self.halves = None  # one sample's float16 logits, inside `mean` (class docstring)
        self.rows = 0

    @torch.no_grad()
    def slab(self, rows: slice, values: torch.Tensor) -> None:
        stats = self.stats
        if rows.start != self.rows or tuple(values.shape[:2]) != (self.b, stats.shape[0]) \
                or tuple(values.shape[3:]) != stats.spatial_shape[1:] or values.shape[2] != rows.stop - rows.start:
            raise ValueError(f"slab {rows} of shape {tuple(values.shape)} does not continue a batch of {self.b} "
                             f"samples of shape {stats.shape} at row {self.rows}")
        if self.mean is not None and self.rows == 0 and values.dtype == torch.float16:
            self.halves = self.mean.view(-1).view(torch.float16)
        if self.halves is not None:
            n, plane = stats.n_voxels, int(np.prod(stats.spatial_shape[1:]))
            for c in range(stats.shape[0]):  # class c's logits: float16 positions [2 c n, 2 c n + n)
                self.halves[2 * c * n + rows.start * plane: 2 * c * n + rows.stop * plane] = \
                    values[0, c].reshape(-1).to(stats.device)
            self.rows = rows.stop
            return
        for sub in slabs(values.shape[2:], stats.SLAB_VOXELS):  # bounded temporaries (class docstring)
            sl = slice(rows.start + sub.start, rows.start + sub.stop)
            p = self.nonlin(values[:, :, sub])
            if self.mean is not None:
                self.mean[:, sl] = p[0].to(stats.device, torch.float32)
            else:
                stats._welford(sl, p, self.n_before)
            binary = p >= 0.5
            self.volumes += binary.flatten(2).sum(-1).cpu()  # per slab: torch sums bool through an int64 copy
            for s, packers in enumerate(self.packers):
                for c, packer in packers.items():
                    packer.feed(binary[s, c].cpu().numpy())
        self.rows = rows.stop

    @torch.no_grad()
    def _widen(self) -> None:
        """One sample's float16 logits -> its float32 probabilities, in place, last voxels first."""
        stats, n = self.stats, self.stats.n_voxels
        flat = self.mean.view(stats.shape[0], n)
        for sl in reversed(slabs((n,), stats.SLAB_VOXELS)):
            logits = torch.stack([self.halves[2 * c * n + sl.start: 2 * c * n + sl.stop]
                                  for c in range(stats.shape[0])])  # a copy: read before anything is written
            p = self.nonlin(logits[None])[0].to(torch.float32)
            flat[:, sl] = p
            self.volumes[0] += (p >= 0.5).sum(-1).cpu()
        self.halves = None

    def end(self) -> None:
        stats = self.stats
        if self.rows != stats.spatial_shape[0]:
            raise ValueError(f"a batch ended after {self.rows} of {stats.spatial_shape[0]} rows")
        if self.halves is not None:
            self._widen()
        if self.mean is not None:
            stats.sum_mean = self.mean
        stats.volumes.extend(self.volumes.numpy())
        for s, packers in enumerate(self.packers):
            for c, packer in packers.items():
                stats.pairwise[c].add_words(packer.finish(), int(self.volumes[s, c]))
