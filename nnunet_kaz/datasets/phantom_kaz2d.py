"""Synthetic kidney-ablation-zone (KAZ) phantoms: radial CT slices with an ambiguous-boundary target.

Each patient is one 3D scene in millimetres (perirenal fat, a psoas-like muscle, a kidney with cortex and
medulla, a hypodense ablation zone with an irregular, blurred rim, sometimes a round homogeneous cyst that
may be larger than the zone). The scene is sampled on `slices_per_patient` planes that all contain one
axis (the image's vertical axis, through the zone's centre), at angles k * 180 / slices_per_patient degrees
(every 15 degrees for 12 slices), as in paper 000 section 3.1 (radial reslicing of CT). So a patient's slices
show the same zone from rotated viewpoints, like the KAZ data.

Intensities are Hounsfield units with CT-like correlated noise, windowed to 8 bit (level 40, width 400).
The label is an annotator's rough version of the true zone (a per-patient dilation or erosion, a smooth
per-slice boundary jitter, and a polygon drawn through the result); the true zone is returned as well so
uncertainty maps can be checked against the boundary the annotation only approximates.

Geometry: the shorter image side spans `FOV_MM` millimetres, pixels are square; row index grows towards
the patient's feet along the axis, column index along the in-plane radial direction (negative to the left
of the axis). Patients are seeded independently: patient k of seed s is the same whatever `n_patients` is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw, measure

from nnunet_kaz.datasets.raw import check_writable, dataset_json, parse_dataset_folder
from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_dir, write_json_atomic
from nnunet_kaz.datasets.shapes import (SmoothNoise3D, correlated_noise, ellipsoid_sdf, random_rotation,
                                        soft_inside, window_to_uint8)

FOV_MM = 120.0
WINDOW_LEVEL, WINDOW_WIDTH = 40.0, 400.0
RENDER_MAX = 256  # see _render
PV_MM = 0.4  # partial-volume ramp of sharp organ boundaries (logistic scale, mm)


@dataclass
class Kaz2DSlice:
    """One radial slice: `image` uint8 (windowed CT), `hu` float32, `label` (annotation) and `truth` (true
    zone) uint8 in {0, 1}; all of shape (H, W)."""
    case: str
    patient: str
    angle: float
    image: np.ndarray
    hu: np.ndarray
    label: np.ndarray
    truth: np.ndarray


def case_name(patient: str, angle: float, prefix: str = "KAZ") -> str:
    """Case identifier `KAZ_P003_a045`: patient id and the slice angle in whole degrees."""
    return f"{prefix}_{patient}_a{int(round(angle)):03d}"


def patient_id(index: int) -> str:
    """Patient id of the zero-based patient index: P001 for index 0."""
    return f"P{index + 1:03d}"


def slice_angles(slices_per_patient: int) -> list[float]:
    """Angles (degrees) of the radial planes: k * 180 / n, k = 0..n-1 (every 15 degrees for n = 12)."""
    return [k * 180.0 / slices_per_patient for k in range(slices_per_patient)]


class _Scene:
    """The 3D scene of one patient, evaluated at points in mm (axis = z through the origin)."""

    def __init__(self, rng: np.random.Generator):
        # ablation zone: irregular ellipsoid near the origin, typical ablations are 25-40 mm across
        self.zone_c = np.array([rng.normal(0, 2.0), rng.normal(0, 2.0), rng.normal(0, 4.0)])
        self.zone_r = rng.uniform(12.0, 19.0, size=3)
        self.zone_rot = random_rotation(rng)
        self.zone_noise = SmoothNoise3D(rng, wavelength=rng.uniform(16.0, 26.0))
        self.zone_irregularity = rng.uniform(1.5, 3.5)  # mm
        self.zone_rim = rng.uniform(1.2, 2.5)  # blurred rim: logistic scale in mm
        self.zone_hu = rng.uniform(10.0, 20.0)
        self.zone_texture = SmoothNoise3D(rng, wavelength=8.0)
        # kidney (about 110 x 60 x 45 mm) placed so that the zone sits in its periphery
        self.kid_r = np.array([55.0, 30.0, 23.0]) * rng.uniform(0.9, 1.1, size=3)
        self.kid_rot = random_rotation(rng)
        n = rng.normal(size=3)
        n[2] *= 0.5
        n /= np.linalg.norm(n)
        self.kid_c = self.zone_c - n * rng.uniform(0.45, 0.85) * self._kidney_radius_along(n)
        self.cortex_hu = rng.uniform(36.0, 42.0)
        self.medulla_hu = self.cortex_hu - rng.uniform(6.0, 10.0)
        # psoas-like muscle: a long ellipsoid beside the kidney
        m_dir = rng.normal(size=3)
        m_dir[2] = 0
        m_dir /= np.linalg.norm(m_dir)
        self.mus_c = self.kid_c + m_dir * rng.uniform(55.0, 70.0)
        self.mus_r = np.array([22.0, 22.0, 120.0]) * rng.uniform(0.8, 1.2, size=3)
        self.mus_hu = rng.uniform(45.0, 55.0)
        self.fat_hu = rng.uniform(-110.0, -90.0)
        self.fat_texture = SmoothNoise3D(rng, wavelength=30.0)
        # cyst in about 40% of patients: round, homogeneous, sharp-edged, sometimes larger than the zone
        self.cyst_c: np.ndarray | None = None
        if rng.random() < 0.4:
            cyst_r = rng.uniform(8.0, 26.0)
            for _ in range(30):
                d = rng.normal(size=3)
                d /= np.linalg.norm(d)
                c = self.kid_c + d * self._kidney_radius_along(d) * rng.uniform(0.5, 1.0)
                if np.linalg.norm(c - self.zone_c) > self.zone_r.max() + self.zone_irregularity + cyst_r + 2.0:
                    self.cyst_c, self.cyst_r = c, cyst_r
                    break
            self.cyst_hu = rng.uniform(0.0, 15.0)
        self.noise_sd = rng.uniform(6.0, 10.0)

    def _kidney_radius_along(self, direction: np.ndarray) -> float:
        q = direction @ self.kid_rot
        return float(1.0 / np.linalg.norm(q / self.kid_r))

    def zone_sdf(self, p: np.ndarray) -> np.ndarray:
        return ellipsoid_sdf(p, self.zone_c, self.zone_r, self.zone_rot) + self.zone_irregularity * self.zone_noise(p)

    def hounsfield(self, p: np.ndarray) -> np.ndarray:
        """Noise-free HU at points `p`, painted back to front with partial-volume ramps."""
        def paint(hu, sdf, value, width=PV_MM):
            a = soft_inside(sdf, width)
            return hu * (1 - a) + value * a

        hu = self.fat_hu + 8.0 * self.fat_texture(p)
        hu = paint(hu, ellipsoid_sdf(p, self.mus_c, self.mus_r), self.mus_hu)
        hu = paint(hu, ellipsoid_sdf(p, self.kid_c, self.kid_r, self.kid_rot), self.cortex_hu)
        hu = paint(hu, ellipsoid_sdf(p, self.kid_c, 0.62 * self.kid_r, self.kid_rot), self.medulla_hu, 2.0)
        if self.cyst_c is not None:
            hu = paint(hu, np.linalg.norm(p - self.cyst_c, axis=-1) - self.cyst_r, self.cyst_hu)
        zone_value = self.zone_hu + 4.0 * self.zone_texture(p)
        return paint(hu, self.zone_sdf(p), zone_value, self.zone_rim)


def _plane_points(angle_deg: float, shape: tuple[int, int], pixel_mm: float) -> np.ndarray:
    """3D points (mm) of the pixel centres of the radial plane at `angle_deg` (contains the z axis)."""
    h, w = shape
    z = -(np.arange(h) - (h - 1) / 2.0) * pixel_mm
    r = (np.arange(w) - (w - 1) / 2.0) * pixel_mm
    t = np.deg2rad(angle_deg)
    zz, rr = np.meshgrid(z, r, indexing="ij")
    return np.stack([rr * np.cos(t), rr * np.sin(t), zz], axis=-1)


def _render(scene: _Scene, angle: float, shape: tuple[int, int], pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU and the zone's signed distance on the plane at `angle`.

    Large slices (KAZ originals are 510 x 788) are evaluated on a grid of at most RENDER_MAX pixels per
    side and interpolated linearly: the scene is smooth at that scale and this is ~4x faster.
    """
    h, w = shape
    factor = min(1.0, RENDER_MAX / min(h, w))
    if factor == 1.0:
        pts = _plane_points(angle, shape, pixel_mm)
        return scene.hounsfield(pts), scene.zone_sdf(pts)
    small = (max(2, int(round(h * factor))), max(2, int(round(w * factor))))
    # same field of view: pixel centres of the small grid span the same extent as the full one
    pts = _plane_points(angle, small, pixel_mm * (min(h, w) - 1) / (min(small) - 1))
    zoom = (h / small[0], w / small[1])
    up = [ndimage.zoom(a, zoom, order=1, grid_mode=False)[:h, :w] for a in (scene.hounsfield(pts), scene.zone_sdf(pts))]
    return up[0], up[1]


