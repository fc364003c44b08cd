"""Synthetic KiTS-like CT volumes: one or two kidneys, a tumour in a kidney, sometimes a cyst.

Labels follow KiTS23: 0 background, 1 kidney, 2 tumour, 3 cyst. Intensities are Hounsfield units
(nephrographic-phase-like: kidney ~ +150, tumour ~ +60..+90 heterogeneous, cyst ~ +5..+15 homogeneous,
fat ~ -100, muscle ~ +50, air -1000 outside the body) plus correlated noise, stored as int16.

Geometry: arrays are (z, y, x) with `spacing` given in the same (z, y, x) order in mm; SimpleITK's spacing
is (x, y, z), so it is reversed when written. Shapes are defined in millimetres, so spheres stay round
whatever the anisotropy. The world origin is the volume's corner at minus half its extent, direction is
the identity. Cases are seeded independently: case k of seed s is the same whatever `n_cases` is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_kaz.datasets.raw import check_writable, dataset_json, parse_dataset_folder
from nnunet_kaz.datasets.shapes import (SmoothNoise3D, correlated_noise, ellipsoid_sdf, random_rotation,
                                        soft_inside)
from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_dir, write_json_atomic

KITS_LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}


def _small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_rotvec(np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))).as_matrix()


def kits3d_case(seed: int, index: int, shape: tuple[int, int, int] = (32, 64, 64),
                spacing: tuple[float, float, float] = (2.5, 0.8, 0.8)) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (int16) and label volume (uint8), both (z, y, x), of case `index` for `seed`."""
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError("shape must be (z, y, x) with every size >= 8")
    rng = np.random.default_rng([int(seed), int(index), 3])
    sz, sy, sx = (float(s) for s in spacing)
    nz, ny, nx = (int(n) for n in shape)
    hz, hy, hx = nz * sz / 2, ny * sy / 2, nx * sx / 2  # half extents (mm)
    z = (np.arange(nz) + 0.5) * sz - hz
    y = (np.arange(ny) + 0.5) * sy - hy
    x = (np.arange(nx) + 0.5) * sx - hx
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    p = np.stack([xx, yy, zz], axis=-1)  # points in (x, y, z) mm

    hu = np.full(shape, -1000.0)
    body = ellipsoid_sdf(p * np.array([1, 1, 0]), np.zeros(3), np.array([0.95 * hx, 0.85 * hy, 1.0]))
    fat = -100.0 + 10.0 * SmoothNoise3D(rng, wavelength=0.5 * hx)(p)
    hu = hu * (1 - soft_inside(body, 0.5)) + fat * soft_inside(body, 0.5)
    spine = ellipsoid_sdf(p * np.array([1, 1, 0]), np.array([0, 0.55 * hy, 0]), np.array([0.25 * hx, 0.2 * hy, 1]))
    a = soft_inside(spine, 0.5)
    hu = hu * (1 - a) + 50.0 * a

    label = np.zeros(shape, np.uint8)
    sides = [-1, 1] if rng.random() < 0.75 else [int(rng.choice([-1, 1]))]
    kidneys = []
    for side in sides:
        c = np.array([side * 0.5 * hx, 0.1 * hy, rng.uniform(-0.1, 0.1) * hz])
        r = np.array([0.28 * hx, 0.35 * hy, 0.6 * hz]) * rng.uniform(0.9, 1.1, size=3)
        rot = _small_rotation(rng, 15.0)
        sdf = ellipsoid_sdf(p, c, r, rot)
        a = soft_inside(sdf, 0.4)
        kid_hu = rng.uniform(135.0, 165.0) + 10.0 * SmoothNoise3D(rng, wavelength=6.0)(p)
        hu = hu * (1 - a) + kid_hu * a
        label[sdf < 0] = 1
        kidneys.append((c, r, rot))

    def point_in_kidney(kidney, depth: float) -> np.ndarray:
        c, r, rot = kidney
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        radius = 1.0 / np.linalg.norm((d @ rot) / r)
        return c + d * max(radius - depth, 0.0)

    min_size = max(spacing)
    k_tumour = int(rng.integers(len(kidneys)))
    tr = max(min_size, rng.uniform(0.35, 0.7) * kidneys[k_tumour][1].min())
    tc = point_in_kidney(kidneys[k_tumour], rng.uniform(0.3, 1.0) * tr)
    t_sdf = np.linalg.norm(p - tc, axis=-1) - tr
    a = soft_inside(t_sdf, 0.4)
    hu = hu * (1 - a) + (rng.uniform(60.0, 90.0) + 15.0 * SmoothNoise3D(rng, wavelength=4.0)(p)) * a
    tumour = t_sdf < 0
    if not tumour.any():  # tiny volumes: keep at least the voxel nearest the centre
        tumour[np.unravel_index(np.argmin(t_sdf), shape)] = True
    label[tumour] = 2

    if rng.random() < 0.5:
        k = int(rng.integers(len(kidneys)))
        cr = max(min_size, rng.uniform(0.2, 0.4) * kidneys[k][1].min())
        for _ in range(30):
            cc = point_in_kidney(kidneys[k], rng.uniform(0.0, 1.0) * cr)
            if np.linalg.norm(cc - tc) > tr + cr + min_size:
                c_sdf = np.linalg.norm(p - cc, axis=-1) - cr
                a = soft_inside(c_sdf, 0.3)
                hu = hu * (1 - a) + rng.uniform(5.0, 15.0) * a
                label[(c_sdf < 0) & (label != 2)] = 3
                break

    hu = hu + correlated_noise(rng, shape, sigma_px=0.7, sd=rng.uniform(8.0, 15.0))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def _write_nifti(arr: np.ndarray, spacing_zyx: tuple[float, float, float], path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])  # SimpleITK: (x, y, z)
    extent = np.array(arr.shape[::-1]) * np.array(spacing_zyx[::-1])
    img.SetOrigin([float(v) for v in -extent / 2])
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def _check_request(n_cases: int, spacing: tuple[float, float, float]) -> None:
    if n_cases < 1:
        raise KazError(f"need n_cases >= 1 (got {n_cases})")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise KazError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")


