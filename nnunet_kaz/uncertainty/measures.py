"""Voxel-wise uncertainty maps and per-image uncertainty scores.

Conventions (written here because every output uses them):
- `probs` is shaped (C, *spatial): softmax class probabilities (they sum to 1 over C) or, for nnU-Net region
  training, independent sigmoid region probabilities.
- Normalized entropy lies in [0, 1]. Two classes or a region: the binary entropy of paper 000 eq. 2,
  H = -[p log p + (1 - p) log(1 - p)] / log 2. Softmax with C > 2 classes: paper 002 eq. 4's class entropy in
  log2 divided by log2(C). Regions: the mean of the regions' binary entropies. 0 log 0 = 0.
- Mutual information = entropy of the mean minus the mean of the sample entropies (same normalization), >= 0.
- Variance is the per-class variance of the samples' probabilities (population variance, divided by N).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage


def _xlogx(p):
    """p * ln p with 0 ln 0 = 0, for numpy arrays or torch tensors (the streaming path runs on the device).

    numpy keeps float32 input in float32 and works in place: whole CT volumes go through here (a 512 x 512 x 256
    case takes ~2 s instead of ~15 s in float64)."""
    if isinstance(p, torch.Tensor):
        return torch.xlogy(p, p)
    p = np.asarray(p)
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    out = np.asarray(np.maximum(p, np.finfo(p.dtype).tiny))  # ln(tiny) is finite, so 0 * ln(tiny) = 0
    np.log(out, out=out)
    out *= p
    return out


def binary_entropy(p):
    """Normalized binary entropy in [0, 1] (paper 000 eq. 2 divided by log 2): p = 0.5 gives 1."""
    h = _xlogx(p)
    h += _xlogx(1 - p)
    h *= -1.0 / math.log(2.0)
    return h


def normalized_entropy(probs, regions: bool = False):
    """Normalized entropy map of (C, *spatial) probabilities, in [0, 1] (see module docstring).

    Works on numpy arrays and torch tensors (the class axis is the first)."""
    return _normalized_entropy_along(probs, 0, regions)


def _normalized_entropy_along(probs, axis: int, regions: bool):
    n = probs.shape[axis]
    if regions:
        return binary_entropy(probs).mean(axis)
    if n == 2:
        foreground = probs.select(axis, 1) if isinstance(probs, torch.Tensor) else np.take(probs, 1, axis)
        return binary_entropy(foreground)
    return -_xlogx(probs).sum(axis) / math.log(n)


SLAB_VOXELS = 1 << 18


def slabs(spatial_shape, voxels: int | None = None) -> list[slice]:
    """Slices of the first spatial axis, each about `voxels` voxels (default `SLAB_VOXELS`, at least one row): the
    slabs in which the whole-volume steps of prediction and export run, so their temporaries stay a few MiB."""
    voxels = SLAB_VOXELS if voxels is None else voxels
    first, rest = int(spatial_shape[0]), int(np.prod(spatial_shape[1:]))
    rows = max(1, voxels // max(rest, 1))
    return [slice(z, min(z + rows, first)) for z in range(0, first, rows)]


def by_slabs(fn, array: np.ndarray, axis: int = 0, slab_voxels: int | None = None) -> np.ndarray:
    """`fn(array)` for a voxel-wise `fn` that drops the axes before `axis` (e.g. the class axis), computed slab by
    slab of `array`'s `axis` into one output of `fn`'s dtype: the same values, since every voxel's arithmetic is
    its own, but the temporaries of `fn` (a float copy of every class and its logarithm, 8 C bytes per voxel for
    an entropy) are a slab's instead of a whole 3D volume's."""
    array = np.asarray(array)
    parts = slabs(array.shape[axis:], slab_voxels)
    if len(parts) <= 1:
        return fn(array)
    index = (slice(None),) * axis
    first = fn(array[index + (parts[0],)])
    out = np.empty((array.shape[axis], *first.shape[1:]), dtype=first.dtype)
    out[parts[0]] = first
    for sl in parts[1:]:
        out[sl] = fn(array[index + (sl,)])
    return out


def batch_normalized_entropy(probs: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """`normalized_entropy` of every sample of a (B, C, *spatial) batch: (B, *spatial)."""
    return _normalized_entropy_along(probs, 1, regions)


def class_entropy_bits(probs: np.ndarray) -> np.ndarray:
    """Class entropy in bits, -sum_k p_k log2 p_k (paper 002 eq. 4), not normalized."""
    return -_xlogx(probs).sum(0) / np.log(2.0)


RELUNET_CONVENTIONS = ("authors", "eq9", "cross")
# Rel-UNet's code divides by sum(abs(mask - cv2.dilate(mask))) on uint8 masks: mask - dilated wraps to 255 on
# every ring pixel, so its denominator is 255 x |ring| and its score (100 / 255) x H_total / |ring|
RELUNET_AUTHORS_FACTOR = 100.0 / 255.0


def relunet_mask(p_class: np.ndarray) -> np.ndarray:
    """Paper 002 eq. 5's binary image I: the mean class probability thresholded at 0.5. The paper does not say
    which side 0.5 itself falls on; the authors' code (`estimate_uncertainty.py`) keeps p > 0.5."""
    return np.asarray(p_class) > 0.5


