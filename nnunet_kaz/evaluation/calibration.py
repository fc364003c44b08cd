"""Calibration error of voxel probabilities, streamed over cases with histograms.

Definitions (N voxels with confidence c_i in [0, 1] and binary outcome y_i):
- ECE (Guo et al. 2017, the ECE Rel-UNet's paper 002 compares methods with): R equal-width bins, bin k holding
  k/R <= c < (k+1)/R (c = 1 in the last bin); ECE = sum_k (n_k / N) |acc_k - conf_k|, acc_k the mean outcome
  and conf_k the mean confidence of bin k. torchmetrics' `BinaryCalibrationError` uses the same bins except
  that it gives c = 1.0 exactly a bin of its own.
- ACE, adaptive ECE (Nguyen & O'Connor 2015, Nixon et al. 2019): the same sum over R equal-MASS bins, the
  voxels sorted by confidence and cut into R groups of N/R. Streaming approximation: confidences are first
  counted in fine bins (`histograms.unit_interval_key`, width 2^-11 of min(c, 1 - c)), and the fine bin that
  straddles an equal-mass boundary is split pro rata (voxels inside one fine bin are treated as ties). When
  every fine bin is entirely in one group the result is exact; otherwise the error is at most
  2 * sum_b m_b / N, m_b the count of the fine bin straddling boundary b.
- MCE: max_k |acc_k - conf_k| over the non-empty equal-width bins.
- Brier: mean squared error of the probability; for multi-class top-label rows the multi-class Brier score
  mean_i sum_c (p_ic - [y_i = c])^2 (ranges 0..2).

What (c, y) is, per row of `calibration.csv`:
- binary (C = 2): positive class, c = p_1, y = [gt = 1] (torchmetrics' binary convention);
- multi-class, class `top-label`: c = max_c p_c, y = [argmax_c p_c = gt];
- multi-class, class k: class-wise, c = p_k, y = [gt = k].
- multi-class, class `macro`: the mean of the class-wise rows' ECE / ACE / MCE / Brier over the foreground
  classes (the one-vs-rest calibration of every foreground class weighs the same however small; Kull et al.
  2019's classwise-ECE averages over all classes, background included: ours leaves the background out, which
  would otherwise dominate as it does a pooled ECE). A binary problem's positive-class row is its class-wise
  (and macro) figure.
Scopes: `all` every voxel; `roi` the voxels within `margin` (physical units) of ground truth or prediction
foreground, because the background, almost all confidently right, dominates a whole-volume ECE.

Intervals (`CalibrationSet.estimates`, `table(bootstrap)`): with a patient per case (`add_case(group=...)`)
each (scope, class) also keeps one small histogram per patient, and a bootstrap resample pools the histograms
of the drawn patients (with their multiplicity) and computes ECE / ACE / MCE / Brier from that pool, exactly as
from the data (`intervals` module: patient-level percentile bootstrap). ECE, MCE and Brier of a resample are
exact; for the ACE the per-patient fine bins are 2^7 times wider (relative width 2^-4 instead of 2^-11 of
min(c, 1 - c); 130 kB per patient, scope and class instead of 16 MB), so a resample's ACE carries the error bound
above with those bins. A patient's own value (for the paired Wilcoxon test) is the same statistic over its
voxels alone.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from nnunet_kaz.evaluation.histograms import N_UNIT_KEYS, unit_interval_key
from nnunet_kaz.evaluation.surface import bounding_box

CALIBRATION_METRICS = ("ece", "ace", "mce", "brier")
CALIBRATION_COLUMNS = ("scope", "class", *CALIBRATION_METRICS, "n_voxels")
PATIENT_FINE_SHIFT = 7  # per-patient ACE bins: 2^7 fine bins merged (module docstring)
_BLOCK = 1 << 18  # voxels per pass: the temporaries of a block stay in cache (~1.8x faster than whole arrays)


class ReliabilityHistogram:
    """Streaming reliability statistics of (confidence, outcome) pairs; see the module docstring.

    Memory is constant: R equal-width bins and, when `adaptive`, ~516k fine bins (12 MB) for the ACE.
    Counts are exact integers and sums float64, so the result does not depend on how the data is chunked
    beyond float64 rounding.
    """

    def __init__(self, n_bins: int = 15, adaptive: bool = True, fine_shift: int = 0):
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.adaptive = adaptive
        self.fine_shift = int(fine_shift)  # the fine bins of the ACE merged 2^fine_shift at a time (coarser)
        self.n_fine = ((N_UNIT_KEYS - 1) >> self.fine_shift) + 1
        # interleaved [bin, outcome] layout: one bincount over key = 2 * bin + outcome fills both
        self._count = np.zeros(2 * self.n_bins, dtype=np.int64)
        self._conf = np.zeros(2 * self.n_bins, dtype=np.float64)
        self._fine_count = np.zeros(2 * self.n_fine, dtype=np.int64) if adaptive else None
        self._fine_conf = np.zeros(2 * self.n_fine, dtype=np.float64) if adaptive else None
        self.sq_error = 0.0
        self.n = 0

    def add(self, confidence: np.ndarray, outcome: np.ndarray, squared_error: np.ndarray | None = None,
            also: "ReliabilityHistogram | None" = None) -> None:
        """Add voxels: confidences in [0, 1], binary outcomes of the same size, and optionally each voxel's
        Brier term (default (c - y)^2). `also` (same bins, fine bins as fine or coarser) receives the same
        voxels from the same pass (a patient's histogram next to the pooled one)."""
        if also is not None and (also.n_bins != self.n_bins or also.adaptive != self.adaptive
                                 or also.fine_shift < self.fine_shift):
            raise ValueError("`also` must have the same bins and fine bins at least as coarse")
        conf = np.asarray(confidence).ravel()
        out = np.asarray(outcome).ravel()
        if conf.size != out.size:
            raise ValueError(f"{conf.size} confidences but {out.size} outcomes")
        if conf.size == 0:
            return
        lo, hi = conf.min(), conf.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise ValueError(f"confidences must lie in [0, 1], got values in [{lo}, {hi}]")
        out = out.astype(bool, copy=False).view(np.uint8)
        for i in range(0, conf.size, _BLOCK):
            self._add_block(conf[i:i + _BLOCK], out[i:i + _BLOCK], squared_error is None, also)
        sq = float(np.sum(squared_error, dtype=np.float64)) if squared_error is not None else 0.0
        for h in (self, also) if also is not None else (self,):
            h.sq_error += sq
            h.n += conf.size

    def _add_block(self, conf: np.ndarray, out: np.ndarray, brier: bool,
                   also: "ReliabilityHistogram | None" = None) -> None:
        c64 = conf.astype(np.float64, copy=False)
        # c * R is exact in float64 for float32 c, so truncation gives the bin of the exact boundaries k / R.
        # The key 2 * bin + outcome is built in place in int32: this runs on every voxel of a dataset.
        key = np.multiply(conf, float(self.n_bins), dtype=np.float64).astype(np.int32)
        np.minimum(key, self.n_bins - 1, out=key)
        key <<= 1
        key += out
        count = np.bincount(key, minlength=2 * self.n_bins)
        conf_sum = np.bincount(key, weights=c64, minlength=2 * self.n_bins)
        targets = (self, also) if also is not None else (self,)
        for h in targets:
            h._count += count
            h._conf += conf_sum
        if self.adaptive:
            fkey = unit_interval_key(conf)
            if self.fine_shift:
                fkey >>= self.fine_shift
            fkey <<= 1
            fkey += out
            for h in targets:
                if h.fine_shift != self.fine_shift:  # drop the outcome bit and the finer bits, then re-add it
                    fkey >>= 1 + h.fine_shift - self.fine_shift
                    fkey <<= 1
                    fkey += out
                h._fine_count += np.bincount(fkey, minlength=2 * h.n_fine)
                h._fine_conf += np.bincount(fkey, weights=c64, minlength=2 * h.n_fine)
        if brier:
            # sum (c - y)^2 = sum c^2 - 2 sum_{y=1} c + sum y, from one pass and the bins just counted. einsum,
            # not np.dot: BLAS wakes its thread pool per call, which costs ~15 ms on a busy machine
            sq = float(np.einsum("i,i->", c64, c64))
            for h in targets:
                h.sq_error += sq - 2.0 * float(conf_sum[1::2].sum()) + float(count[1::2].sum())

    def merge(self, other: "ReliabilityHistogram") -> "ReliabilityHistogram":
        """Add another histogram's voxels (same bins) to this one; returns self."""
        if other.n_bins != self.n_bins or other.adaptive != self.adaptive or other.fine_shift != self.fine_shift:
            raise ValueError("cannot merge histograms with different bins")
        self._count += other._count
        self._conf += other._conf
        if self.adaptive:
            self._fine_count += other._fine_count
            self._fine_conf += other._fine_conf
        self.sq_error += other.sq_error
        self.n += other.n
        return self

    # per equal-width bin
    @property
    def counts(self) -> np.ndarray:
        return self._count[0::2] + self._count[1::2]

    @property
    def positives(self) -> np.ndarray:
        return self._count[1::2]

    @property
    def confidence_sums(self) -> np.ndarray:
        return self._conf[0::2] + self._conf[1::2]

    def bins(self) -> pd.DataFrame:
        """Reliability-diagram table: bin edges, voxel count, mean confidence and accuracy (NaN when empty)."""
        n = self.counts
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(n > 0, self.confidence_sums / n, np.nan)
            acc = np.where(n > 0, self.positives / n, np.nan)
        edges = np.arange(self.n_bins + 1) / self.n_bins
        return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "count": n, "confidence": conf,
                             "accuracy": acc})

    def ece(self) -> float:
        """Expected calibration error, equal-width bins (module docstring); NaN without voxels."""
        return float(ece_rows(self._count[None], self._conf[None], np.array([self.n]))[0])

    def mce(self) -> float:
        """Maximum calibration error over the non-empty equal-width bins; NaN without voxels."""
        return float(mce_rows(self._count[None], self._conf[None])[0])

    def ace(self) -> float:
        """Adaptive ECE, R equal-mass bins, from the fine histogram (module docstring); NaN without voxels."""
        if not self.adaptive:
            raise ValueError("this histogram was built with adaptive=False")
        return float(ace_rows(self._fine_count[None], self._fine_conf[None], np.array([self.n]), self.n_bins)[0])

    def brier(self) -> float:
        return self.sq_error / self.n if self.n else float("nan")

    def summary(self) -> dict[str, float]:
        return {"ece": self.ece(), "ace": self.ace() if self.adaptive else float("nan"), "mce": self.mce(),
                "brier": self.brier(), "n_voxels": self.n}


