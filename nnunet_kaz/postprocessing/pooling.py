"""Streaming, seeded, class-stratified pooling of validation voxels for fitting calibrators.

Paper 000 section 2.3 pools the raw predictions of every validation pixel. 3D datasets do not fit in memory
that way, so `VoxelPool` keeps at most `cap_per_class` voxels of each true class while the cases stream past,
one case in memory at a time.

Sampling (bottom-k, equivalent to reservoir sampling): every voxel of true class k gets an independent
uniform key from the seeded generator; the pool keeps the `cap_per_class` voxels with the smallest keys seen
so far. After all cases, each class's kept voxels are a uniform sample without replacement of all its voxels
(every subset of that size is equally likely, whatever the order or size of the cases), so a large case
contributes in proportion to its voxel count, unlike a fixed per-case quota. The result depends only on the
seed and on the order of the cases (callers sort them by name).

Stratifying changes the class frequencies of the sample (a 3D background class is cut much more than a
tumour class), which would bias a calibrator towards the rare classes. `sample()` therefore returns
importance weights n_seen[k] / n_kept[k] per voxel of class k, so the weighted sample has the class
frequencies of the pooled validation set and the fitted calibrator the right prior.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from nnunet_kaz.errors import KazError

CHUNK = 1 << 22  # voxels offered at a time


class VoxelPool:
    """Keeps a uniform sample of at most `cap_per_class` voxels per true class (see module docstring).

    `add(probabilities (C, *spatial), classes (*spatial) of channel indices, ignore=mask or None)`;
    `sample() -> (X (N, C) float32 probabilities, y (N,) int channel indices, w (N,) float64 weights)`.
    """

    def __init__(self, n_channels: int, cap_per_class: int = 200_000, seed: int = 0):
        if cap_per_class < 1:
            raise KazError(f"the per-class voxel cap must be >= 1, got {cap_per_class}")
        self.n_channels = int(n_channels)
        self.cap = int(cap_per_class)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.n_cases = 0
        self.n_seen = np.zeros(self.n_channels, dtype=np.int64)
        self._keys = [np.empty(0, np.float64) for _ in range(self.n_channels)]
        self._probs = [np.empty((0, self.n_channels), np.float32) for _ in range(self.n_channels)]

    def add(self, probabilities: np.ndarray, classes: np.ndarray, ignore: np.ndarray | None = None) -> None:
        """Offer every voxel of one case (voxels where `ignore` is True are skipped), CHUNK voxels at a time
        so that a large 3D case needs only chunk-sized temporaries besides the pool itself."""
        flat_cls = classes.reshape(-1)
        flat_p = probabilities.reshape(self.n_channels, -1)
        flat_ign = None if ignore is None else ignore.reshape(-1)
        self.n_cases += 1
        for start in range(0, flat_cls.size, CHUNK):
            stop = start + CHUNK
            ign = None if flat_ign is None else flat_ign[start:stop]
            self._add_chunk(flat_p[:, start:stop], flat_cls[start:stop], ign)

    def _add_chunk(self, flat_p: np.ndarray, flat_cls: np.ndarray, ignore: np.ndarray | None) -> None:
        for k in range(self.n_channels):
            sel = flat_cls == k
            if ignore is not None:
                sel &= ~ignore
            idx = np.flatnonzero(sel)
            self.n_seen[k] += idx.size
            if idx.size == 0:
                continue
            keys = self.rng.random(idx.size)
            if self._keys[k].size >= self.cap:  # only keys below the current k-th smallest can enter
                small = keys < self._keys[k].max()
                idx, keys = idx[small], keys[small]
                if idx.size == 0:
                    continue
            keys = np.concatenate([self._keys[k], keys])
            probs = np.concatenate([self._probs[k], flat_p[:, idx].T.astype(np.float32)])
            if keys.size > self.cap:
                part = np.argpartition(keys, self.cap - 1)[: self.cap]
                keys, probs = keys[part], probs[part]
            self._keys[k], self._probs[k] = keys, probs

    @property
    def n_kept(self) -> np.ndarray:
        return np.array([k.size for k in self._keys], dtype=np.int64)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pooled sample with importance weights n_seen / n_kept per class (module docstring)."""
        if self.n_kept.sum() == 0:
            raise KazError("no labelled voxels were pooled: nothing to fit a calibrator on")
        x = np.concatenate(self._probs)
        y = np.concatenate([np.full(p.shape[0], k, dtype=np.int64) for k, p in enumerate(self._probs)])
        per_class = np.where(self.n_kept > 0, self.n_seen / np.maximum(self.n_kept, 1), 0.0)
        return x, y, per_class[y]

    def summary(self) -> dict:
        """What the fit saw: cases, voxels seen and kept per channel, the cap and the seed."""
        return {"n_cases": self.n_cases, "n_voxels_per_class": self.n_seen.tolist(),
                "n_sampled_per_class": self.n_kept.tolist(), "cap_per_class": self.cap, "seed": self.seed,
                "sampling": "seeded class-stratified uniform (bottom-k) sample, importance-weighted"}


def pool_cases(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]], cap_per_class: int = 200_000,
               seed: int = 0) -> VoxelPool:
    """Stream (probabilities (C, *spatial), channel indices, ignore mask or None) cases into a VoxelPool."""
    pool: VoxelPool | None = None
    for probs, channels, ignore in cases:
        if pool is None:
            pool = VoxelPool(probs.shape[0], cap_per_class, seed)
        pool.add(probs, channels, ignore)
    if pool is None:
        raise KazError("no cases to fit a calibrator on")
    return pool
