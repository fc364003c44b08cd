"""Calibrators: over-confident phantom model, JSON round trip, sums to 1, pooling, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import softmax

from nnunet_kaz.errors import KazError
from nnunet_kaz.postprocessing import (CALIBRATORS, VoxelPool, apply_calibration, classes_from_labels,
                                       labels_to_channels, load_calibrator, make_calibrator, pool_cases,
                                       save_calibrator, top_label_ece)

K_OVERCONFIDENT = 3.0


def phantom_case(rng: np.random.Generator, n_classes: int = 2, shape=(40, 40), k: float = K_OVERCONFIDENT,
                 background_bias: float = 1.0):
    """Smooth true class probabilities p; labels drawn from p (so p is calibrated); the model reports
    softmax(k * log p), i.e. sigmoid(k * logit p) for two classes: over-confident for k > 1."""
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 4) for _ in range(n_classes)])
    logits = logits / logits.std() * 2.0
    logits[0] += background_bias
    p_true = softmax(logits, axis=0)
    labels = (rng.random(shape)[None] > np.cumsum(p_true, axis=0)).sum(axis=0)
    return softmax(k * np.log(p_true), axis=0).astype(np.float32), labels


def split(n_classes: int, seed: int = 0, n: int = 6, **kw):
    rng = np.random.default_rng(seed)
    return [phantom_case(rng, n_classes, **kw) for _ in range(n)], [phantom_case(rng, n_classes, **kw) for _ in range(n)]


def flat(cases, calibrator=None):
    c = cases[0][0].shape[0]
    probs = [apply_calibration(p, calibrator) if calibrator else p for p, _ in cases]
    return np.concatenate([p.reshape(c, -1).T for p in probs]), np.concatenate([l.ravel() for _, l in cases])


def fit(method, cases, cap=3000, seed=0):
    return make_calibrator(method).fit_cases(((p, l, None) for p, l in cases), cap_per_class=cap, seed=seed)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_calibration_lowers_test_ece_of_an_overconfident_model(n_classes):
    val, test = split(n_classes)
    X, y = flat(test)
    before = top_label_ece(X, y)
    assert before > 0.05  # the simulated model is clearly over-confident
    for method in ("logistic", "platt", "temperature", "isotonic"):
        cal = fit(method, val)
        after = top_label_ece(*flat(test, cal))
        print(f"{n_classes} classes, {method}: test ECE {before:.4f} -> {after:.4f}")
        # paper 000's regression on p is linear in p, so it cannot undo an over-confidence on the logit
        # scale as exactly as Platt / temperature (exact for this model) or isotonic
        assert after < before / (2 if method == "logistic" else 3), method
    # the fitted parameters undo the over-confidence: T ~ k, Platt slope ~ 1 / k
    assert fit("temperature", val).temperature_ == pytest.approx(K_OVERCONFIDENT, rel=0.15)
    assert fit("platt", val).slopes_[1] == pytest.approx(1 / K_OVERCONFIDENT, rel=0.15)


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
@pytest.mark.parametrize("n_classes", [2, 4])
def test_json_round_trip_gives_identical_outputs_in_range_summing_to_one(tmp_path, method, n_classes):
    val, test = split(n_classes, seed=3, n=3)
    labels = {"background": 0, **{f"c{i}": i for i in range(1, n_classes)}}
    cal = make_calibrator(method, classes_from_labels(labels)).fit_cases(
        ((p, l, None) for p, l in val), cap_per_class=2000, seed=1)
    cal.save(tmp_path / "calib.json")
    back = load_calibrator(tmp_path / "calib.json", labels=labels)
    d = json.loads((tmp_path / "calib.json").read_text())
    assert d["method"] == method and d["classes"][1] == {"name": "c1", "label": 1}
    assert d["fit_set"]["seed"] == 1 and d["fit_set"]["n_cases"] == 3 and "nnunet_kaz_version" in d
    assert len(d["fit_set"]["n_voxels_per_class"]) == n_classes
    for p, _ in test:
        a, b = apply_calibration(p, cal), apply_calibration(p, back)
        np.testing.assert_array_equal(a, b)
        assert a.shape == p.shape and a.dtype == np.float32
        assert a.min() >= 0 and a.max() <= 1
        np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-5)


def test_pool_is_a_seeded_stratified_uniform_sample_with_importance_weights():
    rng = np.random.default_rng(0)
    labels = [(rng.random((30, 30)) < 0.1).astype(int) for _ in range(5)]
    fg = [0.5 * (l + rng.random(l.shape)) for l in labels]  # p_fg in [0.5, 1) on foreground, [0, 0.5) elsewhere
    probs = [np.stack([1 - f, f]).astype(np.float32) for f in fg]

    def pooled(cap, seed):
        return pool_cases(((p, l, None) for p, l in zip(probs, labels)), cap, seed)

    pool = pooled(50, 0)
    n_fg = sum(int(l.sum()) for l in labels)
    assert pool.n_seen.tolist() == [5 * 900 - n_fg, n_fg]
    assert pool.n_kept.tolist() == [50, 50]
    X, y, w = pool.sample()
    assert (X[y == 1, 1] >= 0.5).all() and (X[y == 0, 1] < 0.5).all()  # kept voxels belong to their class
    assert w[y == 0].sum() == pytest.approx(pool.n_seen[0]) and w[y == 1].sum() == pytest.approx(n_fg)
    np.testing.assert_array_equal(pooled(50, 0).sample()[0], X)  # seeded
    assert not np.array_equal(pooled(50, 1).sample()[0], X)
    # uniform over the whole stream: the later cases are not favoured (mean case index ~ 2 for 5 cases)
    tags = [np.stack([np.full((30, 30), i / 10, np.float32), np.full((30, 30), 1 - i / 10, np.float32)])
            for i in range(5)]
    zeros = np.zeros((30, 30), int)
    mean_idx = [10 * pool_cases(((t, zeros, None) for t in tags), 400, s).sample()[0][:, 0].mean() for s in range(5)]
    assert np.mean(mean_idx) == pytest.approx(2.0, abs=0.1)
    # ignore masks drop voxels
    ign = VoxelPool(2, 10, 0)
    ign.add(probs[0], labels[0], ignore=np.ones((30, 30), bool))
    assert ign.n_seen.tolist() == [0, 0]


def test_pool_streams_large_cases_in_chunks_without_bias(monkeypatch):
    from nnunet_kaz.postprocessing import pooling
    monkeypatch.setattr(pooling, "CHUNK", 97)
    # one case whose voxel values encode their position: the sample must be spread evenly over the chunks
    pos = np.linspace(0, 1, 5000, dtype=np.float32).reshape(50, 100)
    probs = np.stack([pos, 1 - pos])
    means = [pool_cases([(probs, np.zeros((50, 100), int), None)], 300, s).sample()[0][:, 0].mean() for s in range(6)]
    assert np.mean(means) == pytest.approx(0.5, abs=0.03)
    pool = pool_cases([(probs, np.zeros((50, 100), int), None)], 300, 0)
    assert pool.n_seen.tolist() == [5000, 0] and pool.n_kept.tolist() == [300, 0]


def test_importance_weights_keep_the_prior_under_strong_imbalance():
    val, test = split(2, seed=5, n=6, background_bias=3.0)  # ~20 % foreground
    X, y, w = pool_cases(((p, l, None) for p, l in val), 2000, 0).sample()
    weighted = make_calibrator("logistic").fit(X, y, w)
    unweighted = make_calibrator("logistic").fit(X, y)
    e_w, e_u = top_label_ece(*flat(test, weighted)), top_label_ece(*flat(test, unweighted))
    assert e_w < e_u


def test_bad_inputs_raise_clear_errors_and_write_nothing(tmp_path):
    val, _ = split(2, n=2)
    cal = fit("logistic", val)
    p = val[0][0]
    nan = p.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(KazError, match="NaN"):
        apply_calibration(nan, cal)
    with pytest.raises(KazError, match=r"\[0, 1\]"):
        apply_calibration(p * 2 - 0.5, cal)
    with pytest.raises(KazError, match="sum to 1"):
        apply_calibration(np.full_like(p, 0.9), cal)
    with pytest.raises(KazError, match="2 classes"):
        apply_calibration(np.full((3, 4, 4), 1 / 3, np.float32), cal)
    with pytest.raises(KazError, match="NaN"):
        make_calibrator("temperature").fit_cases([(nan, val[0][1], None)])
    # calibration for another label set
    save_calibrator(cal, tmp_path / "c.json")
    with pytest.raises(KazError, match="another|fitted for the label set"):
        load_calibrator(tmp_path / "c.json", labels={"background": 0, "kaz": 1, "cyst": 2})
    with pytest.raises(KazError, match="fitted for the label set"):
        load_calibrator(tmp_path / "c.json", labels={"background": 0, "tumour": 1})
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(KazError, match="not a calibration file"):
        load_calibrator(tmp_path / "junk.json")
    with pytest.raises(KazError, match=r"label values \[7\]"):
        labels_to_channels(np.array([0, 1, 7]), classes_from_labels({"background": 0, "kaz": 1}))
    with pytest.raises(KazError, match="region"):
        classes_from_labels({"background": 0, "kidney": [1, 2]})
    with pytest.raises(KazError, match="unknown calibration method"):
        make_calibrator("beta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "junk.json"]


def test_a_class_missing_from_the_fit_set_keeps_the_identity():
    rng = np.random.default_rng(0)
    p, lab = phantom_case(rng, 3)
    lab[lab == 2] = 0  # class 2 never occurs
    cal = make_calibrator("platt").fit_cases([(p, lab, None)], cap_per_class=2000)
    assert cal.slopes_[2] == 1.0 and cal.intercepts_[2] == 0.0
    assert any("one outcome" in n for n in cal.notes_)
    np.testing.assert_allclose(apply_calibration(p, cal).sum(axis=0), 1.0, atol=1e-5)
    cal = make_calibrator("logistic").fit_cases([(p, lab, None)], cap_per_class=2000)
    assert cal.fitted_ == [True, True, False] and any("one outcome" in n for n in cal.notes_)
    X = p.reshape(3, -1).T.astype(np.float64)
    q = cal._transform(X)
    np.testing.assert_allclose(q[:, 2], X[:, 2])  # the identity, before renormalisation


def test_logistic_is_the_authors_liblinear_regression_on_p():
    """Paper 000 / AUTHORS_CODE.md: sklearn LogisticRegression(solver='liblinear'), C = 1, on the raw p."""
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    val, test = split(2, seed=4, n=3)
    X, y = flat(val)
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(y))
    cal = make_calibrator("logistic").fit(X, y, w)
    ref = LogisticRegression(solver="liblinear", C=1.0).fit(X[:, [1]].astype(np.float64), y == 1, sample_weight=w)
    Xt, _ = flat(test)
    expected = expit(ref.coef_[0, 0] * Xt[:, 1].astype(np.float64) + ref.intercept_[0])
    q = cal.transform(Xt)
    np.testing.assert_allclose(q[:, 1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q[:, 0], 1 - q[:, 1], atol=1e-6)
    np.testing.assert_allclose(q[:, 1], ref.predict_proba(Xt[:, [1]].astype(np.float64))[:, 1], atol=1e-6)
    # and it is not Platt on logit p
    platt = make_calibrator("platt").fit(X, y, w).transform(Xt)
    assert np.abs(platt[:, 1] - q[:, 1]).max() > 1e-2


def test_a_calibration_file_of_the_older_logistic_on_logit_p_is_read_as_platt(tmp_path):
    val, test = split(2, seed=6, n=2)
    platt = fit("platt", val)
    d = platt.to_dict()
    d["method"] = "logistic"  # what older versions wrote for Platt on logit p
    (tmp_path / "old.json").write_text(json.dumps(d))
    back = load_calibrator(tmp_path / "old.json")
    assert back.method == "platt" and any("read as 'platt'" in n for n in back.notes_)
    np.testing.assert_array_equal(apply_calibration(test[0][0], back), apply_calibration(test[0][0], platt))
