"""Failure detection: does an image-level confidence rank the bad segmentations last? AURC, E-AURC, AUGRC.

Per case i: risk r_i = 1 - Dice_i (ValUES, Kahl et al., ICLR 2024, section 4 "failure detection": risk =
1 - Dice per image) and confidence c_i = minus an uncertainty score (`confidence_from_score`). Sort the n
cases by decreasing confidence; S_k is the summed risk of the k most confident cases, k = 0..n (S_0 = 0).
Cases of equal confidence are accepted or rejected together, so inside a tie group of m cases holding risk
sum T after b more confident cases, S_k = S_b + (k - b) T / m: the expectation over the orders the ties
could be broken in, which is the linear interpolation between the group's ends that fd-shifts'
risk-coverage points (one point per distinct confidence, `fd_shifts/analysis/rc_stats_utils.py`) imply.

- AURC (Geifman, Uziel & El-Yaniv, "Bias-reduced uncertainty estimation for deep neural classifiers", ICLR
  2019, section 3): AURC = (1/n) sum_{k=1..n} S_k / k, the mean selective risk over the coverages k/n.
- E-AURC (same paper, section 3): AURC - AURC*, AURC* the AURC of the ideal confidence that orders cases by
  increasing risk, (1/n) sum_k (sum of the k smallest risks) / k (ValUES' `eaurc`, which uses this same
  optimum). E-AURC >= 0, and 0 for a confidence that ranks the risks perfectly.
- AUGRC (Traub et al., "Overcoming common flaws in the evaluation of selective classification systems",
  NeurIPS 2024, section 4, the area under the generalized risk S_k / n over coverage k / n): the trapezoidal
  integral fd-shifts computes, (1/n) sum_{k=1..n} (S_{k-1} + S_k) / (2 n).
Where the sources differ: fd-shifts' current AURC integrates the selective risk with a non-linear
interpolation between its points and ValUES' `aurc` uses trapezoids with its own tie bookkeeping; both give
an E-AURC that is not 0 for a perfect ranking under their optimum. We keep Geifman's discrete mean, for which
AURC and AURC* are the same functional. Values are in [0, 1] (fd-shifts prints them x 1000).
- Risk at 80 % coverage (fd-shifts' `risk@80cov`): the selective risk S_k / k of the k = ceil(0.8 n) most
  confident cases (ties as above).

Intervals (fd-shifts' `aurc_ci_bs` / `augrc_ci_bs`: 95 % percentiles of the metric over bootstrap resamples of
the test cases): here the resamples are those of `intervals.Bootstrap`, over patients (a drawn patient brings all
its cases; a case drawn twice is two tied cases). `weighted_failure_metrics` computes AURC, E-AURC, AUGRC and
the risk at a coverage for a whole batch of resamples at once from the cases' multiplicities: sorted once by
confidence, a tie group g of m_g accepted cases holding risk T_g after b_g more confident ones adds
S_b (H_{b+m} - H_b) + (T/m)(m - b (H_{b+m} - H_b)) to n AURC (H the harmonic numbers: the sum over k of S_k / k
inside the group, S linear in k) and m (S_b + T / 2) to n^2 AUGRC; AURC* the same with the cases sorted by risk.
Equal to the direct functions above on every resample (tests).

Aggregations of a voxel uncertainty map into one image score (ValUES section 3, C3 "aggregation"; its
`evaluation/uncertainty_aggregation/aggregate_uncertainties.py`): `mean` over the image, `sum`,
`foreground_mean` over the predicted foreground (0 when nothing is predicted: ValUES' threshold aggregation
returns the empty sum), and `patch_max`, the largest mean over every box of `patch_size` voxels per axis
(10, clipped to the image) fully inside the image (ValUES' patch-level aggregation with `mean=True`; its
default sum ranks images identically whenever no image is smaller than the patch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

FAILURE_METRICS = ("aurc", "e_aurc", "augrc", "risk_80cov")
FAILURE_COLUMNS = ("label", "source", *FAILURE_METRICS, "n_cases")
COVERAGE = 0.8  # risk_80cov
AGGREGATIONS = ("mean", "sum", "foreground_mean", "patch_max")
PATCH_SIZE = 10
# per-image scores of scores.csv that grow with agreement: their confidence is the score itself
HIGHER_IS_CONFIDENT = ("pairwise_dice", "pairwise_dice_pooled")  # agreement: higher = more confident


def _clean(risks, confidences) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(risks, dtype=np.float64).ravel()
    c = np.asarray(confidences, dtype=np.float64).ravel()
    if r.size != c.size:
        raise ValueError(f"{r.size} risks but {c.size} confidences")
    keep = np.isfinite(r) & np.isfinite(c)
    return r[keep], c[keep]


def accepted_risk_sums(risks, confidences) -> np.ndarray:
    """S_0..S_n (module docstring): summed risk of the k most confident cases, ties as their expectation."""
    r, c = _clean(risks, confidences)
    n = r.size
    order = np.argsort(-c, kind="stable")
    r, c = r[order], c[order]
    s = np.zeros(n + 1)
    if n == 0:
        return s
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    ends = np.r_[starts[1:], n]
    group_sum = np.add.reduceat(r, starts)
    before = np.r_[0.0, np.cumsum(group_sum)[:-1]]
    for b, e, t, sb in zip(starts, ends, group_sum, before):
        m = e - b
        s[b + 1:e + 1] = sb + np.arange(1, m + 1) * (t / m)
    return s


def risk_coverage_curve(risks, confidences) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/n, selective risk S_k / k) for k = 1..n."""
    s = accepted_risk_sums(risks, confidences)
    k = np.arange(1, s.size)
    return k / max(k.size, 1), s[1:] / k


