"""Radial reslicing: known objects in a volume with anisotropic spacing and a rotated direction come out
with the expected cross-sections at every angle."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy.spatial.transform import Rotation

from nnunet_kaz.cli import main as cli_main
from nnunet_kaz.datasets import axis_from_mask, radial_slices, reslice_to_bmp
from nnunet_kaz.datasets.reslice import plane_basis
from nnunet_kaz.errors import KazError

SPACING = (0.7, 0.9, 2.0)  # x, y, z in mm: anisotropic
SIZE = (64, 56, 32)  # x, y, z voxels
DIRECTION = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix()
ORIGIN = np.array([-12.0, 30.0, 5.0])
CYL_R, SPH_R, SPH_D = 6.0, 6.0, 12.0  # cylinder radius, sphere radius and distance from the axis (mm)


def physical_grid() -> np.ndarray:
    """Physical (x, y, z) mm of every voxel centre, array (z, y, x, 3), from origin, spacing and direction."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in SIZE[::-1]], indexing="ij")
    idx = np.stack([i, j, k], axis=-1) * np.array(SPACING)
    return ORIGIN + idx @ DIRECTION.T


def to_image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN.tolist())
    img.SetDirection(DIRECTION.ravel().tolist())
    return img


@pytest.fixture(scope="module")
def scene():
    pts = physical_grid()
    center = pts.reshape(-1, 3).mean(axis=0)
    axis = np.array([0.2, -0.1, 1.0])
    axis /= np.linalg.norm(axis)
    a, e1, e2 = plane_basis(to_image(np.zeros(SIZE[::-1], np.int16)), axis)
    sphere_dir = np.cos(np.deg2rad(40)) * e1 + np.sin(np.deg2rad(40)) * e2  # off-axis, at 40 degrees
    sphere_c = center + SPH_D * sphere_dir + 5.0 * a
    rel = pts - center
    radial = np.linalg.norm(rel - (rel @ a)[..., None] * a, axis=-1)
    hu = np.where(radial < CYL_R, 300, -100).astype(np.int16)
    mask = (np.linalg.norm(pts - sphere_c, axis=-1) < SPH_R).astype(np.uint8)
    return to_image(hu), to_image(mask), center, a, e1, e2, sphere_c


def expected(center, a, r, shape, pixel, sphere_c):
    h, w = shape
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    p = center + ((j - (w - 1) / 2) * pixel)[..., None] * r - ((i - (h - 1) / 2) * pixel)[..., None] * a
    rel = p - center
    radial = np.linalg.norm(rel - (rel @ a)[..., None] * a, axis=-1)
    return radial < CYL_R, np.linalg.norm(p - sphere_c, axis=-1) < SPH_R


def dice(x, y):
    return 2 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1)


def test_cross_sections_at_every_angle(scene):
    image, mask, center, a, e1, e2, sphere_c = scene
    shape, pixel = (48, 48), 0.8
    slices = radial_slices(image, center, a, 15.0, shape, pixel, mask)
    assert [s["angle"] for s in slices] == [15.0 * k for k in range(12)]
    # the sphere's centre is at distance SPH_D * |sin(angle - 40)| from plane k
    hits = 0
    for s in slices:
        t = np.deg2rad(s["angle"])
        cyl, sph = expected(center, a, np.cos(t) * e1 + np.sin(t) * e2, shape, pixel, sphere_c)
        # the axis' band, everywhere inside the volume (the central rows)
        band = s["hu"][16:32] > 100
        assert dice(band, cyl[16:32]) > 0.9, s["angle"]
        if sph.sum() > 40:
            hits += 1
            assert dice(s["mask"] > 0, sph) > 0.75, s["angle"]
            got = np.argwhere(s["mask"]).mean(axis=0)
            assert np.allclose(got, np.argwhere(sph).mean(axis=0), atol=1.5), s["angle"]
        elif sph.sum() == 0:
            assert s["mask"].sum() == 0, s["angle"]
    assert hits >= 2  # 30, 45 and 60 degrees cut the sphere


def test_axis_from_mask_recovers_principal_axis():
    pts = physical_grid()
    c = pts.reshape(-1, 3).mean(axis=0)
    d = np.array([0.3, 0.2, 1.0])
    d /= np.linalg.norm(d)
    rel = pts - c
    along = rel @ d
    across = np.linalg.norm(rel - along[..., None] * d, axis=-1)
    mask = to_image(((along / 20.0) ** 2 + (across / 5.0) ** 2 < 1).astype(np.uint8))
    centroid, axis = axis_from_mask(mask)
    assert abs(axis @ d) > 0.99 and axis[2] > 0
    assert np.linalg.norm(centroid - c) < 1.0


def test_reslice_writes_bmps_for_convert_kaz(scene, tmp_path):
    image, mask, center, a, *_ = scene
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "m.nii.gz"))
    out = tmp_path / "slices"
    assert cli_main(["reslice", "--image", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "m.nii.gz"),
                     "--axis-point", *map(str, center), "--axis-dir", *map(str, a), "--size", "40", "50",
                     "-o", str(out), "--patient", "P07"]) == 0
    imgs = sorted(p.name for p in (out / "images").iterdir())
    assert imgs == [f"P07_a{15 * k:03d}.bmp" for k in range(12)]
    assert sorted(p.name for p in (out / "masks").iterdir()) == imgs
    first = np.asarray(Image.open(out / "images" / imgs[0]))
    assert first.shape == (40, 50) and first.dtype == np.uint8
    assert set(np.unique(np.asarray(Image.open(out / "masks" / imgs[3])))) == {0, 255}
    # the cylinder (300 HU) is white in the window (40, 400), fat (-100 HU) dark grey
    assert first[20, 25] == 255 and first[20, 2] == np.uint8(round((-100 + 160) / 400 * 255))
    # running again refuses to overwrite, listing the files
    with pytest.raises(KazError, match="P07_a000.bmp"):
        reslice_to_bmp(tmp_path / "ct.nii.gz", out, tmp_path / "m.nii.gz", axis_from_mask_=True, patient="P07")


def test_bad_axis_and_mismatched_mask_write_nothing(scene, tmp_path):
    image, mask, center, a, *_ = scene
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    other = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    sitk.WriteImage(other, str(tmp_path / "small.nii.gz"))
    out = tmp_path / "out"
    with pytest.raises(KazError, match="outside the volume"):
        reslice_to_bmp(tmp_path / "ct.nii.gz", out, axis_point=center + 500, axis_dir=a)
    with pytest.raises(KazError, match="small.nii.gz"):
        reslice_to_bmp(tmp_path / "ct.nii.gz", out, tmp_path / "small.nii.gz", axis_point=center, axis_dir=a)
    with pytest.raises(KazError, match="not all zero"):
        reslice_to_bmp(tmp_path / "ct.nii.gz", out, axis_point=center, axis_dir=[0, 0, 0])
    assert cli_main(["reslice", "--image", str(tmp_path / "ct.nii.gz"), "--axis-from-mask", "-o", str(out)]) == 2
    assert not out.exists()
