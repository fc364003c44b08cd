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
Scopes: `all` every voxel; `roi` the voxels within `margin` (physical units) of ground truth or prediction
foreground, because the background, almost all confidently right, dominates a whole-volume ECE.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from nnunet_kaz.evaluation.histograms import N_UNIT_KEYS, unit_interval_key
from nnunet_kaz.evaluation.surface import bounding_box

CALIBRATION_COLUMNS = ("scope", "class", "ece", "ace", "mce", "brier", "n_voxels")
_BLOCK = 1 << 18  # voxels per pass: the temporaries of a block stay in cache (~1.8x faster than whole arrays)


class ReliabilityHistogram:
    """Streaming reliability statistics of (confidence, outcome) pairs; see the module docstring.

    Memory is constant: R equal-width bins and, when `adaptive`, ~516k fine bins (12 MB) for the ACE.
    Counts are exact integers and sums float64, so the result does not depend on how the data is chunked
    beyond float64 rounding.
    """

    def __init__(self, n_bins: int = 15, adaptive: bool = True):
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.adaptive = adaptive
        # interleaved [bin, outcome] layout: one bincount over key = 2 * bin + outcome fills both
        self._count = np.zeros(2 * self.n_bins, dtype=np.int64)
        self._conf = np.zeros(2 * self.n_bins, dtype=np.float64)
        self._fine_count = np.zeros(2 * N_UNIT_KEYS, dtype=np.int64) if adaptive else None
        self._fine_conf = np.zeros(2 * N_UNIT_KEYS, dtype=np.float64) if adaptive else None
        self.sq_error = 0.0
        self.n = 0

    def add(self, confidence: np.ndarray, outcome: np.ndarray, squared_error: np.ndarray | None = None) -> None:
        """Add voxels: confidences in [0, 1], binary outcomes of the same size, and optionally each voxel's
        Brier term (default (c - y)^2)."""
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
            self._add_block(conf[i:i + _BLOCK], out[i:i + _BLOCK], squared_error is None)
        if squared_error is not None:
            self.sq_error += float(np.sum(squared_error, dtype=np.float64))
        self.n += conf.size

    def _add_block(self, conf: np.ndarray, out: np.ndarray, brier: bool) -> None:
        c64 = conf.astype(np.float64, copy=False)
        # c * R is exact in float64 for float32 c, so truncation gives the bin of the exact boundaries k / R.
        # The key 2 * bin + outcome is built in place in int32: this runs on every voxel of a dataset.
        key = np.multiply(conf, float(self.n_bins), dtype=np.float64).astype(np.int32)
        np.minimum(key, self.n_bins - 1, out=key)
        key <<= 1
        key += out
        count = np.bincount(key, minlength=2 * self.n_bins)
        conf_sum = np.bincount(key, weights=c64, minlength=2 * self.n_bins)
        self._count += count
        self._conf += conf_sum
        if self.adaptive:
            fkey = unit_interval_key(conf)
            fkey <<= 1
            fkey += out
            self._fine_count += np.bincount(fkey, minlength=2 * N_UNIT_KEYS)
            self._fine_conf += np.bincount(fkey, weights=c64, minlength=2 * N_UNIT_KEYS)
        if brier:
            # sum (c - y)^2 = sum c^2 - 2 sum_{y=1} c + sum y, from one pass and the bins just counted. einsum,
            # not np.dot: BLAS wakes its thread pool per call, which costs ~15 ms on a busy machine
            sq = float(np.einsum("i,i->", c64, c64))
            self.sq_error += sq - 2.0 * float(conf_sum[1::2].sum()) + float(count[1::2].sum())

    def merge(self, other: "ReliabilityHistogram") -> "ReliabilityHistogram":
        """Add another histogram's voxels (same bins) to this one; returns self."""
        if other.n_bins != self.n_bins or other.adaptive != self.adaptive:
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
        if self.n == 0:
            return float("nan")
        return float(np.abs(self.positives - self.confidence_sums).sum() / self.n)

    def mce(self) -> float:
        """Maximum calibration error over the non-empty equal-width bins; NaN without voxels."""
        n = self.counts
        if self.n == 0:
            return float("nan")
        gaps = np.abs(self.positives[n > 0] - self.confidence_sums[n > 0]) / n[n > 0]
        return float(gaps.max())

    def ace(self) -> float:
        """Adaptive ECE, R equal-mass bins, from the fine histogram (module docstring); NaN without voxels."""
        if not self.adaptive:
            raise ValueError("this histogram was built with adaptive=False")
        if self.n == 0:
            return float("nan")
        count = self._fine_count[0::2] + self._fine_count[1::2]
        keep = count > 0
        cum_n = np.concatenate([[0.0], np.cumsum(count[keep])]).astype(np.float64)
        cum_pos = np.concatenate([[0.0], np.cumsum(self._fine_count[1::2][keep])]).astype(np.float64)
        cum_conf = np.concatenate([[0.0], np.cumsum((self._fine_conf[0::2] + self._fine_conf[1::2])[keep])])
        # cumulative sums at the equal-mass boundaries, interpolated inside the straddling fine bin (pro rata)
        edges = self.n * np.arange(self.n_bins + 1) / self.n_bins
        pos = np.interp(edges, cum_n, cum_pos)
        conf = np.interp(edges, cum_n, cum_conf)
        return float(np.abs(np.diff(pos) - np.diff(conf)).sum() / self.n)

    def brier(self) -> float:
        return self.sq_error / self.n if self.n else float("nan")

    def summary(self) -> dict[str, float]:
        return {"ece": self.ece(), "ace": self.ace() if self.adaptive else float("nan"), "mce": self.mce(),
                "brier": self.brier(), "n_voxels": self.n}


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
    """The histograms behind `calibration.csv`: one per (scope, class), fed one case at a time."""

    SCOPES = ("all", "roi")

    def __init__(self, n_bins: int = 15, labels: Sequence[int] = (1,), adaptive: bool = True):
        self.n_bins = n_bins
        self.labels = [int(v) for v in labels]
        self.adaptive = adaptive
        self.histograms: dict[tuple[str, str], ReliabilityHistogram] = {}
        self.n_classes: int | None = None

    def _hist(self, scope: str, cls: str) -> ReliabilityHistogram:
        key = (scope, cls)
        if key not in self.histograms:
            self.histograms[key] = ReliabilityHistogram(self.n_bins, self.adaptive)
        return self.histograms[key]

    def add_case(self, probs: np.ndarray, gt: np.ndarray, roi: np.ndarray | None = None) -> None:
        """Add one case: softmax probabilities (C, *spatial), integer ground truth and an optional ROI mask."""
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
                if mask is None:
                    self._hist(scope, cls).add(conf, outcome, sq)
                else:
                    self._hist(scope, cls).add(conf[mask], outcome[mask], None if sq is None else sq[mask])

    def table(self) -> pd.DataFrame:
        """`calibration.csv` rows: scope, class, ece, ace, mce, brier, n_voxels."""
        def order(key: tuple[str, str]) -> tuple:
            scope, cls = key
            return (self.SCOPES.index(scope), cls != "top-label", int(cls) if cls.isdigit() else -1)

        rows = [{"scope": s, "class": c, **self.histograms[(s, c)].summary()}
                for s, c in sorted(self.histograms, key=order)]
        return pd.DataFrame(rows, columns=list(CALIBRATION_COLUMNS))
