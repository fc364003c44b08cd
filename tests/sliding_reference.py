"""A brute-force reference for anything computed tile by tile over nnU-Net's sliding window (logits, Grad-CAM
maps, MHEX+ maps), written from nnU-Net's definition rather than from its code or ours:

- the image is zero-padded to at least the patch, centred (the smaller half of the padding before each axis, as
  acvl_utils' `pad_nd_image` pads), and the padding is cropped off the result;
- along each axis the tiles start at n = ceil((size - patch) / (step * patch)) + 1 corners spread evenly from 0 to
  size - patch and rounded (nnU-Net's `compute_steps_for_sliding_window`); every corner combination is a tile; a
  2D patch on (C, Z, Y, X) data tiles every slice z;
- every tile's output is weighted by nnU-Net's Gaussian (`compute_gaussian`, sigma 1/8 of the patch, peak 10, in
  the dtype the caller stitches with) and summed in float64 on a whole-volume buffer; the result is the sum
  divided by the summed weights.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

HALF_ULP = 2.0 ** -11        # float16 relative rounding of a normal number
HALF_SUBNORMAL = 2.0 ** -25  # float16 absolute rounding below 2^-14 (half the subnormal spacing)


def tile_corners(size: int, patch: int, step: float) -> list[int]:
    n = math.ceil((size - patch) / (step * patch)) + 1
    return [0] if n == 1 else [int(np.round((size - patch) / (n - 1) * i)) for i in range(n)]


@dataclass
class Stitched:
    value: np.ndarray    # the stitched float64 (*lead, *spatial)
    weights: np.ndarray  # the summed Gaussian weights w (*spatial)
    tiles: np.ndarray    # how many tiles cover each voxel (*spatial)
    peak: np.ndarray     # the largest |output| of a tile at each place (*lead, *spatial)


def brute_force_stitch(fn: Callable[..., np.ndarray], arrays: Sequence[torch.Tensor], patch: Sequence[int],
                       step: float = 0.5, gaussian_dtype: torch.dtype = torch.float32) -> Stitched:
    """`fn(*tiles)` on every tile of the (C_i, *spatial) `arrays` (each tile (1, C_i, *patch), cut from every array
    at the same place) returns (*lead, *patch); stitched as the module docstring says."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(int(p) for p in patch)
    spatial = tuple(arrays[0].shape[1:])
    if len(patch) == len(spatial) - 1:  # a 2D patch: every slice on its own
        parts = [brute_force_stitch(fn, [a[:, z] for a in arrays], patch, step, gaussian_dtype)
                 for z in range(spatial[0])]
        lead = parts[0].value.ndim - len(patch)
        return Stitched(*(np.stack([getattr(p, k) for p in parts], axis=lead if k in ("value", "peak") else 0)
                          for k in ("value", "weights", "tiles", "peak")))
    pads = [max(p - s, 0) for s, p in zip(spatial, patch)]
    before = [d // 2 for d in pads]
    padded = [torch.nn.functional.pad(a, [v for b, d in zip(reversed(before), reversed(pads)) for v in (b, d - b)])
              for a in arrays]
    size = tuple(padded[0].shape[1:])
    g = compute_gaussian(patch, 1.0 / 8, 10, dtype=gaussian_dtype, device=torch.device("cpu")).double().numpy()
    total = peak = None
    weights, count = np.zeros(size), np.zeros(size, int)
    for corner in itertools.product(*(tile_corners(s, p, step) for s, p in zip(size, patch))):
        box = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        out = np.asarray(fn(*(a[(slice(None), *box)][None] for a in padded)), dtype=np.float64)
        if total is None:
            lead = out.shape[:out.ndim - len(patch)]
            total, peak = np.zeros((*lead, *size)), np.zeros((*lead, *size))
        total[(Ellipsis, *box)] += g * out
        peak[(Ellipsis, *box)] = np.maximum(peak[(Ellipsis, *box)], np.abs(out))
        weights[box] += g
        count[box] += 1
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    return Stitched((total / weights)[(Ellipsis, *crop)], weights[crop], count[crop], peak[(Ellipsis, *crop)])


def mirrored_logits(network: torch.nn.Module, mirror_axes: Sequence[int] | None
                    ) -> Callable[[torch.Tensor], np.ndarray]:
    """nnU-Net's test-time mirroring of one tile: the mean of the logits over the identity and every combination of
    the mirror axes (each flip undone on the output); (C, *patch) float64."""
    axes = [a + 2 for a in (mirror_axes or ())]

    @torch.no_grad()
    def fn(tile: torch.Tensor) -> np.ndarray:
        combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        outs = [(torch.flip(network(torch.flip(tile, c)), c) if c else network(tile))[0].double() for c in combos]
        return (sum(outs) / len(outs)).numpy()
    return fn


def half_stitch_bound(z_max: np.ndarray, weights: np.ndarray, n_tiles: np.ndarray) -> np.ndarray:
    """Bound on |nnU-Net's stitched logit - the float64 stitch| when nnU-Net sums T = `n_tiles` Gaussian-weighted
    tile logits into float16 buffers (products exact in float32, one float16 rounding per addition to the logit
    sum and to the weight sum, then one for the division; the same float16 Gaussian in both): each partial sum is
    at most w * Z (Z the largest |logit| of a tile there), so the logit sum is off by T u w Z and the weight sum by
    T u w, and their quotient by T u Z + T u Z, and the division adds u Z: (2T + 1) u Z, u = 2^-11. Where the sums
    are subnormal (the Gaussian's corners, ~1e-7) each rounding is 2^-25 absolute instead, divided by w."""
    t = 2 * n_tiles + 1
    return t * HALF_ULP * z_max + t * HALF_SUBNORMAL * (1 + z_max) / weights