def ece_rows(count: np.ndarray, conf: np.ndarray, n: np.ndarray) -> np.ndarray:
    """ECE of each row of interleaved [bin, outcome] counts and confidence sums (B, 2R); NaN where n = 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(count[:, 1::2] - (conf[:, 0::2] + conf[:, 1::2])).sum(axis=1)
        return np.where(n > 0, gap / np.where(n > 0, n, 1), np.nan)


def mce_rows(count: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """MCE of each row (largest |accuracy - confidence| over the non-empty bins); NaN for an empty row."""
    n = count[:, 0::2] + count[:, 1::2]
    with np.errstate(invalid="ignore", divide="ignore"):
        gaps = np.where(n > 0, np.abs(count[:, 1::2] - (conf[:, 0::2] + conf[:, 1::2])) / np.where(n > 0, n, 1),
                        -np.inf)
    best = gaps.max(axis=1)
    return np.where(np.isfinite(best), best, np.nan)


def _cumulative(fine_count: np.ndarray, fine_conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative voxel counts, positives and confidence sums over the fine bins of each row (B, K + 1)."""
    zero = np.zeros((fine_count.shape[0], 1))
    return tuple(np.concatenate([zero, np.cumsum(a, axis=1)], axis=1) for a in
                 (fine_count[:, 0::2] + fine_count[:, 1::2], fine_count[:, 1::2], fine_conf[:, 0::2] + fine_conf[:, 1::2]))