def make_kits3d_dataset(dataset_dir: str | Path, n_cases: int, seed: int, shape: tuple[int, int, int] = (32, 64, 64),
                        spacing: tuple[float, float, float] = (2.5, 0.8, 0.8), overwrite: bool = False) -> Path:
    """Write KiTS-like phantoms as an nnU-Net v2 raw 3D dataset (`imagesTr/{case}_0000.nii.gz`,
    `labelsTr/{case}.nii.gz`, `dataset.json` with channel "CT") and return its folder.

    The channel is named "CT" so nnU-Net applies CTNormalization (clip to the foreground's 0.5-99.5
    percentiles across the dataset, then its mean and standard deviation), the usual choice for HU data.
    `shape` and `spacing` are in (z, y, x) order, spacing in mm. Folder naming, overwrite guard and atomic
    write as for `make_kaz2d_dataset`.
    """
    dataset_dir = Path(dataset_dir)
    _, name = parse_dataset_folder(dataset_dir)
    _check_request(n_cases, spacing)
    check_writable(dataset_dir, overwrite)
    with atomic_dir(dataset_dir) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for index in range(n_cases):
            case = f"KITS_{index:05d}"
            image, label = kits3d_case(seed, index, shape, spacing)
            _write_nifti(image, spacing, tmp / "imagesTr" / f"{case}_0000.nii.gz")
            _write_nifti(label, spacing, tmp / "labelsTr" / f"{case}.nii.gz")
        meta = {"generator": "nnunet_kaz.datasets.make_kits3d_dataset", "seed": int(seed), "n_cases": int(n_cases),
                "shape_zyx": [int(s) for s in shape], "spacing_zyx_mm": [float(s) for s in spacing]}
        write_json_atomic(dataset_json({"0": "CT"}, KITS_LABELS, n_cases, ".nii.gz", name,
                                       "Synthetic KiTS-like CT phantom (kidney 1, tumour 2, cyst 3)", phantom=meta),
                          tmp / "dataset.json")
    return dataset_dir


KITS23_STRUCTURES = (("kidney", (1, 2, 3)), ("tumor", (2,)), ("cyst", (3,)))  # instance masks per structure
N_RATERS = 3


def _rater_mask(mask: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """One rater's outline of a true instance mask: its boundary moved by a per-rater offset (+- 1 mm,
    positive dilates) plus a smooth jitter (sd 0.5 mm), through the signed distance in mm."""
    from scipy import ndimage

    sd = (ndimage.distance_transform_edt(~mask, sampling=spacing)
          - ndimage.distance_transform_edt(mask, sampling=spacing))
    shift = rng.uniform(-1.0, 1.0) + correlated_noise(rng, mask.shape, sigma_px=2.0, sd=0.5)
    out = sd < shift
    return out if out.any() else mask.copy()


def kits23_instances(label: np.ndarray, spacing: tuple[float, float, float], seed: int, index: int,
                     n_raters: int = N_RATERS) -> dict[str, np.ndarray]:
    """KiTS23-style per-rater instance masks of a phantom label map: file stem
    `{structure}_instance-{k}_annotation-{r}` -> uint8 mask. Instances are the connected components of the
    kidney region (labels 1-3), of the tumour (2) and of the cyst (3); every rater outlines every instance
    (`_rater_mask`), so the raters differ at the boundaries only."""
    from scipy import ndimage

    rng = np.random.default_rng([int(seed), int(index), 23])
    out = {}
    for structure, values in KITS23_STRUCTURES:
        comps, n = ndimage.label(np.isin(label, values))
        for k in range(1, n + 1):
            inst = comps == k
            for r in range(1, n_raters + 1):
                out[f"{structure}_instance-{k}_annotation-{r}"] = _rater_mask(inst, spacing, rng).astype(np.uint8)
    return out


def write_kits3d_kits23_folders(out_dir: str | Path, n_cases: int, seed: int,
                                shape: tuple[int, int, int] = (32, 64, 64),
                                spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
                                overwrite: bool = False) -> Path:
    """Write kits3d phantoms in the KiTS23 layout: `case_XXXXX/imaging.nii.gz` (HU, int16),
    `segmentation.nii.gz` (the phantom's labels, uint8) and `instances/{kidney,tumor,cyst}_instance-K_
    annotation-R.nii.gz` (three raters' outlines of each instance, `kits23_instances`), ready for
    `convert-kits23`. Case k is the same case as `make_kits3d_dataset`'s KITS_0000k. Written through a
    temporary folder; an existing non-empty `out_dir` is replaced only with `overwrite=True`."""
    out_dir = Path(out_dir)
    _check_request(n_cases, spacing)
    check_writable(out_dir, overwrite)
    with atomic_dir(out_dir) as tmp:
        for index in range(n_cases):
            case = tmp / f"case_{index:05d}"
            (case / "instances").mkdir(parents=True)
            image, label = kits3d_case(seed, index, shape, spacing)
            _write_nifti(image, spacing, case / "imaging.nii.gz")
            _write_nifti(label, spacing, case / "segmentation.nii.gz")
            for stem, mask in kits23_instances(label, spacing, seed, index).items():
                _write_nifti(mask, spacing, case / "instances" / f"{stem}.nii.gz")
    return out_dir
