"""Spacing-aware morphological closing and hole filling of label maps.

Radii are physical (mm, or whatever unit the spacing is in: nnU-Net gives PNG/BMP images a spacing of 1 per
pixel, so radii are then in pixels). skimage's `ball` / `disk` are isotropic in voxels: on a CT volume with
0.8 x 0.8 mm pixels and 3 mm slices a 3-voxel ball would reach 2.4 mm in-plane but 9 mm across slices,
bridging gaps between slices that are far apart. `ellipsoid_element` instead holds every voxel offset whose
physical distance is at most the radius, so the element is an ellipsoid in voxels and a ball in millimetres.
Axes whose spacing exceeds the radius get no extent (the closing then works within slices).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def ellipsoid_element(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean structuring element: offsets d (voxels) with sum_i (d_i * spacing_i)^2 <= radius_mm^2."""
    spacing = np.asarray(spacing, dtype=np.float64)
    half = np.floor(radius_mm / spacing + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2 + 1e-9


def binary_closing_padded(mask: np.ndarray, element: np.ndarray) -> np.ndarray:
    """Closing (dilation then erosion) of `mask` as if it were surrounded by background: padding by the
    element's half-size keeps scipy's erosion from eating foreground that touches the array border."""
    pad = [(s // 2, s // 2) for s in element.shape]
    padded = np.pad(mask.astype(bool), pad)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, element), element)
    return closed[tuple(slice(p, p + n) for (p, _), n in zip(pad, mask.shape))]


def close_labels(seg: np.ndarray, spacing: Sequence[float], radius_mm: float, fill_holes: bool = False,
                 labels: Sequence[int] | None = None) -> np.ndarray:
    """Close each foreground label with a ball of `radius_mm` (physical units) and optionally fill its holes
    (background regions not connected to the array border, in the full dimensionality of the map after
    dropping length-1 axes, so a (1, H, W) slice is filled in 2D).

    Only background voxels are added: a voxel claimed by several labels goes to the first in `labels`
    (default: all foreground labels in ascending order). Other labels are never overwritten.
    """
    shape = seg.shape
    keep_axes = [i for i, n in enumerate(shape) if n > 1]
    work = seg.reshape([shape[i] for i in keep_axes]) if len(keep_axes) < seg.ndim else seg
    sp = [float(spacing[i]) for i in keep_axes]
    out = work.copy()
    labels = [int(v) for v in np.unique(work) if v != 0] if labels is None else list(labels)
    element = ellipsoid_element(radius_mm, sp) if radius_mm > 0 and work.ndim else None
    for lab in labels:
        mask = work == lab
        if not mask.any():
            continue
        grown = binary_closing_padded(mask, element) if element is not None and element.sum() > 1 else mask
        if fill_holes:
            grown = ndimage.binary_fill_holes(grown)
        out[grown & (out == 0)] = lab
    return out.reshape(shape)
