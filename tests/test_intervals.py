"""Patient-level bootstrap intervals, paired tests and Holm (issue 25) against independent references: scipy's
bootstrap and Wilcoxon, hand loops over the same resamples, brute force over tie orders."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from nnunet_kaz.errors import KazError
from nnunet_kaz.evaluation.calibration import CalibrationSet
from nnunet_kaz.evaluation.failure_detection import (aurc, augrc, e_aurc, risk_at_coverage,
                                                     weighted_failure_metrics)
from nnunet_kaz.evaluation.intervals import (Bootstrap, Estimate, fmt_ci, group_cases, holm, mean_estimate,
                                             paired)


def test_one_case_per_patient_equals_scipy_percentile_bootstrap():
    """With one value per patient the cluster bootstrap is the ordinary one: scipy.stats.bootstrap with the same
    generator draws the same resamples, so the percentile intervals agree to float rounding (different summation
    order of at most 11 values: relative 1e-15; 1e-12 allowed)."""
    rng = np.random.default_rng(5)
    for n, seed in ((11, 3), (4, 0), (2, 7)):
        v = rng.gamma(2.0, 0.3, n)
        b = Bootstrap(999, seed)
        est = mean_estimate(v, np.arange(n), b.weights(n), n)
        ref = stats.bootstrap((v,), np.mean, n_resamples=999, method="percentile", rng=np.random.default_rng(seed))
        lo, hi = b.interval(est.resampled)
        assert lo == pytest.approx(ref.confidence_interval.low, rel=1e-12)
        assert hi == pytest.approx(ref.confidence_interval.high, rel=1e-12)
        np.testing.assert_allclose(est.resampled, ref.bootstrap_distribution, rtol=1e-12)
        assert est.value == pytest.approx(v.mean(), rel=1e-14)


def test_slices_resampled_as_patient_clusters_equal_a_hand_loop():
    """Patients of 1, 3, 12 and 5 slices, two NaN slices: each resample draws patients (the same draws), brings
    all their slices and takes the mean over the finite slices; by hand with concatenation."""
    rng = np.random.default_rng(1)
    sizes = [1, 3, 12, 5]
    idx = np.repeat(np.arange(4), sizes)
    v = rng.random(idx.size)
    v[[2, 9]] = np.nan
    b = Bootstrap(500, 11)
    est = mean_estimate(v, idx, b.weights(4), 4)
    draws = np.random.default_rng(11).integers(0, 4, (500, 4))
    hand = []
    for row in draws:
        drawn = np.concatenate([v[idx == p] for p in row])
        hand.append(np.nanmean(drawn) if np.isfinite(drawn).any() else np.nan)
    np.testing.assert_allclose(est.resampled, hand, rtol=1e-12)
    assert b.interval(est.resampled) == pytest.approx(tuple(np.nanpercentile(hand, [2.5, 97.5])), rel=1e-12)
    assert est.value == pytest.approx(np.nanmean(v))                        # the point estimate: over slices
    assert est.per_patient[2] == pytest.approx(np.nanmean(v[idx == 2]))     # a patient's own mean


def test_paired_difference_wilcoxon_and_holm_by_hand():
    rng = np.random.default_rng(2)
    idx = np.repeat(np.arange(6), [2, 1, 4, 3, 2, 2])
    ref_v = rng.random(idx.size)
    b = Bootstrap(400, 0)
    w = b.weights(6)
    ref = mean_estimate(ref_v, idx, w, 6)
    ps = []
    for shift in (0.02, 0.3, -0.01):
        m_v = ref_v + shift + rng.normal(0, 0.05, idx.size)
        d = paired(mean_estimate(m_v, idx, w, 6), ref, b)
        per_patient = [m_v[idx == p].mean() - ref_v[idx == p].mean() for p in range(6)]
        assert d.p == pytest.approx(stats.wilcoxon(per_patient).pvalue, rel=1e-12)
        assert d.diff == pytest.approx(m_v.mean() - ref_v.mean(), rel=1e-12)
        hand = [np.concatenate([m_v[idx == p] for p in row]).mean() - np.concatenate([ref_v[idx == p] for p in row]).mean()
                for row in np.random.default_rng(0).integers(0, 6, (400, 6))]
        assert d.ci == pytest.approx(tuple(np.percentile(hand, [2.5, 97.5])), rel=1e-9)
        ps.append(d.p)
    # Holm by hand: sorted p_(k) * (m - k + 1), running maximum, capped at 1; NaN not counted
    p = [0.04, 0.01, float("nan"), 0.03, 0.5]
    np.testing.assert_allclose(holm(p), [0.09, 0.04, np.nan, 0.09, 0.5], rtol=1e-12)
    assert list(holm([0.6, 0.7])) == [1.0, 1.0]
    assert paired(Estimate(1.0, per_patient=np.zeros(3)), Estimate(1.0, per_patient=np.zeros(3)), b).p == 1.0


def direct_calibration(p, y, n_bins=15):
    """ECE, MCE, Brier by a loop over equal-width bins, float64."""
    idx = np.minimum((p.astype(np.float64) * n_bins).astype(int), n_bins - 1)
    ece, mce = 0.0, 0.0
    for k in range(n_bins):
        m = idx == k
        if m.any():
            gap = abs(y[m].mean() - p[m].astype(np.float64).mean())
            ece += m.mean() * gap
            mce = max(mce, gap)
    return ece, mce, float(np.mean((p.astype(np.float64) - y) ** 2))


def exact_ace(p, y, n_bins=15):
    order = np.argsort(p, kind="stable")
    groups = np.array_split(np.arange(p.size), n_bins)
    ps, ys = p[order].astype(np.float64), y[order].astype(np.float64)
    return sum(abs(ys[g].sum() - ps[g].sum()) for g in groups if g.size) / p.size


def test_calibration_intervals_and_classwise_macro_equal_a_hand_loop():
    """Three classes, patients of several cases each: every resample pools the drawn patients' voxels (with
    repetition) and computes the class-wise (one-vs-rest) ECE / MCE / Brier and their macro mean directly. ECE,
    MCE and Brier are exact up to float64 rounding (1e-12). A resample's ACE uses per-patient fine bins 2^7 wider;
    its error against the exact equal-mass ACE is bounded by 2 x (voxels of the coarse bins straddling an
    equal-mass boundary) / N (calibration.py), checked per resample."""
    from nnunet_kaz.evaluation.histograms import unit_interval_key

    rng = np.random.default_rng(3)
    cases = []
    for i, patient in enumerate(["a", "a", "b", "c", "c", "c", "d"]):
        logits = rng.normal(0, 2, (3, 9, 11 + i)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(0)
        gt = np.array([rng.choice(3, p=q) for q in probs.reshape(3, -1).T ** 1.5 /
                       (probs.reshape(3, -1).T ** 1.5).sum(1, keepdims=True)]).reshape(probs.shape[1:])
        cases.append((patient, probs, gt))
    cal = CalibrationSet(15, labels=[1, 2])
    for patient, probs, gt in cases:
        cal.add_case(probs, gt, group=patient)
    patients = ["a", "b", "c", "d"]
    b = Bootstrap(60, 4)
    w = b.weights(4)
    est = {k: cal.estimates("all", k, patients, w) for k in ("1", "2", "macro")}
    draws = b.draws(4)
    for r, row in enumerate(draws):
        pooled = [(probs, gt) for p in row for (q, probs, gt) in cases if q == patients[p]]
        hand = {}
        for k in (1, 2):
            pk = np.concatenate([probs[k].ravel() for probs, _ in pooled])
            yk = np.concatenate([(gt == k).ravel() for _, gt in pooled])
            hand[str(k)] = direct_calibration(pk, yk)
            n = pk.size
            exact = exact_ace(pk, yk)
            keys = unit_interval_key(pk) >> 7
            srt = np.sort(keys)
            straddle = sum(int((keys == srt[min(int(math.ceil(n * j / 15)), n - 1)]).sum()) for j in range(1, 15))
            assert abs(est[str(k)]["ace"].resampled[r] - exact) <= 2 * straddle / n + 1e-12
        for i, m in enumerate(("ece", "mce", "brier")):
            for k in ("1", "2"):
                assert est[k][m].resampled[r] == pytest.approx(hand[k][i], abs=1e-12)
            assert est["macro"][m].resampled[r] == pytest.approx((hand["1"][i] + hand["2"][i]) / 2, abs=1e-12)
    t = cal.table(patients, b).set_index(["scope", "class"])
    assert t.loc[("all", "macro"), "ece_ci_low"] == pytest.approx(np.percentile(est["macro"]["ece"].resampled, 2.5))
    # a patient's own value: the statistic over its voxels alone
    pa = np.concatenate([probs[2].ravel() for q, probs, _ in cases if q == "c"])
    ya = np.concatenate([(gt == 2).ravel() for q, _, gt in cases if q == "c"])
    assert est["2"]["ece"].per_patient[2] == pytest.approx(direct_calibration(pa, ya)[0], abs=1e-12)


def brute(risks, conf, fn):
    """The mean of `fn(risks in acceptance order)` over every way of breaking the confidence ties."""
    groups = [np.flatnonzero(conf == c) for c in sorted(set(conf.tolist()), reverse=True)]
    vals = [fn(risks[np.concatenate(p)]) for p in itertools.product(*[itertools.permutations(g) for g in groups])]
    return float(np.mean(vals))


def test_weighted_failure_metrics_equal_direct_and_brute_force():
    """A resample is the cases repeated by their weights (a case drawn twice = two tied cases): AURC, E-AURC,
    AUGRC equal the direct functions on the repeated arrays; the risk at 80 % coverage equals a brute force over
    every tie order of the mean risk of the ceil(0.8 n) most confident cases."""
    rng = np.random.default_rng(6)
    for _ in range(60):
        n = int(rng.integers(1, 7))
        r, c = rng.random(n).round(2), rng.integers(0, 3, n).astype(float)
        w = rng.integers(0, 3, (4, n)).astype(float)
        w[0] = 1
        got = weighted_failure_metrics(r, c, w)
        for b in range(4):
            rep = np.repeat(np.arange(n), w[b].astype(int))
            if not rep.size:
                assert all(math.isnan(got[k][b]) for k in got)
                continue
            rr, cc = r[rep], c[rep]
            assert got["aurc"][b] == pytest.approx(aurc(rr, cc), abs=1e-12)
            assert got["e_aurc"][b] == pytest.approx(e_aurc(rr, cc), abs=1e-12)
            assert got["augrc"][b] == pytest.approx(augrc(rr, cc), abs=1e-12)
            if rep.size <= 6:
                k = math.ceil(0.8 * rep.size - 1e-9)
                assert got["risk_80cov"][b] == pytest.approx(brute(rr, cc, lambda x: x[:k].mean()), abs=1e-12)
            assert got["risk_80cov"][b] == pytest.approx(risk_at_coverage(rr, cc), abs=1e-12)
    # hand cases: 5 cases, k = 4: the four most confident (0, 0.5, 1, 0.2) -> 0.425; a tie at the cut (two cases
    # of confidence 1 share the 4th place: half of each) -> (0 + 0.5 + 1 + (0.2 + 0.6) / 2) / 4
    assert risk_at_coverage([0, 0.5, 1, 0.2, 0.9], [5, 4, 3, 2, 1]) == pytest.approx(0.425)
    assert risk_at_coverage([0, 0.5, 1, 0.2, 0.6], [5, 4, 3, 1, 1]) == pytest.approx((1.5 + 0.4) / 4)
    assert risk_at_coverage([0.3], [0]) == pytest.approx(0.3)


def test_grouping_by_meta_pattern_and_3d(tmp_path):
    gt = tmp_path / "Dataset1_K" / "labelsTs"
    gt.mkdir(parents=True)
    cases = ["K_P1_a000", "K_P1_a015", "K_P2_a000"]
    (gt.parent / "kaz_meta.json").write_text(json.dumps({"cases": {c: {"patient": c.split("_")[1]} for c in cases}}))
    g = group_cases(cases, gt, three_d=False)
    assert g.patients == ["P1", "P2"] and list(g.index(cases)) == [0, 0, 1] and "kaz_meta.json" in g.source
    assert g.summary()["patients"] == {"P1": ["K_P1_a000", "K_P1_a015"], "P2": ["K_P2_a000"]}
    with pytest.raises(KazError, match="K_P9_a000"):
        group_cases(cases + ["K_P9_a000"], gt, three_d=False)
    g = group_cases(["KAZ_P003_a045", "KAZ_P003_a060", "KAZ_P010_a000"], tmp_path, three_d=False)
    assert g.patients == ["P003", "P010"] and "default pattern" in g.source      # as `nnunet-kaz splits`
    g = group_cases(["case_00001", "case_00002"], tmp_path, three_d=True)
    assert g.patients == ["case_00001", "case_00002"] and "3D" in g.source
    g = group_cases(["x1", "x2"], tmp_path, three_d=False)
    assert g.patients == ["x1", "x2"] and "own patient" in g.source
    g = group_cases(["s1-a", "s1-b"], tmp_path, three_d=True, pattern=r"(?P<patient>s\d)-")
    assert g.patients == ["s1"]
    with pytest.raises(KazError, match="patient"):
        group_cases(["a"], tmp_path, three_d=True, pattern=r"(\w)")


def test_format_and_bad_settings():
    assert fmt_ci(0.8661, 0.8412, 0.8873) == "0.866 [0.84, 0.89]"          # the interval rounded outwards
    assert fmt_ci(0.01883, 0.0121, 0.0313) == "0.0188 [0.012, 0.032]"
    assert fmt_ci(12.345, 9.81, 15.2) == "12.3 [9.8, 16]"
    assert fmt_ci(0.0878, 0.08779, 0.47) == "0.0878 [0.087, 0.47]"        # never [0.088, ...] around 0.0878
    assert fmt_ci(-0.5, -0.612, -0.41, sign=True) == "-0.500 [-0.62, -0.41]"
    assert fmt_ci(0.02, 0.01, float("nan"), sign=True) == "+0.0200"
    assert fmt_ci(float("nan")) == "n/a"
    with pytest.raises(KazError, match="bootstrap"):
        Bootstrap(-1)
    assert Bootstrap(0).interval(np.array([1.0])) == (1.0, 1.0) and not Bootstrap(0).active
