"""Exact mean pairwise Dice (paper 004), streamed: memory and time of the bit-packed sample masks.

`StreamingStats` keeps each sample's 0.5-thresholded mask bit-packed over the union bounding box of all masks,
in zlib-compressed blocks (`PairwiseIntersections`), and intersects each new mask with every stored one.
Measured here on its own, fed numpy masks as the predictor would feed it sample by sample:
- a 3D volume of 128 x 256 x 256 voxels (8.4 M) with 250 samples: a jittered ellipsoid whose union box is
  ~0.7 M voxels, and the worst case where the masks span the whole volume (box = volume);
- paper 000's full ensemble on one 2D slice: 5 seeds x 5 folds x 50 MC = 1250 samples of 256 x 256.
Memory = bytes of the packed masks (`pairwise_nbytes`) and tracemalloc's peak of everything allocated while
streaming (numpy reports its buffers to tracemalloc; the masks themselves are generated outside it). The
result is checked against the pair-by-pair definition on the first 30 samples.
"""
from __future__ import annotations

import itertools
import time
import tracemalloc

import numpy as np


def _distance(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)).astype(np.float32)


def _jittered(d, n, seed, full=False):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        mask = d <= rng.uniform(0.85, 1.15)
        if full:  # two corner voxels stretch the union box to the whole volume
            mask[(0,) * d.ndim] = mask[tuple(s - 1 for s in d.shape)] = True
        yield mask


def _measure(shape, centre, radii, n, full=False):
    from nnunet_kaz.uncertainty import PairwiseIntersections, mean_pairwise_dice

    d = _distance(shape, centre, radii)
    acc = PairwiseIntersections(shape)
    seconds = 0.0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for mask in _jittered(d, n, 1, full):
        t = time.perf_counter()
        acc.add(mask)
        seconds += time.perf_counter() - t
        del mask
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    # the same accumulator on the first 30 masks against the pair-by-pair definition
    masks = list(_jittered(d, 30, 1, full))
    check = PairwiseIntersections(shape)
    for mask in masks:
        check.add(mask)
    brute = [2 * (a & b).sum() / (a.sum() + b.sum()) for a, b in itertools.combinations(masks, 2)]
    assert abs(mean_pairwise_dice(check.inter, np.diagonal(check.inter)) - np.mean(brute)) < 1e-12
    np.testing.assert_array_equal(check.inter, acc.inter[:30, :30])
    box = int(np.prod(acc._frame_shape()))
    return {"box": box, "nbytes": acc.nbytes, "raw": acc.packed_nbytes, "peak": peak, "seconds": seconds,
            "dice": mean_pairwise_dice(acc.inter, np.diagonal(acc.inter)), "n": n}


def run() -> str:
    cases = [
        ("3D 128x256x256, 250 samples, ellipsoid", (128, 256, 256), (64, 128, 128), (30, 55, 55), 250, False),
        ("3D 128x256x256, 250 samples, masks spanning the volume", (128, 256, 256), (64, 128, 128),
         (30, 55, 55), 250, True),
        ("2D 256x256, 1250 samples (5 seeds x 5 folds x 50 MC)", (256, 256), (128, 128), (40, 55), 1250, False),
    ]
    lines = ["## Exact mean pairwise Dice: memory of the bit-packed sample masks (bench_pairwise_dice)", "",
             "`StreamingStats` keeps every sample's 0.5-mask bit-packed over the union bounding box of all masks, in "
             "zlib-compressed blocks of up to 4 MiB, and intersects each new mask with the stored ones (paper 004's "
             "mean over pairs, exact). Packed = samples x union box / 8 bytes, what the masks would hold "
             "uncompressed; held = what they hold (compressed blocks and the open one). Fed numpy masks "
             "one at a time; time = the accumulator's own work; peak = tracemalloc peak while streaming (the packed masks, the sample's own mask as the predictor holds it, temporaries). Checked "
             "against the pair-by-pair definition on the first 30 samples.", "",
             "| case | union box (voxels) | packed | held | peak while streaming | time | per sample | mean pairwise "
             "Dice |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, shape, centre, radii, n, full in cases:
        r = _measure(shape, centre, radii, n, full)
        lines.append(f"| {label} | {r['box']:,} | {r['raw'] / 2**20:.1f} MiB | {r['nbytes'] / 2**20:.1f} MiB | "
                     f"{r['peak'] / 2**20:.1f} MiB | "
                     f"{r['seconds']:.1f} s | {1e3 * r['seconds'] / n:.1f} ms | {r['dice']:.4f} |")
    kits = 250 * np.array([100e6, 150e6]) / 8 / 2**30
    lines += ["", f"Uncompressed, the masks would hold samples x union box / 8 bytes per tracked class (arithmetic: "
              f"a KiTS23 3d_fullres case of 100-150 M voxels whose masks spanned the whole volume, "
              f"{kits[0]:.1f}-{kits[1]:.1f} GiB per class for 250 samples); compressed they hold what their shapes "
              f"allow: blobs, as here, shrink many times, noise would not shrink (its bound is the packed size). "
              f"Paper 004 itself uses N = 10 samples."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
