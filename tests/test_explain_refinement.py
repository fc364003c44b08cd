"""ERNet heatmap-guided refinement (paper 001 Algorithm 3): the literal update, the ROI guarantee, JSON."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_kaz.errors import KazError
from nnunet_kaz.explain import HeatmapRefiner, heatmap_feature, pool_roi_features, roi_from_mask


def algorithm3_by_hand(params: dict, X: np.ndarray, Y: np.ndarray, lr: float, iterations: int) -> dict:
    """Algorithm 3 lines 5-16 written with scalar loops over voxels, hidden units and inputs."""
    W, B = [list(r) for r in params["W"]], [r[0] for r in params["B"]]
    w, b = list(params["w"][0]), params["b"][0][0]
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    H = len(B)
    for _ in range(iterations):
        gW, gB, gw, gb = [[0.0, 0.0] for _ in range(H)], [0.0] * H, [0.0] * H, 0.0
        for x, y in zip(X, Y):
            z = [W[j][0] * x[0] + W[j][1] * x[1] + B[j] for j in range(H)]
            hid = [sig(v) for v in z]
            out = sum(w[j] * hid[j] for j in range(H)) + b
            dy = out - y
            for j in range(H):
                dh = w[j] * dy * sig(z[j]) * (1 - sig(z[j]))
                gW[j][0] += dh * x[0]
                gW[j][1] += dh * x[1]
                gB[j] += dh
                gw[j] += dy * hid[j]
            gb += dy
        W = [[W[j][0] - lr * gW[j][0], W[j][1] - lr * gW[j][1]] for j in range(H)]
        w = [w[j] - lr * gw[j] for j in range(H)]
        B = [B[j] - lr * gB[j] for j in range(H)]
        b = b - lr * gb
    return {"W": np.array(W), "B": np.array(B)[:, None], "w": np.array(w)[None], "b": np.array([[b]])}


def test_reproduces_algorithm_3_updates():
    X = np.array([[0.9, 0.8], [0.4, 0.1], [0.6, 0.0], [0.2, 0.7]])
    Y = np.array([1.0, 0.0, 1.0, 0.0])
    r = HeatmapRefiner(iterations=3, learning_rate=0.01, reduction="sum", seed=3).fit(X, Y)
    expected = algorithm3_by_hand(r.initial_parameters(), X, Y, 0.01, 3)
    for k in "WBwb":
        np.testing.assert_allclose(getattr(r, k), expected[k], rtol=1e-12, atol=1e-14)
    # "mean" is the same with the gradients divided by N
    m = HeatmapRefiner(iterations=3, learning_rate=0.04, reduction="mean", seed=3).fit(X, Y)
    np.testing.assert_allclose(m.W, r.W, rtol=1e-12)
    # the output layer is linear: transform = clip(w sigmoid(W x + B) + b, 0, 1)
    hid = 1 / (1 + np.exp(-(r.W @ X.T + r.B)))
    np.testing.assert_allclose(r.transform(X), np.clip((r.w @ hid + r.b)[0], 0, 1))


def algorithm3_numpy(p_map: np.ndarray, h: np.ndarray, y_roi: np.ndarray, seed: int) -> dict:
    """Paper 001 Algorithm 3 transcribed line by line with numpy matrices: Rand = U[0, 1) (numpy's default_rng
    from `seed`, drawn in the order of lines 2-3), learning rate 0.01, 1000 iterations, the RoI's pixels as the
    columns of [Pixel_p^map, h]."""
    rng = np.random.default_rng(seed)
    n_input, n_hidden, n_output = 2, 5, 1                                   # line 1
    W_hat, B_hat = rng.random((n_hidden, n_input)), rng.random((n_hidden, 1))   # line 2
    w_hat, b_hat = rng.random((n_output, n_hidden)), rng.random((n_output, 1))  # line 3
    learning_rate, iterations = 0.01, 1000                                  # line 4
    inp = np.stack([p_map.ravel(), h.ravel()])                             # [Pixel_p^map, h]: (2, N)
    Y = y_roi.ravel()[None].astype(np.float64)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731 (eq. 3)
    losses = []
    for _ in range(iterations):                                            # line 5
        Z = W_hat @ inp + B_hat                                            # line 6
        X = sigmoid(Z)                                                     # line 7
        y_out = w_hat @ X + b_hat                                          # line 8
        losses.append(np.sum((Y - y_out) ** 2) / 2)                        # line 9
        delta_y = y_out - Y                                                # line 10
        delta_hidden = (w_hat.T @ delta_y) * (sigmoid(Z) * (1 - sigmoid(Z)))   # line 11 (eq. 4)
        W_hat = W_hat - learning_rate * delta_hidden @ inp.T               # line 12
        w_hat = w_hat - learning_rate * delta_y @ X.T                      # line 13
        B_hat = B_hat - learning_rate * delta_hidden.sum(1, keepdims=True)  # line 14 (summed over the pixels)
        b_hat = b_hat - learning_rate * delta_y.sum(1, keepdims=True)      # line 15
    return {"W": W_hat, "B": B_hat, "w": w_hat, "b": b_hat, "losses": losses}


def test_the_default_fit_is_algorithm_3():
    """The defaults (5 sigmoid units, lr 0.01 on summed gradients, U[0, 1) init, 1000 iterations) against the
    transcription, on a small RoI of a synthetic slice (a 4 x 6 box around a predicted blob: 24 pixels). Both run
    the same float64 operations except the sigmoid (tanh form against 1 / (1 + exp)), ~1e-16 apart per call; the
    descent contracts here (0.01 x 24 pixels), so the parameters agree far within 1e-9."""
    rng = np.random.default_rng(4)
    prob = rng.random((12, 14))
    pred = np.zeros((12, 14), bool)
    pred[5:7, 4:8] = True
    roi = roi_from_mask(pred, margin=1)
    assert roi == (slice(4, 8), slice(3, 9))
    heat = heatmap_feature(rng.random((12, 14)), pred)
    label = (prob > 0.4) & pred
    X, y = pool_roi_features([(prob, heat, label, roi)])
    assert len(y) == 24
    r = HeatmapRefiner(seed=11)
    assert (r.n_hidden, r.learning_rate, r.iterations, r.reduction) == (5, 0.01, 1000, "sum")
    r.fit(X, y)
    ref = algorithm3_numpy(prob[roi], heat[roi], label[roi], seed=11)
    for k in "WBwb":
        np.testing.assert_allclose(getattr(r, k), ref[k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r.loss_history, ref["losses"], rtol=1e-9)
    assert ref["losses"][-1] < 0.5 * ref["losses"][0]  # the fit does learn on this RoI


def test_summed_gradients_diverge_on_a_large_roi_with_a_clear_error_and_the_mean_variant_fits():
    rng = np.random.default_rng(0)
    p, h = rng.random(4000), rng.random(4000)
    y = ((p + h) > 1.0).astype(float)  # foreground needs probability and heatmap together
    with pytest.raises(KazError, match=r"summed over 4000 voxels.*diverged.*mean gradients") as err:
        HeatmapRefiner().fit(np.stack([p, h], 1), y)  # Algorithm 3: a step of 0.01 x 4000 x the mean gradient
    assert err.value.option == "reduction"
    r = HeatmapRefiner(reduction="mean").fit(np.stack([p, h], 1), y)  # the named variant: lr 0.5, mean
    assert r.learning_rate == 0.5
    assert r.loss_history[-1] < 0.5 * r.loss_history[0]
    q = r.transform(np.stack([p, h], 1))
    assert q[y == 1].mean() - q[y == 0].mean() > 0.5


def test_refine_never_changes_voxels_outside_the_roi():
    rng = np.random.default_rng(1)
    prob = rng.random((20, 30)).astype(np.float32)
    pred = np.zeros((20, 30), dtype=bool)
    pred[8:11, 10:14] = True
    roi = roi_from_mask(pred, margin=2)
    assert roi == (slice(6, 13), slice(8, 16))
    heat = heatmap_feature(rng.random((20, 30)), pred)
    r = HeatmapRefiner(iterations=5, seed=0)
    r.fit(*pool_roi_features([(prob, heat, pred, roi)]))
    out = r.refine(prob, heat, roi)
    outside = np.ones(prob.shape, dtype=bool)
    outside[roi] = False
    assert out.dtype == prob.dtype and np.array_equal(out[outside], prob[outside])
    assert not np.array_equal(out[roi], prob[roi])
    assert np.array_equal(r.refine(prob, heat, roi_from_mask(np.zeros_like(pred))), prob)  # no ROI: unchanged


def test_roi_and_heatmap_feature_definitions():
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[0, 5, 3] = mask[2, 4, 6] = True
    assert roi_from_mask(mask, margin=(1, 0, 2)) == (slice(0, 4), slice(4, 6), slice(1, 7))
    assert roi_from_mask(np.zeros((4, 4))) is None
    with pytest.raises(KazError, match="margin"):
        roi_from_mask(mask, margin=(1, 2))
    h = heatmap_feature(np.array([[0.0, 2.0], [4.0, -1.0]]), np.array([[1, 1], [0, 1]]))
    np.testing.assert_allclose(h, [[0.0, 1.0], [0.0, 0.0]])  # eq. 2 mask, ReLU, scaled by the maximum
    assert not heatmap_feature(np.zeros((3, 3))).any()


def test_json_round_trip_and_bad_files(tmp_path):
    X = np.random.default_rng(2).random((50, 2))
    r = HeatmapRefiner(iterations=10).fit(X, X[:, 0] > 0.5)
    path = tmp_path / "refiner.json"
    r.save(path)
    back = HeatmapRefiner.load(path)
    np.testing.assert_array_equal(back.transform(X), r.transform(X))
    assert back.iterations == 10 and back.reduction == "sum" and back.learning_rate == 0.01
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(KazError, match="bad.json"):
        HeatmapRefiner.load(tmp_path / "bad.json")
    with pytest.raises(KazError, match="not fitted"):
        HeatmapRefiner().transform(X)
    with pytest.raises(KazError, match=r"\(N, 2\)"):
        r.transform(np.ones((3, 3)))
    with pytest.raises(KazError, match="no case has a region"):
        pool_roi_features([(X, X, X, None)])
