"""Exact mean pairwise Dice (paper 004), streamed: time per sample as the number of samples grows, memory of the
stored masks, and the cost per sample against one forward pass of a 3D network (issue 23.4).

`StreamingStats` thresholds each sample's probabilities of a tracked class at 0.5, bit-packs the mask slab by
slab (`MaskPacker`) and adds it to `PairwiseIntersections`, which stores each mask only on the 64-voxel words
where the masks disagree (the band) and intersects a batch of new masks with each stored block once. Measured
here on its own, per sample exactly what the predictor does for one tracked class (threshold slab by slab,
pack, add; the intersection matrix read at the end), on:
- a 3D volume of 128 x 256 x 256 voxels (8.4 M): a jittered ellipsoid (radius x 0.85-1.15), and the same with
  two corner voxels in every mask, so that the masks' union spans the volume;
- one 2D slice of 256 x 256 up to paper 000's full ensemble, 5 seeds x 5 folds x 50 MC = 1250 samples.
Each sample's probabilities are made before its timing starts (an affine map of a distance, >= 0.5 exactly
inside the jittered ellipsoid). Memory = bytes held (`nbytes`: compressed blocks, the open block, the band and
the volume's intersection / union bits) and the most numpy held while a sample was added (tracemalloc), less
the sample's own probabilities.
The intersections are checked against the pair-by-pair definition on the first 30 samples.
The forward pass: the planned 3d_fullres network of bench_predict_3d's phantom dataset (PlainConvUNet, 5 stages,
features capped at 4, patch 48 x 96 x 96) with nnUNetTrainerDropout_p02's dropout, one MC sample over the same
128 x 256 x 256 volume by `predict_samples` (tile step 1.0 as in bench_predict_3d, outputs not stitched).
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import torch

COUNTS = (10, 50, 250)
REPEAT = 3        # best of, per N (the machine may be shared)
VOLUME = (128, 256, 256)
PATCH = (48, 96, 96)
NETWORK = dict(n_stages=5, features_per_stage=[4, 4, 4, 4, 4], conv_op="torch.nn.modules.conv.Conv3d",
               kernel_sizes=[[3, 3, 3]] * 5, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
               n_conv_per_stage=[2] * 5, n_conv_per_stage_decoder=[2] * 4, conv_bias=True,
               norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-05, "affine": True},
               dropout_op="torch.nn.Dropout", dropout_op_kwargs={"p": 0.2, "inplace": False},
               nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})


def _distance(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)).astype(np.float32)


def _probabilities(d, n, seed, full=False):
    """Per sample a float32 'probability' volume, >= 0.5 exactly inside the ellipsoid scaled by U(0.85, 1.15)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        p = torch.from_numpy(rng.uniform(0.85, 1.15) + 0.5 - d)
        if full:  # two corner voxels in every mask stretch the union's bounding box to the whole volume
            p[(0,) * d.ndim] = p[tuple(s - 1 for s in d.shape)] = 1.0
        yield p


def _stream(d, n, full):
    """(PairwiseIntersections after n samples, seconds of the accumulator's own work, tracemalloc peak)."""
    from nnunet_kaz.uncertainty import PairwiseIntersections
    from nnunet_kaz.uncertainty.measures import slabs
    from nnunet_kaz.uncertainty.streaming import MaskPacker

    acc = PairwiseIntersections(d.shape)
    parts = slabs(d.shape)
    seconds, peak = 0.0, 0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for p in _probabilities(d, n, 1, full):
        tracemalloc.reset_peak()
        t = time.perf_counter()
        packer = MaskPacker(d.size)
        for sl in parts:  # as StreamingStats: threshold a slab, pack it
            packer.feed((p[sl] >= 0.5).numpy())
        acc.add_words(packer.finish())
        seconds += time.perf_counter() - t
        # what numpy held while adding, the stored masks included, less the sample's own probabilities
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base - p.numpy().nbytes)
        del p
    tracemalloc.reset_peak()
    t = time.perf_counter()
    acc.inter  # the last batch of masks is intersected when the matrix is read
    seconds += time.perf_counter() - t
    peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
    tracemalloc.stop()
    return acc, seconds, peak


def _check(d, full):
    from nnunet_kaz.uncertainty import PairwiseIntersections

    masks = [(p >= 0.5).numpy() for p in _probabilities(d, 30, 1, full)]
    check = PairwiseIntersections(d.shape)
    for m in masks:
        check.add(m)
    brute = np.array([[(a & b).sum() for b in masks] for a in masks])
    np.testing.assert_array_equal(check.inter, brute)


def _measure(shape, centre, radii, counts, full=False):
    from nnunet_kaz.uncertainty import mean_pairwise_dice

    d = _distance(shape, centre, radii)
    _check(d, full)
    rows = {}
    for n in counts:
        best = None
        for _ in range(REPEAT):
            acc, seconds, peak = _stream(d, n, full)
            if best is None or seconds < best[1]:
                best = (acc, seconds, peak)
        acc, seconds, peak = best
        rows[n] = {"per_sample": seconds / n, "held": acc.nbytes, "packed": acc.packed_nbytes, "peak": peak,
                   "band": acc.band_words, "dice": mean_pairwise_dice(acc.inter, np.diagonal(acc.inter))}
    return rows