def _annotate(truth: np.ndarray, rng: np.random.Generator, bias_mm: float, pixel_mm: float) -> np.ndarray:
    """An annotator's rough outline of `truth`: shift its boundary by `bias_mm` (+ dilates, - erodes) plus a
    smooth random jitter, then draw a polygon through the outline (vertices about 1.5 mm off the curve)."""
    if not truth.any():
        return truth.copy()
    sd = ndimage.distance_transform_edt(truth == 0) - ndimage.distance_transform_edt(truth)
    jitter = correlated_noise(rng, truth.shape, sigma_px=6.0 / pixel_mm, sd=1.0 / pixel_mm)
    rough = sd < bias_mm / pixel_mm + jitter
    labelled, n = ndimage.label(rough)
    if n == 0:
        return truth.copy()
    sizes = ndimage.sum(rough, labelled, range(1, n + 1))
    rough = ndimage.binary_fill_holes(labelled == (1 + int(np.argmax(sizes))))
    padded = np.pad(rough, 1).astype(float)
    contour = max(measure.find_contours(padded, 0.5), key=len) - 1.0
    poly = measure.approximate_polygon(contour, tolerance=max(0.5, 1.5 / pixel_mm))
    ann = draw.polygon2mask(truth.shape, poly)
    return (ann if ann.any() else rough).astype(np.uint8)