def relunet_contour(mask: np.ndarray, convention: str = "authors") -> np.ndarray:
    """The contour of paper 002 eq. 7-8: the voxels the dilation I* = I (+) A adds to the mask I.

    - "authors" and "eq9" (Rel-UNet's code: `cv2.dilate(mask, np.ones((3, 3)))` on each 2D slice): A is a 3x3
      square in the last two axes, so a 3D volume is dilated slice by slice along its first axis (nnU-Net's
      (z, y, x) order; the authors' code feeds cv2 a (x, y, z) array, whose last axis cv2 treats as channels)
      and nothing spreads across slices.
    - "cross": A is the face-connected cross of the mask's dimensionality (radius 1), across slices in 3D.
    """
    mask = np.asarray(mask, dtype=bool)
    if convention in ("authors", "eq9"):
        structure = np.ones((1,) * (mask.ndim - 2) + (3, 3) if mask.ndim >= 2 else (3,), dtype=bool)
    elif convention == "cross":
        structure = ndimage.generate_binary_structure(mask.ndim, 1)
    else:
        raise ValueError(f"unknown Rel-UNet convention {convention!r} (choose from {', '.join(RELUNET_CONVENTIONS)})")
    return ndimage.binary_dilation(mask, structure) & ~mask


def relunet_score(p_class: np.ndarray, entropy_map: np.ndarray | None, structure: np.ndarray | None = None,
                  convention: str = "authors", entropy_total: float | None = None) -> float:
    """Rel-UNet's per-image uncertainty score (paper 002 eq. 5-9) for one class.

    I = (mean probability of the class > 0.5) (eq. 5, `relunet_mask`), H_total = sum of `entropy_map` over the
    image (eq. 6), I* = I dilated by the structuring element A (eq. 7), contour = I* - I (eq. 8, the ring of
    voxels the dilation adds), ratio = H_total / |contour| (eq. 9). `entropy_map` is the class entropy in bits
    (paper 002 eq. 4; for one class of a binary problem its binary entropy in bits).

    The paper leaves A and the scale open; the conventions (columns of scores.csv):
    - "authors" (default, `relunet_score`): the authors' code's value, A = 3x3 square per 2D slice and
      (100 / 255) x the ratio: their `100 * sum(H) / sum(abs(mask - cv2.dilate(mask, 3x3)))` on uint8 masks,
      where `mask - dilated` wraps to 255 on every ring pixel (AUTHORS_CODE.md). Paper 002's scores and Fig. 7's
      threshold (score < 0.5: Dice > 80%) come from that code, so they live on this scale.
    - "eq9" (`relunet_score_eq9`): the plain ratio of eq. 9 with the same A, 2.55 x the authors' value.
    - "cross" (`relunet_score_cross`): the plain ratio with A = the face-connected cross over all axes.
    An explicit `structure` replaces A (plain ratio). An empty mask has no contour: NaN. `entropy_total`:
    H_total itself, for a caller that summed the entropy without keeping its map (`entropy_map` is then not read).
    """
    mask = relunet_mask(p_class)
    if structure is not None:
        contour, factor = ndimage.binary_dilation(mask, structure) & ~mask, 1.0
    else:
        contour = relunet_contour(mask, convention)
        factor = RELUNET_AUTHORS_FACTOR if convention == "authors" else 1.0
    n = int(np.count_nonzero(contour))
    total = _entropy_total(entropy_map, entropy_total)
    return float(factor * total / n) if n else float("nan")


def _entropy_total(entropy_map: np.ndarray | None, entropy_total: float | None) -> float:
    if entropy_total is not None:
        return float(entropy_total)
    return float(np.sum(entropy_map, dtype=np.float64))