def forward_seconds() -> float:
    """Best of 2: one MC sample of the 3D benchmark network over VOLUME (every tile, no stitching)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_kaz.inference.sliding_window import predict_samples, set_mc_dropout

    torch.manual_seed(0)
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", NETWORK,
                                 ("conv_op", "norm_op", "dropout_op", "nonlin"), 1, 4, allow_init=True,
                                 deep_supervision=False)
    set_mc_dropout(net, True)
    data = torch.randn(1, *VOLUME)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        predict_samples(net, data, PATCH, 4, 1, 1.0, stitch=False)
        times.append(time.perf_counter() - t)
    return min(times)


def run() -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = [
            ("3D 128x256x256, ellipsoid", VOLUME, (64, 128, 128), (30, 55, 55), COUNTS, False),
            ("3D 128x256x256, masks spanning the volume", VOLUME, (64, 128, 128), (30, 55, 55), COUNTS, True),
            ("2D 256x256 (up to 5 seeds x 5 folds x 50 MC)", (256, 256), (128, 128), (40, 55), (*COUNTS, 1250),
             False),
        ]
        results = [(label, _measure(shape, centre, radii, counts, full))
                   for label, shape, centre, radii, counts, full in cases]
        forward = forward_seconds()
    finally:
        torch.set_num_threads(threads)
    lines = ["## Exact mean pairwise Dice: time per sample and memory (bench_pairwise_dice)", "",
             "Per sample, what the predictor does for one tracked class: threshold its probabilities at 0.5 slab "
             "by slab, bit-pack the mask (`MaskPacker`) and add it to `PairwiseIntersections`, which keeps each "
             "mask only on the 64-voxel words where the masks disagree (the band) and intersects a batch of new "
             "masks with each stored, zlib-compressed block once (paper 004's mean over pairs, exact). Time = "
             f"the accumulator's own work, reading the matrix at the end included, best of {REPEAT} runs per "
             "number of samples, one thread; the masks: a jittered ellipsoid (radius x 0.85-1.15). Held = what "
             "the masks hold (compressed blocks, the open block, the band, the volume's intersection and union "
             "bits); packed = the stored rows uncompressed; peak = the most numpy held while a sample was added "
             "(the stored masks, the packer, the temporaries; not the sample's own probabilities). Checked "
             "against the pair-by-pair intersections on the first 30 samples.", "",
             "| case | samples | per sample | vs 10 samples | band (words) | held | packed rows | peak while "
             "streaming | mean pairwise Dice |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    flat = []
    for label, rows in results:
        first = rows[min(rows)]["per_sample"]
        for n, r in rows.items():
            ratio = r["per_sample"] / first
            if label.startswith("3D") and n in COUNTS:
                flat.append(ratio)
            lines.append(f"| {label} | {n} | {1e3 * r['per_sample']:.1f} ms | {ratio:.2f}x | {r['band']:,} | "
                         f"{r['held'] / 2**20:.1f} MiB | {r['packed'] / 2**20:.1f} MiB | {r['peak'] / 2**20:.1f} MiB | "
                         f"{r['dice']:.4f} |")
    worst3d = max(r[max(COUNTS)]["per_sample"] for label, r in results if label.startswith("3D"))
    share = worst3d / forward
    lines += ["",
              f"Flat within 1.5x from {COUNTS[0]} to {COUNTS[-1]} samples on the 3D volume: "
              f"**{'met' if max(flat) <= 1.5 else 'missed'}** (largest ratio {max(flat):.2f}x). Each new mask still "
              "meets every stored one (the pairs are what the definition asks for), but only on the band and in "
              "batches, so the per-sample cost stays near that of thresholding and packing the volume.",
              f"Against the network: one MC sample of the 3D benchmark network (bench_predict_3d's planned "
              f"3d_fullres PlainConvUNet, features capped at 4, patch {'x'.join(map(str, PATCH))}, dropout 0.2) "
              f"over the same {'x'.join(map(str, VOLUME))} volume took {forward:.1f} s (tile step 1.0, every "
              f"tile, not stitched); the scores' cost per sample at {COUNTS[-1]} samples, {1e3 * worst3d:.0f} ms, "
              f"is **{100 * share:.1f} %** of it (target <= 10 %: **{'met' if share <= 0.1 else 'missed'}**), per "
              "tracked class: a KiTS23 prediction tracks 3 foreground classes or regions. A network of realistic "
              "width costs many times this tiny one's forward pass, the scores' cost does not change.",
              "Uncompressed, the stored rows hold samples x band / 8 bytes per tracked class (at worst, noise, the "
              "band is the whole volume: 250 samples of a 100-150 M voxel KiTS23 case would hold 2.9-4.4 GiB per "
              "class); compressed they hold what their shapes allow: blob masks, as here, shrink many times. Paper "
              "004 itself uses N = 10 samples."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
