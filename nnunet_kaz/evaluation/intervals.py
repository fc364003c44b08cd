"""Patient-level bootstrap intervals and paired comparisons of methods (issue 25).

Resampling unit. Slices of one patient are correlated (paper 000: 12 radial slices per patient), so intervals
resample PATIENTS, not slices: `group_cases` groups the evaluated cases as the splits do (`datasets/splits.py`):
by `kaz_meta.json` of a converted KAZ dataset (next to the ground-truth folder), by a case-name pattern with a
group `(?P<patient>...)` (given, or for 2D cases the splits' default that reads `KAZ_P003_a045` as P003 when
every case name matches it), and otherwise each case is its own patient (always for 3D cases: one volume per
patient). The grouping and where it came from are written into the outputs (evaluation.json, comparison.json).

Interval (`Bootstrap`): percentile bootstrap (Efron & Tibshirani 1993, ch. 13), B resamples (default 2000),
seeded. Each resample draws P patients with replacement from the P patients, `rng.integers(0, P, (B, P))` with
`numpy.random.default_rng(seed)`: the very draws `scipy.stats.bootstrap` makes with the same generator, so with
one case per patient the interval equals scipy's `method="percentile"` (tests). A drawn patient brings all its
cases (a cluster bootstrap); the statistic of a resample is computed exactly as on the data, over the drawn
cases with their multiplicities: a mean over slices stays a mean over slices (a patient with 12 slices weighs
12 times a patient with one, as in the point estimate), a pooled calibration error pools the drawn patients'
voxels, an AURC ranks the drawn cases. The interval is the (alpha/2, 1 - alpha/2) quantiles (numpy's linear
interpolation, as scipy) of the resampled statistics, alpha = 1 - confidence (0.95). Resamples in which the
statistic is undefined (e.g. every drawn HD95 NaN) are left out of the quantiles. With few patients the
interval is coarse (3 patients give at most 10 distinct resamples); the number of patients is always stated.

Paired comparison with a reference method (`paired`): the difference M(method) - M(reference); its interval
from the same resamples (both methods see the same drawn patients: a paired bootstrap); and a Wilcoxon
signed-rank test (scipy.stats.wilcoxon, two-sided, zero differences dropped, exact for small samples) on the
per-patient differences, each patient's M computed on its own cases (a mean over its slices; a calibration error
over its voxels). Statistics without a per-patient value (AURC and its kind rank cases against each other) get
an interval but no p-value. The p-values of one metric are Holm-adjusted over the methods compared with the
reference (`holm`: Holm 1979, step-down: the k-th smallest of m p-values times (m - k + 1), made monotone,
capped at 1).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_kaz.errors import KazError

CONFIDENCE = 0.95
N_RESAMPLES = 2000
KAZ_META = "kaz_meta.json"


# --------------------------------------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class CaseGroups:
    """Which patient each case belongs to, and where that came from."""

    patient_of: dict[str, str]
    source: str

    @property
    def patients(self) -> list[str]:
        return sorted(set(self.patient_of.values()))

    def index(self, cases: Sequence[str]) -> np.ndarray:
        """The patient index (into `patients`) of each case."""
        pos = {p: i for i, p in enumerate(self.patients)}
        try:
            return np.array([pos[self.patient_of[str(c)]] for c in cases], dtype=np.intp)
        except KeyError as e:
            raise KazError(f"case {e.args[0]} has no patient in the grouping ({self.source})") from None

    def describe(self) -> str:
        return f"{len(self.patients)} patients ({len(self.patient_of)} cases; grouping: {self.source})"

    def summary(self) -> dict:
        by: dict[str, list[str]] = {}
        for case, p in sorted(self.patient_of.items()):
            by.setdefault(p, []).append(case)
        return {"unit": "patient", "source": self.source, "n_patients": len(by), "n_cases": len(self.patient_of),
                "patients": by}


def _from_pattern(cases: Sequence[str], pattern: str, what: str) -> CaseGroups:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise KazError(f"patient pattern {pattern!r}: {e}", option="patient_pattern") from None
    if "patient" not in rx.groupindex:
        raise KazError(f"patient pattern {pattern!r} needs a named group (?P<patient>...)", option="patient_pattern")
    bad = [c for c in cases if not rx.match(c)]
    if bad:
        raise KazError(f"case name(s) not matching the patient pattern {pattern!r}: {', '.join(bad[:10])}",
                       option="patient_pattern")
    return CaseGroups({c: rx.match(c).group("patient") for c in cases}, f"{what} {pattern!r} on the case names")


def group_cases(cases: Sequence[str], gt_dir: Path | None, three_d: bool, pattern: str | None = None) -> CaseGroups:
    """Patients of the evaluated cases (module docstring): `pattern` if given; else `kaz_meta.json` in `gt_dir`
    or its parent (convert-kaz: labelsTs/ inside the dataset folder); else 3D cases each their own patient; else
    the splits' default pattern when every 2D case name matches it; else each case its own patient."""
    from nnunet_kaz.datasets.splits import CASE_PATIENT_PATTERN

    cases = [str(c) for c in cases]
    if pattern:
        return _from_pattern(cases, pattern, "pattern")
    for folder in ([Path(gt_dir), Path(gt_dir).parent] if gt_dir is not None else []):
        meta = folder / KAZ_META
        if meta.is_file():
            try:
                info = json.loads(meta.read_text())["cases"]
            except (OSError, ValueError, KeyError) as e:
                raise KazError(f"{meta}: unreadable ({e})") from None
            missing = [c for c in cases if c not in info or "patient" not in info[c]]
            if missing:
                raise KazError(f"{meta} names no patient for case(s) {', '.join(missing[:10])}; give a patient "
                               "pattern instead (patient_pattern)", option="patient_pattern")
            return CaseGroups({c: str(info[c]["patient"]) for c in cases}, f"{meta}")
    if three_d:
        return CaseGroups({c: c for c in cases}, "each 3D case its own patient")
    rx = re.compile(CASE_PATIENT_PATTERN)
    if cases and all(rx.match(c) for c in cases):
        return _from_pattern(cases, CASE_PATIENT_PATTERN, "the splits' default pattern")
    return CaseGroups({c: c for c in cases}, f"each case its own patient (no {KAZ_META}, names do not match "
                                             f"{CASE_PATIENT_PATTERN!r})")


