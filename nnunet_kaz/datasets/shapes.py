"""Implicit shapes for the synthetic phantoms: signed distances evaluated at arbitrary 3D points.

Every shape is a function of points `p` (array `(..., 3)`, any units) returning an approximate signed
distance in the same units: negative inside, zero on the surface, positive outside. Evaluating shapes
at points (rather than rasterising a volume) lets a radial slice be sampled directly at any resolution.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix drawn from `rng`."""
    return Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()


def ellipsoid_sdf(p: np.ndarray, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray | None = None
                  ) -> np.ndarray:
    """Approximate signed distance to an ellipsoid (exact on the surface and for spheres).

    Uses the first-order bound d ~ k0 (k0 - 1) / k1 with k0 = |q / r|, k1 = |q / r^2| (q: point in the
    ellipsoid's frame), the usual implicit-surface approximation; it is smooth and has the right sign.
    `rotation` maps the ellipsoid's axes to world axes (columns).
    """
    q = p - center
    if rotation is not None:
        q = q @ rotation  # world -> ellipsoid frame (rotation is orthonormal)
    k0 = np.linalg.norm(q / radii, axis=-1)
    k1 = np.linalg.norm(q / radii**2, axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


class SmoothNoise3D:
    """A smooth random field on R^3: a sum of `n` random plane waves (random Fourier features).

    Values lie in [-1, 1] (normalised by the number of waves' amplitude sum); `wavelength` sets the
    typical feature size in the points' units. Seeded through `rng`, identical wherever it is evaluated,
    so every radial slice of a patient sees the same irregular 3D boundary.
    """

    def __init__(self, rng: np.random.Generator, wavelength: float, n: int = 8):
        directions = rng.normal(size=(n, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        freq = 2 * np.pi / wavelength * rng.uniform(0.6, 1.4, size=n)
        self.k = directions * freq[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, size=n)
        amp = rng.uniform(0.5, 1.0, size=n)
        self.amp = amp / amp.sum()

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.cos(p @ self.k.T + self.phase) @ self.amp


def soft_inside(sdf: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] from a signed distance: a logistic ramp of scale `width`."""
    return 1.0 / (1.0 + np.exp(np.clip(sdf / max(width, 1e-9), -50, 50)))


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float, sd: float) -> np.ndarray:
    """Gaussian noise with spatial correlation (CT-like): white noise smoothed by a Gaussian of `sigma_px`
    pixels, rescaled to standard deviation `sd`."""
    white = rng.normal(size=shape)
    if sigma_px > 0:
        white = ndimage.gaussian_filter(white, sigma_px)
    return white * (sd / max(white.std(), 1e-12))


def window_to_uint8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map Hounsfield units to 8-bit with a CT window: [level - width/2, level + width/2] -> [0, 255]."""
    lo = level - width / 2.0
    scaled = (hu - lo) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
