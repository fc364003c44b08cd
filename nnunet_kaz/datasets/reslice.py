"""Radial reslicing of a CT volume around an axis (paper 000 section 3.1: every 15 degrees, 12 planes).

Plane k contains the axis (point c, unit direction a) and the radial direction
r_k = cos(t_k) e1 + sin(t_k) e2, t_k = k * step, k = 0 .. 180/step - 1, where e1 is the unit vector
perpendicular to a closest to the volume's first index axis (its x axis; its y axis if a is parallel to x)
and e2 = a x e1. Output pixel (row i, column j) lies at the physical point
    c + (j - (W - 1) / 2) * s * r_k - (i - (H - 1) / 2) * s * a,
so the axis runs down the middle column, top of the image towards +a, and s is the output pixel size in mm
(default: the volume's smallest spacing). Sampling uses SimpleITK's Resample in physical coordinates, so
spacing, origin and direction of the input are honoured: linear interpolation for the image (outside the
volume: -1024 HU), nearest neighbour for the mask (outside: 0). Images are windowed to 8 bit
(default level 40, width 400 HU), masks written 0/255; files `{patient}_a{angle:03d}.bmp` in
`images/` and `masks/`, the names convert-kaz reads by default.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from nnunet_kaz.datasets.kaz_convert import angle_tag
from nnunet_kaz.datasets.shapes import window_to_uint8
from nnunet_kaz.errors import KazError
from nnunet_kaz.input_checks import image_size
from nnunet_kaz.io_utils import atomic_path


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    n = np.linalg.norm(v)
    if v.shape != (3,) or not np.isfinite(n) or n == 0:
        raise KazError(f"axis direction must be three numbers, not all zero; got {list(np.ravel(v))}")
    return v / n


def plane_basis(image: sitk.Image, axis_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, e1, e2): the unit axis and two unit vectors spanning its perpendicular plane (see module doc)."""
    a = _unit(axis_dir)
    d = np.array(image.GetDirection()).reshape(3, 3)
    ref = d[:, 0] if abs(d[:, 0] @ a) < 0.9 else d[:, 1]
    e1 = ref - (ref @ a) * a
    e1 /= np.linalg.norm(e1)
    return a, e1, np.cross(a, e1)


