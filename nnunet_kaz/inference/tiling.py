"""Tile and stitch, as nnU-Net's sliding-window predictor does, for anything computed per tile: logits of B MC
samples (the predictor), Grad-CAM maps, MHEX+ CAMs and collaboration maps. One implementation for all of them.

nnU-Net's steps (`nnUNetPredictor.predict_sliding_window_return_logits` in nnunetv2 2.8):
- the image (C, *spatial) is zero-padded to at least the patch size (`acvl_utils` `pad_nd_image`, constant 0,
  centred) and the padding cropped off the result; so an image smaller than the patch in any axis (a 64x72 image
  for a 64x80 patch) is seen by the network at the patch size it was trained with, and the network's strides
  always divide its input;
- tiles start at `compute_steps_for_sliding_window` (public in nnunetv2.inference.sliding_window_prediction);
  for a 2D patch on (C, Z, Y, X) data every slice z is tiled (nnU-Net's 2D configurations), for a 3D patch the
  volume; the tile order is nnU-Net's (`_internal_get_sliding_window_slicers`, a private method: reimplemented
  here, `sliding_window_slicers`, rather than called on a shim);
- each tile's output is weighted by nnU-Net's Gaussian (`compute_gaussian`, sigma 1/8 of the patch, peak 10):
  out = sum_t g_t f_t / sum_t g_t.
Tiles follow the network's device and dtype here, in one place (`stitch_tiles`), whatever device the image is
on: the padded image is moved (and cast) to the network's device once, as nnU-Net moves it once
(`_internal_predict_sliding_window_return_logits`, `data.to(results_device)`), and the tiles are sliced there, so
a CUDA network gets no per-tile host-to-device copies; the sums live on `accumulate_device` in
`accumulate_dtype` (float16 on the results device is what nnU-Net does and what makes one deterministic sample
reproduce `nnUNetv2_predict`).
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple]:
    """(data zero-padded to at least `patch_size` in its last len(patch_size) axes, the slicer that crops the
    padding off again), as nnU-Net pads before its sliding window."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    return pad_nd_image(data, list(patch_size), "constant", {"value": 0}, True, None)


def sliding_window_slicers(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple]:
    """nnU-Net's tiles of a (padded) image of spatial size `image_size`, in its order: slicers into (C, *spatial).
    A 2D patch on a 3D image tiles every slice along the first axis: (slice(None), z, sy, sx)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    image_size, patch_size = tuple(int(s) for s in image_size), tuple(int(p) for p in patch_size)
    per_slice = len(patch_size) == len(image_size) - 1
    if not per_slice and len(patch_size) != len(image_size):
        raise ValueError(f"patch {patch_size} does not fit an image of {len(image_size)} spatial axes")
    inner = image_size[1:] if per_slice else image_size
    steps = compute_steps_for_sliding_window(inner, patch_size, step)
    boxes = [tuple(slice(s, s + p) for s, p in zip(corner, patch_size)) for corner in itertools.product(*steps)]
    if per_slice:
        return [(slice(None), z, *box) for z in range(image_size[0]) for box in boxes]
    return [(slice(None), *box) for box in boxes]


def gaussian_weights(patch_size: Sequence[int], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """nnU-Net's tile weights (sigma 1/8 of the patch, peak 10, no zeros)."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    return compute_gaussian(tuple(int(p) for p in patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10,
                            dtype=dtype, device=torch.device(device))


