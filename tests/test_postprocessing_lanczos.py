"""Lanczos-4 resize against the installed OpenCV's INTER_LANCZOS4 (the test extra installs
opencv-python-headless) and interpolation properties."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from nnunet_kaz.postprocessing import resize_lanczos4, resize_probabilities

def opencv_lanczos4(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The reference: the installed OpenCV's INTER_LANCZOS4 on a 2D float32 array, size = (rows, columns)."""
    return cv2.resize(np.ascontiguousarray(a, dtype=np.float32), (size[1], size[0]), interpolation=cv2.INTER_LANCZOS4)


@pytest.mark.parametrize("shape,size", [((4, 5), (7, 9)),        # up, both axes, non-integer factors
                                        ((1, 8), (1, 3)),        # one row, shrinking (no anti-aliasing)
                                        ((16, 16), (51, 79)),    # up, the KAZ export's kind of factor
                                        ((40, 33), (17, 70)),    # down along one axis, up along the other
                                        ((9, 9), (9, 9))])       # same size: the identity
def test_matches_the_installed_opencv_lanczos4(shape, size):
    rng = np.random.default_rng(sum(shape) + sum(size))
    a = rng.random(shape).astype(np.float32)
    a[:, : shape[1] // 2] += 1.0  # an edge, where the ringing shows
    ref = opencv_lanczos4(a, size)
    assert ref.shape == size
    np.testing.assert_allclose(resize_lanczos4(a, size), ref, atol=1e-5)
    if size != shape and max(shape) > 1:
        bilinear = cv2.resize(a, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        assert np.abs(bilinear - ref).max() > 1e-3  # the reference is Lanczos, not a filter any resize matches


def test_matches_opencv_on_label_probabilities_and_the_last_two_axes():
    rng = np.random.default_rng(7)
    p = rng.dirichlet([0.5, 0.5], size=(2, 12, 10)).transpose(3, 0, 1, 2).astype(np.float32)  # (2, 2, 12, 10)
    out = resize_lanczos4(p, (31, 23))
    assert out.shape == (2, 2, 31, 23)
    for c in range(2):
        for z in range(2):
            np.testing.assert_allclose(out[c, z], opencv_lanczos4(p[c, z], (31, 23)), atol=1e-5)


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
