"""Lanczos-4 resize against OpenCV's INTER_LANCZOS4 reference values and interpolation properties."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_kaz.postprocessing import resize_lanczos4, resize_probabilities

# cv2.resize(A, (9, 7), interpolation=cv2.INTER_LANCZOS4) with opencv-python-headless 5.0.0, where
# A[i, j] = ((7 i + 3 j) mod 5) / 4 (float32, 4 x 5); OpenCV is not a dependency, so its output is stored here.
CV2_4x5_TO_7x9 = np.array([
    [-0.152011, 0.339270, 0.834669, 0.517676, 0.163964, 0.669830, 1.129774, 0.738288, 0.296110],
    [0.051992, 0.212544, 0.440277, 0.518627, 0.505221, 0.577571, 0.695043, 0.746235, 0.757842],
    [0.519273, 0.225731, -0.004649, 0.384243, 0.763778, 0.482964, 0.269416, 0.707577, 1.123038],
    [0.990913, 0.633030, 0.153934, 0.112958, 0.375000, 0.495648, 0.505479, 0.582006, 0.637391],
    [0.986241, 0.926714, 0.653102, 0.152367, -0.013778, 0.432329, 0.756877, 0.475294, 0.146256],
    [0.462086, 0.703412, 0.917097, 0.664687, 0.244779, 0.179524, 0.363169, 0.475892, 0.500031],
    [0.064509, 0.433191, 0.952861, 1.058042, 0.586036, -0.008725, -0.052193, 0.507657, 0.954832]])
# cv2.resize(B, (3, 1), INTER_LANCZOS4), B = linspace(0, 1, 8) ** 2 as one row (shrinking: no anti-aliasing)
CV2_ROW8_TO_3 = np.array([0.013625, 0.250000, 0.786591])


def test_matches_opencv_lanczos4_reference():
    i, j = np.mgrid[0:4, 0:5]
    a = (((7 * i + 3 * j) % 5) / 4).astype(np.float32)
    np.testing.assert_allclose(resize_lanczos4(a, (7, 9)), CV2_4x5_TO_7x9, atol=2e-6)
    row = (np.linspace(0, 1, 8, dtype=np.float32) ** 2)[None]
    np.testing.assert_allclose(resize_lanczos4(row, (1, 3))[0], CV2_ROW8_TO_3, atol=2e-6)


def test_interpolates_samples_and_band_limited_signals():
    rng = np.random.default_rng(0)
    a = rng.random((6, 7))
    up = resize_lanczos4(a, (18, 21))  # factor 3: output 3i+1 sits exactly on input sample i
    np.testing.assert_allclose(up[1::3, 1::3], a, atol=1e-6)
    np.testing.assert_allclose(resize_lanczos4(np.full((5, 8), 0.3), (13, 11)), 0.3, atol=1e-6)
    # a slow sinusoid is reproduced far better than by linear interpolation
    n, m = 40, 97
    x_in = np.arange(n)
    x_out = (np.arange(m) + 0.5) * n / m - 0.5
    f = np.sin(2 * np.pi * x_in / 9.0)[None]
    truth = np.sin(2 * np.pi * x_out / 9.0)
    inner = slice(10, -10)  # away from the clamped borders
    err_l4 = np.abs(resize_lanczos4(f, (1, m))[0] - truth)[inner].max()
    err_lin = np.abs(np.interp(x_out, x_in, f[0]) - truth)[inner].max()
    assert err_l4 < err_lin / 5


def test_probability_resize_stays_a_distribution_and_resizes_last_axes():
    rng = np.random.default_rng(1)
    p = rng.dirichlet([0.3, 0.3, 0.3], size=(1, 16, 16)).transpose(3, 0, 1, 2).astype(np.float32)  # (3, 1, 16, 16)
    out = resize_probabilities(p, (51, 79))
    assert out.shape == (3, 1, 51, 79)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    raw = resize_lanczos4(p, (51, 79))
    assert raw.min() < 0 or raw.max() > 1  # Lanczos rings: the clipping is needed


def test_rejects_impossible_sizes():
    from nnunet_kaz.errors import KazError
    with pytest.raises(KazError):
        resize_lanczos4(np.zeros((4, 4)), (0, 3))