def aurc(risks, confidences) -> float:
    """AURC = (1/n) sum_k S_k / k (Geifman et al. 2019 section 3); NaN without cases."""
    s = accepted_risk_sums(risks, confidences)
    n = s.size - 1
    return float(np.mean(s[1:] / np.arange(1, n + 1))) if n else float("nan")


def optimal_aurc(risks) -> float:
    """AURC* of the ideal ranking: (1/n) sum_k (sum of the k smallest risks) / k."""
    r = np.sort(np.asarray(risks, dtype=np.float64)[np.isfinite(risks)])
    return float(np.mean(np.cumsum(r) / np.arange(1, r.size + 1))) if r.size else float("nan")


def e_aurc(risks, confidences) -> float:
    """E-AURC = AURC - AURC* (Geifman et al. 2019 section 3)."""
    r, c = _clean(risks, confidences)
    return aurc(r, c) - optimal_aurc(r)


def augrc(risks, confidences) -> float:
    """AUGRC = (1/n) sum_k (S_{k-1} + S_k) / (2n) (Traub et al. 2024 section 4); NaN without cases."""
    s = accepted_risk_sums(risks, confidences)
    n = s.size - 1
    return float(np.sum(s[:-1] + s[1:]) / (2.0 * n * n)) if n else float("nan")


def _n_at_coverage(coverage: float, n):
    """k = ceil(coverage n), at least 1 (rounded first: 0.8 * 10 is 8.000000000000002 in floating point)."""
    return np.maximum(np.ceil(np.round(np.asarray(coverage * np.asarray(n, dtype=np.float64), dtype=np.float64), 9)), 1)


def risk_at_coverage(risks, confidences, coverage: float = COVERAGE) -> float:
    """Selective risk S_k / k of the k = ceil(coverage n) most confident cases (ties: expectation); NaN without
    cases."""
    s = accepted_risk_sums(risks, confidences)
    n = s.size - 1
    if not n:
        return float("nan")
    k = int(_n_at_coverage(coverage, n))
    return float(s[k] / k)


def failure_metrics(risks, confidences) -> dict[str, float]:
    r, c = _clean(risks, confidences)
    return {"aurc": aurc(r, c), "e_aurc": e_aurc(r, c), "augrc": augrc(r, c),
            "risk_80cov": risk_at_coverage(r, c, COVERAGE), "n_cases": int(r.size)}