def ace_rows(fine_count: np.ndarray, fine_conf: np.ndarray, n: np.ndarray, n_bins: int) -> np.ndarray:
    """Adaptive ECE of each row of fine histograms (B, 2K), interleaved [fine bin, outcome], with R = n_bins
    equal-mass bins (`ace_cumulative`)."""
    return ace_cumulative(*_cumulative(np.atleast_2d(fine_count), np.atleast_2d(fine_conf)), n, n_bins)


def ace_cumulative(cum_n: np.ndarray, cum_pos: np.ndarray, cum_conf: np.ndarray, n: np.ndarray,
                   n_bins: int) -> np.ndarray:
    """Adaptive ECE from each row's cumulative counts, positives and confidence sums over the fine bins: their
    values at the equal-mass boundaries n j / R, interpolated linearly inside the fine bin that straddles a
    boundary (pro rata; an empty fine bin is a flat step and never changes the result). NaN where n = 0."""
    n = np.atleast_1d(np.asarray(n, dtype=np.float64))
    rows, width = cum_n.shape
    edges = n[:, None] * np.arange(n_bins + 1) / n_bins
    # one searchsorted for every row: each row shifted past the previous one (the arithmetic below uses the
    # unshifted values)
    shift = np.arange(rows)[:, None] * (float(cum_n[:, -1].max(initial=0.0)) + 1.0)
    at = np.searchsorted((cum_n + shift).ravel(), (edges + shift).ravel(), side="right") - 1
    start = np.repeat(np.arange(rows) * width, n_bins + 1)
    at = np.clip(at, start, start + width - 2)
    flat_n, q = cum_n.ravel(), edges.ravel()
    x0, x1 = flat_n[at], flat_n[at + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x1 > x0, (q - x0) / np.where(x1 > x0, x1 - x0, 1), 0.0)

        def at_edges(cum):
            f = cum.ravel()
            return (f[at] + t * (f[at + 1] - f[at])).reshape(rows, n_bins + 1)

        gap = np.abs(np.diff(at_edges(cum_pos), axis=1) - np.diff(at_edges(cum_conf), axis=1)).sum(axis=1)
        return np.where(n > 0, gap / np.where(n > 0, n, 1), np.nan)