def axis_from_mask(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (mm) and principal axis (unit, largest-variance direction of the mask's voxel centres in
    physical space) of the non-zero voxels; the axis points towards +z of the world (sign convention)."""
    arr = sitk.GetArrayViewFromImage(mask)
    idx = np.argwhere(arr > 0)[:, ::-1].astype(float)  # (x, y, z) indices
    if len(idx) < 2:
        raise KazError("--axis-from-mask: the mask has fewer than two foreground voxels")
    d = np.array(mask.GetDirection()).reshape(3, 3)
    pts = np.asarray(mask.GetOrigin()) + (idx * np.asarray(mask.GetSpacing())) @ d.T
    centroid = pts.mean(axis=0)
    w, v = np.linalg.eigh(np.cov((pts - centroid).T))
    axis = v[:, int(np.argmax(w))]
    if axis[2] < 0 or (axis[2] == 0 and axis[np.argmax(np.abs(axis))] < 0):
        axis = -axis
    return centroid, axis


def _inside(image: sitk.Image, point) -> bool:
    idx = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(x) for x in point]))
    return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(image.GetSize()) - 0.5))


def _reference(image: sitk.Image, center, a, r, size_hw, pixel_mm) -> sitk.Image:
    h, w = size_hw
    n = np.cross(r, -a)
    ref = sitk.Image([int(w), int(h), 1], sitk.sitkFloat32)
    ref.SetSpacing([pixel_mm, pixel_mm, 1.0])
    ref.SetDirection(np.column_stack([r, -a, n]).ravel().tolist())
    origin = np.asarray(center) - (w - 1) / 2 * pixel_mm * r + (h - 1) / 2 * pixel_mm * a
    ref.SetOrigin(origin.tolist())
    return ref


def radial_slices(image: sitk.Image, axis_point, axis_dir, step: float = 15.0, size_hw: tuple[int, int] | None = None,
                  pixel_mm: float | None = None, mask: sitk.Image | None = None) -> list[dict]:
    """Resample the planes through the axis; returns per angle {"angle", "hu" (float32 H x W), "mask"}.

    Default size: square, covering the volume's bounding sphere around the axis point.
    """
    if not 0 < step <= 180:
        raise KazError(f"--step must be in (0, 180] degrees, got {step}")
    a, e1, e2 = plane_basis(image, axis_dir)
    pixel_mm = float(pixel_mm or min(image.GetSpacing()))
    if size_hw is None:
        corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                   for corner in np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in image.GetSize()])).reshape(3, -1).T]
        radius = max(np.linalg.norm(np.asarray(corners) - np.asarray(axis_point), axis=1))
        side = int(np.ceil(2 * radius / pixel_mm))
        size_hw = (side, side)
    out = []
    for angle in np.arange(0.0, 180.0 - 1e-9, step):
        t = np.deg2rad(angle)
        ref = _reference(image, axis_point, a, np.cos(t) * e1 + np.sin(t) * e2, size_hw, pixel_mm)
        hu = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, -1024.0)
        item = {"angle": float(angle), "hu": sitk.GetArrayFromImage(hu)[0]}
        if mask is not None:
            m = sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            item["mask"] = (sitk.GetArrayFromImage(m)[0] > 0).astype(np.uint8)
        out.append(item)
    return out


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def reslice_to_bmp(image_path: str | Path, out_dir: str | Path, mask_path: str | Path | None = None,
                   axis_point=None, axis_dir=None, axis_from_mask_: bool = False, step: float = 15.0,
                   size_hw: tuple[int, int] | None = None, pixel_mm: float | None = None, patient: str | None = None,
                   window: tuple[float, float] = (40.0, 400.0), overwrite: bool = False) -> list[Path]:
    """Reslice one CT (and mask) and write `out_dir/images/{patient}_a045.bmp` (and `masks/`).

    `patient` defaults to the image's file name without extension. All checks (readable files, matching
    image/mask grids, the axis inside the volume, existing outputs) happen before anything is written;
    several volumes may be resliced into the same `out_dir`. Returns the written files.
    """
    problems = []
    image_path = Path(image_path)
    image_size(image_path)  # complete file: SimpleITK reads a truncated .nii.gz as zeros
    try:
        image = sitk.ReadImage(str(image_path))
    except RuntimeError as e:
        raise KazError(f"{image_path}: cannot read as an image ({str(e).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(f"{image_path}: expected a single-channel 3D volume")
    mask = None
    if mask_path is not None:
        try:
            image_size(mask_path)
            mask = sitk.ReadImage(str(mask_path))
        except KazError as e:
            problems.append(str(e))
        except RuntimeError as e:
            problems.append(f"{mask_path}: cannot read as an image ({str(e).strip().splitlines()[-1]})")
        if mask is not None and not _same_grid(image, mask):
            problems.append(f"{mask_path}: size/spacing/origin/direction differ from {image_path}")
    if axis_from_mask_:
        if mask is None:
            problems.append("--axis-from-mask needs --mask")
        elif not problems:
            axis_point, axis_dir = axis_from_mask(mask)
    elif axis_point is None or axis_dir is None:
        problems.append("give --axis-point X Y Z and --axis-dir DX DY DZ, or --axis-from-mask with --mask")
    if problems:
        raise KazError("; ".join(problems) + "; nothing written")
    if not _inside(image, axis_point):
        raise KazError(f"axis point {list(np.round(axis_point, 2))} (mm) is outside the volume {image_path}; "
                       f"nothing written")
    patient = patient or image_path.name.split(".")[0]
    slices = radial_slices(image, axis_point, axis_dir, step, size_hw, pixel_mm, mask)
    out_dir = Path(out_dir)
    targets = []
    for s in slices:
        name = f"{patient}_{angle_tag(s['angle'])}.bmp"
        targets.append((out_dir / "images" / name, window_to_uint8(s["hu"], *window)))
        if mask is not None:
            targets.append((out_dir / "masks" / name, s["mask"] * np.uint8(255)))
    existing = [str(p) for p, _ in targets if p.exists()]
    if existing and not overwrite:
        raise KazError("outputs exist (pass --overwrite): " + ", ".join(existing) + "; nothing written")
    for path, arr in targets:
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format="BMP")
    return [p for p, _ in targets]