def relunet_scores(p_class: np.ndarray, entropy_map: np.ndarray | None = None,
                   entropy_total: float | None = None) -> dict[str, float]:
    """The three conventions of `relunet_score` at once, as scores.csv's columns `relunet_score` (authors),
    `relunet_score_eq9` and `relunet_score_cross`: the mask, H_total and the 3x3-square ring are computed once.
    `entropy_total` replaces the map's sum, as in `relunet_score`."""
    mask = relunet_mask(p_class)
    total = _entropy_total(entropy_map, entropy_total)
    square = int(np.count_nonzero(relunet_contour(mask, "eq9")))
    cross = int(np.count_nonzero(relunet_contour(mask, "cross")))
    ratio = (lambda n: total / n if n else float("nan"))  # noqa: E731
    return {"relunet_score": RELUNET_AUTHORS_FACTOR * ratio(square), "relunet_score_eq9": ratio(square),
            "relunet_score_cross": ratio(cross)}


def coefficient_of_variation(volumes: np.ndarray) -> float:
    """Paper 004's CV of the samples' binarised volumes: Var_i(V_i) / (E_i[V_i] + 1).

    V_i = number of voxels with p_i >= 0.5 in sample i (in voxels of the input image); Var is the population
    variance. (Paper 004 calls it the coefficient of variation although it divides a variance by the mean.)
    """
    v = np.asarray(volumes, dtype=np.float64)
    return float(v.var() / (v.mean() + 1.0))


def mean_pairwise_dice(intersections: np.ndarray, volumes: np.ndarray) -> float:
    """Paper 004's mean pairwise Dice D_pw of N binarised samples (section "Uncertainty information": the "mean
    pairwise dice over all binarized samples", after Roy et al. 2018), exactly:

        D_pw = 1 / C(N, 2) * sum_{i<j} 2 |S_i & S_j| / (|S_i| + |S_j|),

    from the (N, N) matrix of pairwise intersections |S_i & S_j| and the volumes |S_i| (`StreamingStats`
    accumulates both from bit-packed sample masks). The paper does not define the Dice of two empty masks: here
    such a pair agrees (Dice 1); one empty mask against a non-empty one has Dice 0. Fewer than two samples: NaN.
    Nine identical samples and one empty one give 36 / 45 = 0.8 (the pooled variant, `pooled_pairwise_dice`,
    gives 0.889)."""
    v = np.asarray(volumes, dtype=np.float64)
    n = v.size
    if n < 2:
        return float("nan")
    inter = np.asarray(intersections, dtype=np.float64)
    i, j = np.triu_indices(n, 1)
    denom = v[i] + v[j]
    dice = np.where(denom > 0, 2.0 * inter[i, j] / np.where(denom > 0, denom, 1.0), 1.0)
    return float(dice.mean())


def pooled_pairwise_dice(intersections: np.ndarray, volumes: np.ndarray) -> float:
    """A pooled variant of paper 004's mean pairwise Dice (not the paper's definition, which is
    `mean_pairwise_dice`; kept as the `pairwise_dice_pooled` column): one ratio over all pairs,

        D_pooled = 2 * sum_{i<j} |S_i & S_j| / sum_{i<j} (|S_i| + |S_j|)
                 = 2 * sum_{i<j} |S_i & S_j| / ((N - 1) * sum_i |S_i|),

    from the (N, N) matrix of pairwise intersections (the same one `mean_pairwise_dice` reads; equal to
    2 sum_x C(k_x, 2) / ((N - 1) sum_i |S_i|) with k_x the number of masks holding voxel x). It equals the mean
    of the pairwise Dice scores when all samples have the same volume and is biased upward when they do not
    (nine identical samples and one empty: 0.889 against the paper's 0.800). Fewer than two samples: NaN. All
    samples empty: 1 (they agree).
    """
    v = np.asarray(volumes, dtype=np.float64)
    n = v.size
    if n < 2:
        return float("nan")
    if v.sum() == 0:
        return 1.0
    inter = np.asarray(intersections, dtype=np.float64)
    return float(2.0 * inter[np.triu_indices(n, 1)].sum() / ((n - 1) * v.sum()))


def labelled_uncertainty(mean_p_class: np.ndarray, mean_sample_u: np.ndarray) -> float:
    """Paper 004's U_labelled: the mean of U(x) = -(1/N) sum_i p_i(x) ln p_i(x) over the voxels whose mean
    probability is >= 0.5. An empty prediction has no labelled voxels: NaN."""
    mask = mean_p_class >= 0.5
    return float(mean_sample_u[mask].mean()) if mask.any() else float("nan")