def stacked_metrics(histograms: Sequence[ReliabilityHistogram], weights: np.ndarray,
                    chunk: int = 512) -> dict[str, np.ndarray]:
    """ECE, ACE, MCE and Brier of the pools `weights @ histograms` (B pools of P histograms, e.g. bootstrap
    resamples of patients, or the identity for each histogram alone): arrays of length B."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    first = histograms[0]
    count = np.stack([h._count for h in histograms]).astype(np.float64)
    conf = np.stack([h._conf for h in histograms])
    sq = np.array([h.sq_error for h in histograms])
    n = np.array([h.n for h in histograms], dtype=np.float64)
    pool_n, pool_count, pool_conf = w @ n, w @ count, w @ conf
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"ece": ece_rows(pool_count, pool_conf, pool_n), "mce": mce_rows(pool_count, pool_conf),
               "brier": np.where(pool_n > 0, (w @ sq) / np.where(pool_n > 0, pool_n, 1), np.nan),
               "ace": np.full(w.shape[0], np.nan)}
    if first.adaptive:
        # only the fine bins some histogram uses (a 2D slice fills a few thousand of them); cumulative sums are
        # linear, so a pool's are the weighted sums of each histogram's
        fc = np.stack([h._fine_count for h in histograms])
        used = np.flatnonzero((fc[:, 0::2] + fc[:, 1::2]).any(axis=0))
        cols = np.stack([2 * used, 2 * used + 1], axis=1).ravel()
        cums = _cumulative(fc[:, cols].astype(np.float64), np.stack([h._fine_conf[cols] for h in histograms]))
        for lo in range(0, w.shape[0], chunk):  # (chunk, used) temporaries
            wc = w[lo:lo + chunk]
            out["ace"][lo:lo + chunk] = ace_cumulative(*(wc @ c for c in cums), pool_n[lo:lo + chunk], first.n_bins)
    return out


def roi_mask(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], margin: float) -> np.ndarray:
    """Voxels within `margin` (physical units, Euclidean) of ground-truth or prediction foreground.

    The distance transform runs on the foreground's bounding box grown by the margin, not on the volume."""
    fg = (gt > 0) | (pred > 0)
    roi = np.zeros(fg.shape, dtype=bool)
    box = bounding_box(fg)
    if box is None:
        return roi
    sp = np.asarray(spacing, dtype=np.float64)
    grow = np.ceil(margin / sp).astype(int)
    big = tuple(slice(max(0, b.start - g), min(s, b.stop + g)) for b, g, s in zip(box, grow, fg.shape))
    roi[big] = ndimage.distance_transform_edt(~fg[big], sampling=sp) <= margin
    return roi


