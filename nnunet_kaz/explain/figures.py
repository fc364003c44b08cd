"""Grid PNG of layer-wise heatmaps overlaid on the image (paper 000 Fig. 2 style), matplotlib Agg."""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_path


def pick_slice(shape: tuple[int, ...], mask: np.ndarray | None = None, axis: int = 0) -> int:
    """Index along `axis` of a 3D volume to show: the slice with the most mask voxels, else the middle one."""
    if mask is not None and np.any(mask):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        return int(np.argmax(np.count_nonzero(mask, axis=other)))
    return shape[axis] // 2


def save_gradcam_grid(image: np.ndarray, maps: Mapping[str, np.ndarray], path, mask: np.ndarray | None = None,
                      slice_index: int | None = None, axis: int = 0, ncols: int = 4, alpha: float = 0.45,
                      title: str | None = None) -> None:
    """One panel per layer (in the order of `maps`): the image in grey with the layer's heatmap in 'jet' on top,
    each heatmap scaled to its own maximum (an all-zero map stays transparent-blue). The first panel shows the
    image with the target mask's outline.

    image: (*spatial) or (C, *spatial) (channel 0 is shown); maps: {name: (*spatial)}; 3D inputs are cut at
    `slice_index` along `axis` (default `pick_slice`). Written atomically to `path` (PNG).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not maps:
        raise KazError("no heatmaps to draw")
    spatial = next(iter(maps.values())).shape
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == len(spatial) + 1:
        image = image[0]
    if image.shape != spatial or any(np.shape(m) != spatial for m in maps.values()):
        raise KazError(f"image {image.shape} and heatmaps {[np.shape(m) for m in maps.values()]} differ in shape")
    if mask is not None and np.shape(mask) != spatial:
        raise KazError(f"mask {np.shape(mask)} and image {spatial} differ in shape")
    if len(spatial) == 3:
        idx = pick_slice(spatial, mask, axis) if slice_index is None else slice_index
        cut = lambda a: np.take(np.asarray(a), idx, axis=axis)  # noqa: E731
        image, maps = cut(image), {k: cut(v) for k, v in maps.items()}
        mask = cut(mask) if mask is not None else None
        title = f"{title or ''} slice {idx} (axis {axis})".strip()
    elif len(spatial) != 2:
        raise KazError(f"heatmaps must be 2D or 3D, got shape {spatial}")

    n = len(maps) + 1
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False)
    lo, hi = np.percentile(image, [0.5, 99.5])
    panels = [("image", None)] + list(maps.items())
    for ax, (name, heat) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if heat is None:
            if mask is not None and np.any(mask):
                ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="lime", linewidths=0.8)
        else:
            peak = float(np.max(heat))
            ax.imshow(np.asarray(heat) / peak if peak > 0 else np.zeros_like(heat), cmap="jet", vmin=0, vmax=1,
                      alpha=alpha)
        ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