def _group_areas(m: np.ndarray, t: np.ndarray, coverage: float) -> tuple[np.ndarray, ...]:
    """n AURC, n^2 AUGRC and S at k = ceil(coverage n) of (B, G) tie groups in acceptance order: m cases holding
    risk t each (module docstring); returns (aurc, augrc, risk at coverage, n) per row."""
    n = m.sum(axis=1)
    cum_m = np.cumsum(m, axis=1)
    b = cum_m - m
    s_b = np.cumsum(t, axis=1) - t
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(n.max(initial=0)) + 1))])
    bi = np.rint(b).astype(np.intp)
    dh = harmonic[bi + np.rint(m).astype(np.intp)] - harmonic[bi]
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(m > 0, t / np.where(m > 0, m, 1), 0.0)
        area = (s_b * dh + slope * (m - b * dh)).sum(axis=1) / n
        general = (m * (s_b + t / 2)).sum(axis=1) / (n * n)
        k = _n_at_coverage(coverage, n)
        g = np.minimum((cum_m < k[:, None]).sum(axis=1), m.shape[1] - 1)  # the group holding the k-th case
        rows = np.arange(m.shape[0])
        at = (s_b[rows, g] + (k - b[rows, g]) * slope[rows, g]) / k
    bad = n <= 0
    return tuple(np.where(bad, np.nan, x) for x in (area, general, at))


def weighted_failure_metrics(risks, confidences, weights: np.ndarray, coverage: float = COVERAGE,
                             chunk: int = 256) -> dict[str, np.ndarray]:
    """AURC, E-AURC, AUGRC and risk at `coverage` of each row of `weights` (B, n): how often each case is drawn
    (a bootstrap resample; a row of ones is the data itself). Cases with a NaN risk or confidence are left out,
    as in `failure_metrics`. Returns arrays of length B (module docstring)."""
    r = np.asarray(risks, dtype=np.float64).ravel()
    c = np.asarray(confidences, dtype=np.float64).ravel()
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != r.size or r.size != c.size:
        raise ValueError(f"{r.size} risks, {c.size} confidences and weights for {w.shape[1]} cases")
    keep = np.isfinite(r) & np.isfinite(c)
    r, c, w = r[keep], c[keep], w[:, keep]
    out = {name: np.full(w.shape[0], np.nan) for name in FAILURE_METRICS}
    if not r.size:
        return out
    by_conf = np.argsort(-c, kind="stable")
    starts = np.flatnonzero(np.r_[True, c[by_conf][1:] != c[by_conf][:-1]])
    by_risk = np.argsort(r, kind="stable")
    for lo in range(0, w.shape[0], chunk):  # (chunk, n) temporaries
        wc = w[lo:lo + chunk]
        m = np.add.reduceat(wc[:, by_conf], starts, axis=1)
        t = np.add.reduceat(wc[:, by_conf] * r[by_conf], starts, axis=1)
        area, general, at = _group_areas(m, t, coverage)
        best = _group_areas(wc[:, by_risk], wc[:, by_risk] * r[by_risk], coverage)[0]
        out["aurc"][lo:lo + chunk], out["augrc"][lo:lo + chunk] = area, general
        out["e_aurc"][lo:lo + chunk], out["risk_80cov"][lo:lo + chunk] = area - best, at
    return out


def confidence_from_score(name: str, score) -> np.ndarray:
    """Confidence of a per-image score: minus the score, except for agreement scores (HIGHER_IS_CONFIDENT)."""
    score = np.asarray(score, dtype=np.float64)
    return score if name in HIGHER_IS_CONFIDENT else -score


def patch_max_mean(u: np.ndarray, patch_size: int | Sequence[int] = PATCH_SIZE) -> float:
    """Largest mean of `u` over the boxes of `patch_size` voxels per axis (clipped to the image) that lie
    fully inside the image: a summed-area table, exact up to float64 rounding."""
    u = np.asarray(u, dtype=np.float64)
    size = np.broadcast_to(np.asarray(patch_size, dtype=int), (u.ndim,))
    size = np.minimum(size, u.shape)
    table = u
    for axis in range(u.ndim):
        table = np.cumsum(table, axis=axis)
        table = np.concatenate([np.zeros_like(table.take([0], axis=axis)), table], axis=axis)
    # box sum by inclusion-exclusion over the 2^ndim corners
    total = 0.0
    for corner in np.ndindex(*(2,) * u.ndim):
        sl = tuple(slice(sz, None) if c else slice(0, table.shape[a] - sz)
                   for a, (c, sz) in enumerate(zip(corner, size)))
        sign = (-1) ** (u.ndim - sum(corner))
        total = total + sign * table[sl]
    return float(np.max(total) / np.prod(size))