class CalibrationSet:
    """The histograms behind `calibration.csv`: one per (scope, class), fed one case at a time; with a patient
    per case also one coarser histogram per (scope, class, patient) for the intervals (module docstring)."""

    SCOPES = ("all", "roi")
    MACRO = "macro"

    def __init__(self, n_bins: int = 15, labels: Sequence[int] = (1,), adaptive: bool = True):
        self.n_bins = n_bins
        self.labels = [int(v) for v in labels]
        self.adaptive = adaptive
        self.histograms: dict[tuple[str, str], ReliabilityHistogram] = {}
        self.by_patient: dict[tuple[str, str], dict[str, ReliabilityHistogram]] = {}
        self.n_classes: int | None = None
        self._estimates: dict[tuple, dict] = {}  # estimates() after the last case, by arguments

    def _hist(self, scope: str, cls: str) -> ReliabilityHistogram:
        key = (scope, cls)
        if key not in self.histograms:
            self.histograms[key] = ReliabilityHistogram(self.n_bins, self.adaptive)
        return self.histograms[key]

    def _patient_hist(self, scope: str, cls: str, patient: str | None) -> ReliabilityHistogram | None:
        if patient is None:
            return None
        hists = self.by_patient.setdefault((scope, cls), {})
        if patient not in hists:
            hists[patient] = ReliabilityHistogram(self.n_bins, self.adaptive, PATIENT_FINE_SHIFT)
        return hists[patient]

    def add_case(self, probs: np.ndarray, gt: np.ndarray, roi: np.ndarray | None = None,
                 group: str | None = None) -> None:
        """Add one case: softmax probabilities (C, *spatial), integer ground truth, an optional ROI mask and the
        case's patient (`group`, for the intervals)."""
        c = probs.shape[0]
        if self.n_classes is None:
            self.n_classes = c
        elif c != self.n_classes:
            raise ValueError(f"cases disagree on the number of classes: {self.n_classes} and {c}")
        scopes = [("all", None)] + ([("roi", roi)] if roi is not None else [])
        if c == 2:
            items = [("1", probs[1], gt == 1, None)]
        else:
            top = probs.argmax(0)
            conf = np.take_along_axis(probs, top[None], 0)[0]
            p_true = np.take_along_axis(probs, gt[None].astype(np.intp), 0)[0].astype(np.float64)
            brier = np.einsum("c...,c...->...", probs, probs, dtype=np.float64) - 2.0 * p_true + 1.0
            items = [("top-label", conf, top == gt, brier)]
            items += [(str(k), probs[k], gt == k, None) for k in self.labels]
        for cls, conf, outcome, sq in items:
            for scope, mask in scopes:
                also = self._patient_hist(scope, cls, group)
                if mask is None:
                    self._hist(scope, cls).add(conf, outcome, sq, also=also)
                else:
                    self._hist(scope, cls).add(conf[mask], outcome[mask], None if sq is None else sq[mask],
                                               also=also)

    # --- after the last case ------------------------------------------------------------------------------
    def classwise(self) -> list[str]:
        """The class-wise rows (one-vs-rest per foreground class): ["1"] for a binary problem."""
        return ["1"] if self.n_classes == 2 else [str(k) for k in self.labels]

    def main_class(self) -> str | None:
        """The headline row: `top-label` for several classes, the positive class `1` for two."""
        if not self.histograms:
            return None
        return "top-label" if any(c == "top-label" for _, c in self.histograms) else "1"

    def estimates(self, scope: str, cls: str, patients: Sequence[str] | None = None,
                  weights: np.ndarray | None = None) -> dict[str, "Estimate"]:
        """ECE / ACE / MCE / Brier of one row (`macro`: the mean over `classwise()`), with the values of the
        pools of `weights` (B, P) over `patients` (bootstrap resamples) and each patient's own value. Empty dict
        when the row has no voxels."""
        from nnunet_kaz.evaluation.intervals import Estimate

        key = (scope, cls, tuple(patients) if patients is not None else None, id(weights),
               sum(h.n for h in self.histograms.values()))
        if key in self._estimates and self._estimates[key][0] is weights:
            return {m: copy.copy(e) for m, e in self._estimates[key][1].items()}
        classes = self.classwise() if cls == self.MACRO else [cls]
        if any((scope, k) not in self.histograms or not self.histograms[(scope, k)].n for k in classes):
            return {}
        values = [self.histograms[(scope, k)].summary() for k in classes]
        out = {m: Estimate(float(np.mean([v[m] for v in values]))) for m in CALIBRATION_METRICS}
        if patients is None or any((scope, k) not in self.by_patient for k in classes):
            return out
        empty = ReliabilityHistogram(self.n_bins, self.adaptive, PATIENT_FINE_SHIFT)
        stacks = [[self.by_patient[(scope, k)].get(p, empty) for p in patients] for k in classes]
        own = [stacked_metrics(st, np.eye(len(patients))) for st in stacks]
        pooled = [stacked_metrics(st, weights) for st in stacks] if weights is not None else None
        for m in CALIBRATION_METRICS:
            out[m].per_patient = np.mean([o[m] for o in own], axis=0)
            if pooled is not None:
                out[m].resampled = np.mean([o[m] for o in pooled], axis=0)
        self._estimates[key] = (weights, out)
        return {m: copy.copy(e) for m, e in out.items()}

    def table(self, patients: Sequence[str] | None = None, bootstrap=None) -> pd.DataFrame:
        """`calibration.csv` rows: scope, class (top-label, the classes, macro), ece, ace, mce, brier, n_voxels;
        with `patients` and an active `bootstrap` (intervals.Bootstrap) also M_ci_low / M_ci_high."""
        def order(key: tuple[str, str]) -> tuple:
            scope, cls = key
            return (self.SCOPES.index(scope), cls != "top-label", int(cls) if cls.isdigit() else 1 << 30)

        keys = sorted(self.histograms, key=order)
        if self.n_classes is not None and self.n_classes > 2:
            for scope in self.SCOPES:
                last = max((i for i, (s, _) in enumerate(keys) if s == scope), default=None)
                if last is not None:
                    keys.insert(last + 1, (scope, self.MACRO))
        with_ci = patients is not None and bootstrap is not None and bootstrap.active and self.by_patient
        weights = bootstrap.weights(len(patients)) if with_ci else None
        rows = []
        for scope, cls in keys:
            est = self.estimates(scope, cls, patients if with_ci else None, weights)
            n = self.histograms[(scope, self.classwise()[0] if cls == self.MACRO else cls)].n
            row = {"scope": scope, "class": cls, **{m: (e.value if (e := est.get(m)) else np.nan)
                                                    for m in CALIBRATION_METRICS}, "n_voxels": n}
            if with_ci:
                for m in CALIBRATION_METRICS:
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = bootstrap.interval(est[m].resampled if m in est
                                                                                  else None)
            rows.append(row)
        ci = [f"{m}_{e}" for m in CALIBRATION_METRICS for e in ("ci_low", "ci_high")] if with_ci else []
        return pd.DataFrame(rows, columns=[*CALIBRATION_COLUMNS, *ci])
