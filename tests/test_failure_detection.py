"""AURC / E-AURC / AUGRC against direct implementations (ties by enumerating every tie order, fd-shifts' RC
points + trapezoids), closed forms, the ValUES aggregations against brute force, the table and the figure."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from nnunet_kaz.evaluation.failure_detection import (aggregate_uncertainty, augrc, aurc, e_aurc,
                                                     failure_detection_table, optimal_aurc, patch_max_mean,
                                                     risk_coverage_curve, risk_coverage_figure)


def geifman_aurc_no_ties(risks, conf):
    order = np.argsort(-conf)
    r = risks[order]
    return np.mean(np.cumsum(r) / np.arange(1, r.size + 1))


def tie_orders(conf):
    """Every ordering of the cases by decreasing confidence, ties broken in all possible ways."""
    groups = [np.flatnonzero(conf == c) for c in sorted(set(conf.tolist()), reverse=True)]
    for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
        yield np.concatenate(perms)


def brute_aurc(risks, conf):
    vals = [np.mean(np.cumsum(risks[o]) / np.arange(1, risks.size + 1)) for o in tie_orders(conf)]
    return float(np.mean(vals))


def fdshifts_augrc(risks, conf):
    """fd-shifts generalized_risk_stats + trapezoids: one RC point per distinct confidence, then (0, 0)."""
    n = risks.size
    idx = np.argsort(conf, kind="stable")
    r, c = risks[idx], conf[idx]
    error_sum, cov = r.sum(), n
    covs, rks = [1.0], [error_sum / n]
    for i in range(n - 1):
        cov -= 1
        error_sum -= r[i]
        if c[i] != c[i + 1]:
            covs.append(cov / n)
            rks.append(error_sum / n)
    covs.append(0.0)
    rks.append(0.0)
    covs, rks = np.array(covs), np.array(rks)
    return float(np.sum((covs[:-1] - covs[1:]) * (rks[:-1] + rks[1:]) / 2))


def test_without_ties_equals_geifman():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        r, c = rng.random(n), rng.normal(size=n)
        assert aurc(r, c) == pytest.approx(geifman_aurc_no_ties(r, c), abs=1e-12)
        assert augrc(r, c) == pytest.approx(fdshifts_augrc(r, c), abs=1e-12)


def test_ties_equal_the_mean_over_every_tie_order():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 8))
        c = rng.integers(0, 3, size=n).astype(float)  # heavy ties
        r = rng.random(n).round(2)
        assert aurc(r, c) == pytest.approx(brute_aurc(r, c), abs=1e-12)
        assert augrc(r, c) == pytest.approx(fdshifts_augrc(r, c), abs=1e-12)
        # AUGRC too is the mean over tie orders (it is linear in the accepted risk sums)
        vals = [fdshifts_augrc(r[o], -np.arange(n, dtype=float)) for o in tie_orders(c)]
        assert augrc(r, c) == pytest.approx(np.mean(vals), abs=1e-12)
    # every case tied: AURC = mean risk
    r = np.array([0.1, 0.5, 0.9])
    assert aurc(r, np.zeros(3)) == pytest.approx(0.5)


def test_optimum_and_closed_forms():
    rng = np.random.default_rng(2)
    r = rng.random(30)
    perfect = -r  # most confident = lowest risk
    assert e_aurc(r, perfect) == pytest.approx(0.0, abs=1e-15)
    assert aurc(r, perfect) == pytest.approx(optimal_aurc(r))
    for _ in range(10):
        assert e_aurc(r, rng.normal(size=30)) >= 0
    worst = aurc(r, r)  # highest risk first: every S_k is the largest possible
    for _ in range(10):
        assert optimal_aurc(r) <= aurc(r, rng.normal(size=30)) <= worst
    binary = (rng.random(50) < 0.3).astype(float)
    err = binary.mean()
    assert augrc(binary, -binary) == pytest.approx(0.5 * err ** 2)  # fd-shifts' augrc_optimal for binary
    cov, sel = risk_coverage_curve(r, perfect)
    assert cov[-1] == 1.0 and sel[-1] == pytest.approx(r.mean()) and np.all(np.diff(sel) >= -1e-12)
    # NaN pairs are left out
    assert aurc(np.r_[r, np.nan], np.r_[perfect, 0.0]) == pytest.approx(aurc(r, perfect))
    assert np.isnan(aurc([], []))


def test_aggregations_against_brute_force():
    rng = np.random.default_rng(3)
    u = rng.random((6, 13, 11))
    p = 3
    best = max(u[i:i + p, j:j + p, k:k + p].mean() for i in range(4) for j in range(11) for k in range(9))
    assert patch_max_mean(u, p) == pytest.approx(best, rel=1e-12)
    small = rng.random((4, 7))  # smaller than the default 10x10 patch: clipped to the image
    assert patch_max_mean(small) == pytest.approx(max(small[:, j:j + 7].mean() for j in range(1)))
    fg = u > 0.8
    agg = aggregate_uncertainty(u, fg, patch_size=p)
    assert agg["mean"] == pytest.approx(u.mean()) and agg["sum"] == pytest.approx(u.sum())
    assert agg["foreground_mean"] == pytest.approx(u[fg].mean()) and agg["patch_max"] == pytest.approx(best)
    assert aggregate_uncertainty(u, np.zeros_like(fg))["foreground_mean"] == 0.0


def test_table_and_figure(tmp_path):
    rng = np.random.default_rng(4)
    cases = [f"c{i}" for i in range(12)]
    dice = pd.DataFrame({"case": cases * 2, "label": [1] * 12 + [2] * 12, "dice": rng.random(24)})
    scores = pd.DataFrame({"case": cases * 2, "label": [1] * 12 + [2] * 12,
                           "mean_entropy": rng.random(24), "pairwise_dice": rng.random(24)})
    scores.loc[3, "mean_entropy"] = np.nan
    t = failure_detection_table(dice, scores)
    assert list(t.columns) == ["label", "source", "aurc", "e_aurc", "augrc", "risk_80cov", "n_cases"]
    assert len(t) == 4
    row = t[(t.label == 1) & (t.source == "mean_entropy")].iloc[0]
    d1, s1 = dice[dice.label == 1], scores[scores.label == 1]
    keep = s1["mean_entropy"].notna().to_numpy()
    assert row.n_cases == 11
    assert row.aurc == pytest.approx(aurc(1 - d1.dice.to_numpy()[keep], -s1.mean_entropy.to_numpy()[keep]))
    row = t[(t.label == 2) & (t.source == "pairwise_dice")].iloc[0]  # agreement: confidence = +score
    d2, s2 = dice[dice.label == 2], scores[scores.label == 2]
    assert row.aurc == pytest.approx(aurc(1 - d2.dice.to_numpy(), s2.pairwise_dice.to_numpy()))
    png = tmp_path / "rc.png"
    risk_coverage_figure(png, {"entropy": (1 - d1.dice, -s1.mean_entropy), "pd": (1 - d1.dice, s1.pairwise_dice)},
                         title="label 1")
    assert png.stat().st_size > 5000
