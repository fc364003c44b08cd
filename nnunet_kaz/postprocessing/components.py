"""Largest connected component per label, with paper 000's cyst rule (section 2.3): "the largest foreground
component is retained ... This didn't apply to instances where cysts are larger than the KAZ; in such a case,
the second largest component is selected."

Definitions:
- Components are found with scipy.ndimage.label at `connectivity` (1 = faces only, up to ndim = faces, edges
  and corners; default ndim: 8-connected in 2D, 26-connected in 3D), after dropping length-1 axes.
- Size is the voxel count; within one image it orders components exactly as their physical volume would.
- Rule: keep the largest component of the label; when the largest is a cyst and a second exists, keep the
  second largest instead (as the paper says: the second largest, even if it is a cyst too). When the only
  component is a cyst, nothing of that label is kept. Removed voxels become background (0).
- A component is a cyst:
  * cyst_rule "label" (multi-class models with a cyst class, e.g. KiTS label 3): components are taken of the
    union of the label and `cyst_label`, only those holding voxels of the label compete, and a component is a
    cyst when more than half of its voxels are labelled `cyst_label`. Cyst voxels are never removed; the
    cyst label itself is not reduced to one component (several cysts are normal).
  * cyst_rule "intensity" (binary models): the input image's mean over the component's interior lies in
    `fluid_window` (default -10..20, for HU) and its standard deviation is at most `max_std` (default 10).
    The interior is the component eroded by one voxel (faces), or the whole component if that leaves nothing,
    so partial-volume rims do not inflate the deviation.
  * cyst_rule "none": the plain largest component.

Limits of the intensity rule, honestly: it only sees mean and spread, so an ablation zone of water-like
density and low texture is taken for a cyst (and then dropped), and a cyst with beam-hardening or noisy
images is missed. `max_std` must match the scanner's noise (measure it in a known cyst). The window and the
limit are in the image's units: 8-bit BMP/PNG slices windowed from CT are not HU, so convert them with
`hu_to_image_units` (or give them in gray levels); an image resized by the chain is smoothed by the
interpolation, which lowers its deviation a little. Measured on the kaz2d phantom (seed 0, 128 x 128 slices):
true ablation zones have interior means 10-22 HU and deviations 7-14 HU, cysts -4-15 HU and 5-11 HU, so
with the defaults 9 of 24 zone slices pass as cysts and 2 of 8 cyst slices do not. The rule is therefore
off ("none") unless asked for, and its window and limit should be tuned on labelled data first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_kaz.errors import KazError

CYST_RULES = ("none", "intensity", "label")


def hu_to_image_units(hu: float | np.ndarray, level: float = 40.0, width: float = 400.0,
                      std: bool = False) -> float | np.ndarray:
    """HU -> gray levels of an 8-bit image windowed at `level` / `width` (0 at level - width/2, 255 at
    level + width/2); with `std=True` convert a spread (scale only, no offset)."""
    scale = 255.0 / width
    return hu * scale if std else (hu - (level - width / 2.0)) * scale


def _squeeze(arr: np.ndarray) -> np.ndarray:
    return arr.reshape([n for n in arr.shape if n > 1]) if 1 in arr.shape else arr


def _components(mask: np.ndarray, connectivity: int | None) -> tuple[np.ndarray, int]:
    ndim = max(mask.ndim, 1)
    conn = ndim if connectivity is None else min(int(connectivity), ndim)
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(ndim, conn))


def is_fluid_like(image: np.ndarray, component: np.ndarray, fluid_window: Sequence[float], max_std: float) -> bool:
    """Cyst test of the intensity rule (module docstring): interior mean within the window, spread <= max_std."""
    inner = ndimage.binary_erosion(component)
    vals = image[inner] if inner.any() else image[component]
    lo, hi = fluid_window
    return bool(lo <= vals.mean() <= hi and vals.std() <= max_std)


def keep_largest_components(seg: np.ndarray, labels: Sequence[int] | None = None, connectivity: int | None = None,
                            cyst_rule: str = "none", cyst_label: int | None = None, image: np.ndarray | None = None,
                            fluid_window: Sequence[float] = (-10.0, 20.0), max_std: float = 10.0,
                            ) -> tuple[np.ndarray, dict]:
    """Apply the largest-component rule (module docstring) to each label of `seg`.

    Returns the cleaned map and a report {label: {"sizes": [...] largest first, "cyst": [...], "kept": index
    into sizes or None}}.
    """
    if cyst_rule not in CYST_RULES:
        raise KazError(f"unknown cyst rule '{cyst_rule}' (choose from {', '.join(CYST_RULES)})")
    if cyst_rule == "label" and cyst_label is None:
        raise KazError("the 'label' cyst rule needs the cyst label (cyst_label)")
    if cyst_rule == "intensity":
        if image is None:
            raise KazError("the 'intensity' cyst rule needs the input image")
        if image.shape != seg.shape:
            raise KazError(f"the input image has shape {image.shape} but the segmentation {seg.shape}")
    work = _squeeze(seg)
    img = _squeeze(np.asarray(image, dtype=np.float64)) if image is not None else None
    out = work.copy()
    if labels is None:
        labels = [int(v) for v in np.unique(work) if v != 0 and not (cyst_rule == "label" and v == cyst_label)]
    report: dict[int, dict] = {}
    for lab in labels:
        own = work == lab
        if not own.any():
            continue
        region = own | (work == cyst_label) if cyst_rule == "label" else own
        comp, n = _components(region, connectivity)
        ids = np.arange(1, n + 1)
        if cyst_rule == "label":  # only components holding voxels of this label compete
            ids = ids[ndimage.sum(own, comp, ids) > 0]
        sizes = ndimage.sum(region, comp, ids).astype(np.int64)
        order = np.argsort(-sizes, kind="stable")
        ids, sizes = ids[order], sizes[order]
        cyst = [_is_cyst(comp == i, work, cyst_rule, cyst_label, img, fluid_window, max_std) for i in ids[:1]]
        kept = 0 if not cyst[0] else (1 if len(ids) > 1 else None)
        keep_mask = comp == ids[kept] if kept is not None else np.zeros_like(own)
        out[own & ~keep_mask] = 0
        report[int(lab)] = {"sizes": sizes.tolist(), "largest_is_cyst": bool(cyst[0]), "kept": kept}
    return out.reshape(seg.shape), report


def _is_cyst(component: np.ndarray, work: np.ndarray, rule: str, cyst_label: int | None, image: np.ndarray | None,
             fluid_window: Sequence[float], max_std: float) -> bool:
    if rule == "label":
        return bool((work[component] == cyst_label).mean() > 0.5)
    if rule == "intensity":
        return is_fluid_like(image, component, fluid_window, max_std)
    return False


def remove_small_components(seg: np.ndarray, min_size: float, connectivity: int | None = None,
                            ) -> tuple[np.ndarray, dict]:
    """Remove every component (module docstring's connectivity; default full) of each foreground label with
    fewer than `min_size` voxels (set to background). Returns the map and {label: voxels removed}."""
    work = _squeeze(seg)
    out = work.copy()
    removed: dict[int, int] = {}
    for lab in [int(v) for v in np.unique(work) if v != 0]:
        comp, n = _components(work == lab, connectivity)
        sizes = ndimage.sum(np.ones_like(comp), comp, np.arange(1, n + 1))
        small = np.flatnonzero(sizes < min_size) + 1
        if small.size:
            drop = np.isin(comp, small)
            out[drop] = 0
            removed[lab] = int(drop.sum())
    return out.reshape(seg.shape), removed