def network_placement(network: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a network's parameters (CPU float32 for a network without parameters)."""
    for p in network.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def stitch_tiles(fn: Callable[[torch.Tensor], torch.Tensor | np.ndarray], data: torch.Tensor,
                 patch_size: Sequence[int], step: float = 0.5, network: nn.Module | None = None,
                 accumulate_device: torch.device | str = "cpu", accumulate_dtype: torch.dtype = torch.float32,
                 progress: str | None = None, stitch: bool = True,
                 emit: Callable[[slice, torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """Apply `fn` to every nnU-Net tile of `data` (C, *spatial) and stitch its outputs (module docstring).

    `fn` gets one tile (1, C, *patch) on the network's device and dtype (`network`; else as `data` is), a view of
    the padded image moved there once, and returns any (*lead, *patch) array; the result is (*lead, *spatial) on
    `accumulate_device`.

    The sums are kept for a window of the first spatial axis only, as deep as the patch (one slice for a 2D patch
    on a 3D image): nnU-Net's tiles run the first axis outermost, so once a tile starts further down that axis,
    every slice above its start is final (issue 23.7). Final slices are divided by their weights and written into
    the result, or, with `emit`, handed over as `emit(slice of the first spatial axis of `data`, (*lead, rows,
    *rest) view)` in order and never held whole (the view is reused after `emit` returns). Each voxel gets the
    same sums in the same tile order as on a whole-volume buffer, so the values are the same bit for bit.
    `stitch=False`: `fn` runs on every tile and its outputs are dropped (None is returned): what the tiles cost
    without the stitching (benchmarks)."""
    from tqdm import tqdm

    patch_size = tuple(int(p) for p in patch_size)
    padded, revert = pad_to_patch(data, patch_size)
    shape = tuple(padded.shape[1:])
    slicers = sliding_window_slicers(shape, patch_size, step)
    device, dtype = network_placement(network) if network is not None else (data.device, data.dtype)
    padded = padded.to(device=device, dtype=dtype)  # once per image; the tiles are views of it
    acc_device = torch.device(accumulate_device)
    per_slice = len(patch_size) == len(shape) - 1
    depth = 1 if per_slice else patch_size[0]
    crop = tuple(revert[1:])  # the padding off each spatial axis
    first, last = crop[0].start or 0, crop[0].stop if crop[0].stop is not None else shape[0]
    gaussian = gaussian_weights(patch_size, acc_device, accumulate_dtype) if stitch else None
    weights = torch.zeros((depth, *shape[1:]), dtype=accumulate_dtype, device=acc_device) if stitch else None
    state = {"window": None, "result": None, "lo": 0}

    def flush(upto: int) -> None:
        """Rows [lo, upto) of the padded first axis are final: divide, hand over, shift the window."""
        window, lo = state["window"], state["lo"]
        k = upto - lo
        if k <= 0:
            return
        lead = (slice(None),) * (window.ndim - len(shape))
        rows = lead + (slice(0, k),)
        torch.div(window[rows], weights[:k], out=window[rows])
        a, b = max(lo, first), min(upto, last)
        if a < b:
            part = window[lead + (slice(a - lo, b - lo), *crop[1:])]
            if emit is not None:
                emit(slice(a - first, b - first), part)
            else:
                if state["result"] is None:
                    state["result"] = torch.empty((*window.shape[:len(lead)], *data.shape[1:]),
                                                  dtype=accumulate_dtype, device=acc_device)
                state["result"][lead + (slice(a - first, b - first),)] = part
        if k < depth:  # the rows below move up; the freed rows start from zero
            window[lead + (slice(0, depth - k),)] = window[lead + (slice(k, depth),)].clone()
            weights[: depth - k] = weights[k:].clone()
        window[lead + (slice(depth - k, depth),)] = 0
        weights[depth - k:] = 0
        state["lo"] = upto

    for sl in tqdm(slicers, desc=progress, disable=progress is None, leave=False):
        tile = padded[sl][None]
        out = fn(tile)
        if not stitch:
            continue
        out = (torch.from_numpy(np.asarray(out)) if not isinstance(out, torch.Tensor) else out).to(acc_device)
        lead = out.ndim - len(patch_size)
        if state["window"] is None:
            state["window"] = torch.zeros((*out.shape[:lead], depth, *shape[1:]), dtype=accumulate_dtype,
                                          device=acc_device)
        start = sl[1] if per_slice else sl[1].start
        flush(start)  # every row above this tile's start is final
        inside = (0 if per_slice else slice(0, patch_size[0]), *sl[2:])
        out *= gaussian
        state["window"][(slice(None),) * lead + inside] += out
        weights[inside] += gaussian
    if not stitch:
        return None
    flush(shape[0])
    return state["result"]