# -------------------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap over patients (module docstring); `n_resamples = 0` turns intervals off."""

    n_resamples: int = N_RESAMPLES
    seed: int = 0
    confidence: float = CONFIDENCE

    def __post_init__(self):
        if int(self.n_resamples) < 0:
            raise KazError(f"the number of bootstrap resamples must be >= 0, got {self.n_resamples}",
                           option="bootstrap")
        if not 0 < self.confidence < 1:
            raise KazError(f"the confidence level must lie in (0, 1), got {self.confidence}", option="confidence")

    @property
    def active(self) -> bool:
        return self.n_resamples > 0

    def draws(self, n_patients: int) -> np.ndarray:
        """(B, P) indices of the drawn patients: scipy.stats.bootstrap's draws with the same generator."""
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, n_patients, (self.n_resamples, n_patients))

    def weights(self, n_patients: int) -> np.ndarray:
        """(B, P) float64, read-only: how often each patient is drawn in each resample (computed once per
        settings and P: every figure of a run, and every run of a comparison, sees the same resamples)."""
        return _weights(self.n_resamples, self.seed, int(n_patients))

    def interval(self, resampled: np.ndarray | None) -> tuple[float, float]:
        """(low, high) percentile interval of the resampled statistics (non-finite ones left out)."""
        if resampled is None:
            return math.nan, math.nan
        v = np.asarray(resampled, dtype=np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            return math.nan, math.nan
        alpha = (1.0 - self.confidence) / 2.0
        lo, hi = np.percentile(v, [100 * alpha, 100 * (1 - alpha)])
        return float(lo), float(hi)

    def describe(self) -> str:
        return (f"{100 * self.confidence:g} % percentile bootstrap over patients, {self.n_resamples} resamples, "
                f"seed {self.seed}")

    def summary(self) -> dict:
        return {"method": "percentile", "confidence": self.confidence, "n_resamples": self.n_resamples,
                "seed": self.seed, "resampling_unit": "patient (all its cases together)"}


@lru_cache(maxsize=8)
def _weights(n_resamples: int, seed: int, n_patients: int) -> np.ndarray:
    idx = Bootstrap(n_resamples, seed).draws(n_patients)
    w = np.zeros((n_resamples, n_patients))
    np.add.at(w, (np.arange(n_resamples)[:, None], idx), 1.0)
    w.flags.writeable = False
    return w


@dataclass
class Estimate:
    """A statistic: its value, its value in each bootstrap resample (None without intervals) and its value on
    each patient's cases alone (None when it has none, e.g. AURC)."""

    value: float
    resampled: np.ndarray | None = None
    per_patient: np.ndarray | None = None
    ci: tuple[float, float] = (math.nan, math.nan)

    def with_ci(self, bootstrap: Bootstrap) -> "Estimate":
        self.ci = bootstrap.interval(self.resampled)
        return self


def mean_estimate(values: Sequence[float], patient_idx: np.ndarray, weights: np.ndarray | None,
                  n_patients: int | None = None) -> Estimate:
    """Mean of the finite `values` (one per case, or per case and label) with its cluster resamples: each
    resample's mean over the drawn patients' finite values, patients counted with their multiplicity."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.asarray(patient_idx, dtype=np.intp)
    n_patients = int(n_patients if n_patients is not None else (idx.max() + 1 if idx.size else 0))
    ok = np.isfinite(v)
    sums = np.bincount(idx[ok], weights=v[ok], minlength=n_patients)
    counts = np.bincount(idx[ok], minlength=n_patients).astype(np.float64)
    total = counts.sum()
    value = float(sums.sum() / total) if total else math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        per_patient = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), np.nan)
        resampled = None
        if weights is not None:
            num, den = weights @ sums, weights @ counts
            resampled = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return Estimate(value, resampled, per_patient)


# ---------------------------------------------------------------------------------------------------- tests
def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of per-patient differences (scipy.stats.wilcoxon's defaults:
    zero differences dropped); 1 when every difference is 0, NaN without any finite difference."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not d.size:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d).pvalue)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (module docstring); NaN stays NaN and does not count among the m tests."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


@dataclass
class Paired:
    """The difference of one method's statistic from the reference's, its interval and p-value."""

    diff: float
    ci: tuple[float, float]
    p: float
    n_patients: int = 0
    p_holm: float = field(default=math.nan)


def paired(method: Estimate, reference: Estimate, bootstrap: Bootstrap) -> Paired:
    """M(method) - M(reference), its paired-bootstrap interval and the Wilcoxon p over per-patient differences."""
    diff = method.value - reference.value
    res = None
    if method.resampled is not None and reference.resampled is not None:
        res = method.resampled - reference.resampled
    p, n = math.nan, 0
    if method.per_patient is not None and reference.per_patient is not None:
        d = method.per_patient - reference.per_patient
        n = int(np.isfinite(d).sum())
        p = wilcoxon_p(d)
    return Paired(float(diff), bootstrap.interval(res), p, n)


# ------------------------------------------------------------------------------------------------ formatting
def _decimals(v: float, significant: int) -> int:
    if v == 0 or not math.isfinite(v):
        return significant - 1
    return max(0, significant - 1 - int(math.floor(math.log10(abs(v)))))


def fmt(v: float | None, significant: int = 3, outward: int = 0) -> str:
    """A number with `significant` digits, never in exponent notation: 0.866, 0.0188, 12.3, 1234; `outward`
    -1 / +1 rounds down / up instead of to the nearest (an interval's ends, so it never looks narrower)."""
    if v is None or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(float(v)):
        return "n/a"
    v = float(v)
    d = _decimals(v, significant)
    if outward:
        scaled = v * 10 ** d
        v = (math.floor(scaled + 1e-9) if outward < 0 else math.ceil(scaled - 1e-9)) / 10 ** d
    return f"{v:.{d}f}"


def fmt_ci(v: float | None, lo: float | None = None, hi: float | None = None, sign: bool = False) -> str:
    """`0.866 [0.84, 0.89]`: the value with 3 significant digits, the interval with 2, rounded outwards (none
    when NaN)."""
    text = fmt(v)
    if sign and text != "n/a" and float(v) > 0:
        text = "+" + text
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return text
    return f"{text} [{fmt(lo, 2, -1)}, {fmt(hi, 2, +1)}]"