def aggregate_uncertainty(u: np.ndarray, pred_foreground: np.ndarray | None = None,
                          patch_size: int | Sequence[int] = PATCH_SIZE) -> dict[str, float]:
    """The four image-level aggregations of a voxel uncertainty map (module docstring)."""
    u = np.asarray(u, dtype=np.float64)
    out = {"mean": float(u.mean()), "sum": float(u.sum()), "patch_max": patch_max_mean(u, patch_size)}
    if pred_foreground is not None:
        fg = np.asarray(pred_foreground, dtype=bool)
        if fg.shape != u.shape:
            raise ValueError(f"foreground shape {fg.shape} differs from the uncertainty map's {u.shape}")
        out["foreground_mean"] = float(u[fg].mean()) if fg.any() else 0.0
    return out


def failure_detection_table(dice: pd.DataFrame, scores: pd.DataFrame,
                            higher_is_confident: Sequence[str] = HIGHER_IS_CONFIDENT,
                            groups=None, bootstrap=None) -> pd.DataFrame:
    """failure_detection.csv: one row per label and confidence source.

    `dice` has columns case, label, dice; `scores` has columns case, label and one column per source
    (per-image scores or uncertainty aggregations). Cases are matched on (case, label); pairs with a NaN
    Dice or score are left out (`n_cases` counts the rest). With `groups` (intervals.CaseGroups) and an active
    `bootstrap` (intervals.Bootstrap) each metric M gets M_ci_low / M_ci_high over patient resamples."""
    merged = dice[["case", "label", "dice"]].merge(scores, on=["case", "label"], how="inner")
    sources = [c for c in scores.columns if c not in ("case", "label")]
    with_ci = groups is not None and bootstrap is not None and bootstrap.active
    weights = bootstrap.weights(len(groups.patients)) if with_ci else None
    rows = []
    for label, sub in merged.groupby("label", sort=True):
        risk = 1.0 - sub["dice"].to_numpy(dtype=np.float64)
        case_weights = weights[:, groups.index(sub["case"])] if with_ci else None
        for src in sources:
            val = sub[src].to_numpy(dtype=np.float64)
            conf = val if src in higher_is_confident else -val
            row = {"label": label, "source": src, **failure_metrics(risk, conf)}
            if with_ci:
                resampled = weighted_failure_metrics(risk, conf, case_weights)
                for name in FAILURE_METRICS:
                    row[f"{name}_ci_low"], row[f"{name}_ci_high"] = bootstrap.interval(resampled[name])
            rows.append(row)
    ci = [f"{m}_{e}" for m in FAILURE_METRICS for e in ("ci_low", "ci_high")] if with_ci else []
    return pd.DataFrame(rows, columns=[*FAILURE_COLUMNS, *ci])


def risk_coverage_figure(path: str | Path, curves: Mapping[str, tuple], title: str = "") -> None:
    """Selective risk against coverage, one line per curve name -> (risks, confidences); the ideal ranking
    of the first curve's risks dashed. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    first = None
    for name, (risks, confidences) in curves.items():
        cov, sel = risk_coverage_curve(risks, confidences)
        if cov.size == 0:
            continue
        first = first if first is not None else _clean(risks, confidences)[0]
        ax.step(cov, sel, where="post", label=f"{name} (AURC {aurc(risks, confidences):.3f})")
    if first is not None:
        r = np.sort(first)
        ax.plot(np.arange(1, r.size + 1) / r.size, np.cumsum(r) / np.arange(1, r.size + 1), "k--", lw=1,
                label="ideal ranking")
    ax.set_xlabel("coverage (fraction of cases kept, most confident first)")
    ax.set_ylabel("selective risk (mean 1 - Dice of kept cases)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