def kaz2d_patient(seed: int, index: int, image_size: tuple[int, int] = (128, 128),
                  slices_per_patient: int = 12, prefix: str = "KAZ") -> list[Kaz2DSlice]:
    """All radial slices of patient `index` (zero-based) for `seed`; deterministic and independent of
    how many other patients are drawn."""
    h, w = (int(s) for s in image_size)
    if h < 16 or w < 16 or slices_per_patient < 1:
        raise ValueError("image_size must be at least 16x16 and slices_per_patient at least 1")
    rng = np.random.default_rng([int(seed), int(index)])
    scene = _Scene(rng)
    bias_mm = rng.uniform(-2.0, 3.0)  # this patient's annotator tends to over- or under-segment
    pixel_mm = FOV_MM / min(h, w)
    pid = patient_id(index)
    out = []
    for k, angle in enumerate(slice_angles(slices_per_patient)):
        srng = np.random.default_rng([int(seed), int(index), k + 1])
        hu, zone_sdf = _render(scene, angle, (h, w), pixel_mm)
        hu = hu + correlated_noise(srng, hu.shape, sigma_px=0.7 / pixel_mm, sd=scene.noise_sd)
        truth = (zone_sdf < 0).astype(np.uint8)
        label = _annotate(truth, srng, bias_mm, pixel_mm)
        out.append(Kaz2DSlice(case_name(pid, angle, prefix), pid, angle,
                              window_to_uint8(hu, WINDOW_LEVEL, WINDOW_WIDTH), hu.astype(np.float32), label, truth))
    return out


def make_kaz2d_dataset(dataset_dir: str | Path, n_patients: int, seed: int, image_size: tuple[int, int] = (128, 128),
                       slices_per_patient: int = 12, n_test_patients: int = 0, overwrite: bool = False) -> Path:
    """Write a KAZ phantom as an nnU-Net v2 raw 2D dataset and return its folder.

    Layout: `imagesTr/{case}_0000.png` (uint8, windowed CT), `labelsTr/{case}.png` (annotation, 0/1),
    `truthTr/{case}.png` (true zone, 0/1), `raterDisagreementTr/{case}.png` (1 where annotation and true zone
    differ: the two "raters" of the pairwise disagreement map `evaluate --raters` reads, as convert-kits23
    writes for KiTS23); the last `n_test_patients` patients go to `imagesTs/`, `labelsTs/`, `truthTs/`,
    `raterDisagreementTs/` instead. nnU-Net reads only imagesTr/labelsTr (and imagesTs for prediction).

    The channel is named "zscore" on purpose: the PNGs are already windowed to 8 bit, so nnU-Net's
    CTNormalization (clipping to the 0.5-99.5 percentiles of *foreground* intensities, i.e. of the
    ablation zone only) would clip away the contrast of kidney, fat and cysts; per-image z-scoring keeps
    all of it, as for the real KAZ BMPs.

    `dataset_dir` must be named `DatasetXXX_Name`; an existing non-empty folder is replaced only with
    `overwrite=True`. Everything is written in a temporary sibling folder that is renamed at the end.
    """
    dataset_dir = Path(dataset_dir)
    _, name = parse_dataset_folder(dataset_dir)
    if n_patients < 1 or not 0 <= n_test_patients < n_patients:
        raise KazError(f"need n_patients >= 1 and 0 <= n_test_patients < n_patients "
                       f"(got {n_patients}, {n_test_patients})")
    check_writable(dataset_dir, overwrite)
    n_train = n_patients - n_test_patients
    with atomic_dir(dataset_dir) as tmp:
        for part in ("Tr", "Ts") if n_test_patients else ("Tr",):
            for kind in ("images", "labels", "truth", "raterDisagreement"):
                (tmp / f"{kind}{part}").mkdir()
        for index in range(n_patients):
            part = "Tr" if index < n_train else "Ts"
            for s in kaz2d_patient(seed, index, image_size, slices_per_patient):
                Image.fromarray(s.image).save(tmp / f"images{part}" / f"{s.case}_0000.png")
                Image.fromarray(s.label).save(tmp / f"labels{part}" / f"{s.case}.png")
                Image.fromarray(s.truth).save(tmp / f"truth{part}" / f"{s.case}.png")
                Image.fromarray((s.label != s.truth).astype(np.uint8)).save(
                    tmp / f"raterDisagreement{part}" / f"{s.case}.png")
        meta = {"generator": "nnunet_kaz.datasets.make_kaz2d_dataset", "seed": int(seed),
                "n_patients": int(n_patients), "n_test_patients": int(n_test_patients),
                "image_size": [int(v) for v in image_size], "slices_per_patient": int(slices_per_patient),
                "fov_mm": FOV_MM, "window": {"level": WINDOW_LEVEL, "width": WINDOW_WIDTH}}
        write_json_atomic(dataset_json({"0": "zscore"}, {"background": 0, "ablation_zone": 1},
                                       n_train * slices_per_patient, ".png", name,
                                       "Synthetic KAZ phantom: radial CT slices, annotated ablation zone "
                                       "(labels*) and true zone (truth*)", numTest=n_test_patients * slices_per_patient,
                                       phantom=meta), tmp / "dataset.json")
    return dataset_dir


def write_kaz2d_bmp_folders(out_dir: str | Path, n_patients: int, seed: int, image_size: tuple[int, int] = (510, 788),
                            slices_per_patient: int = 12, overwrite: bool = False) -> Path:
    """Write the KAZ phantom the way KAZ data arrive: `images/P001_a045.bmp` (8-bit grayscale),
    `masks/P001_a045.bmp` (annotation, 0/255) and `truth/P001_a045.bmp` (true zone, 0/255).

    The default size 510 x 788 (H x W) is the KAZ originals' (paper 000 section 3.1); `convert-kaz` with its
    default pattern reads these folders, so demos take the same path as users' data. Written through a
    temporary folder; an existing non-empty `out_dir` is replaced only with `overwrite=True`.
    """
    out_dir = Path(out_dir)
    if n_patients < 1:
        raise KazError(f"need n_patients >= 1 (got {n_patients})")
    check_writable(out_dir, overwrite)
    with atomic_dir(out_dir) as tmp:
        for sub in ("images", "masks", "truth"):
            (tmp / sub).mkdir()
        for index in range(n_patients):
            for s in kaz2d_patient(seed, index, image_size, slices_per_patient):
                stem = s.case.split("_", 1)[1]  # P001_a045
                Image.fromarray(s.image).save(tmp / "images" / f"{stem}.bmp")
                Image.fromarray(s.label * np.uint8(255)).save(tmp / "masks" / f"{stem}.bmp")
                Image.fromarray(s.truth * np.uint8(255)).save(tmp / "truth" / f"{stem}.bmp")
    return out_dir
