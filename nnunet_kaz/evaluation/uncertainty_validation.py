"""Does voxel uncertainty flag the voxel errors? Paper 000 section 2.4 / Fig. 4, plus an error-detection AUROC.

Threshold analysis (paper 000 section 2.4, after Mehta's QU-BraTS filtering):
- The uncertainty map U is, by default, the entropy in the predictor's `{case}_uncertainty.npz`: that of the
  UNcalibrated samples (as the authors' `compute_uncertainty_metrics`), the same whether or not the predictions
  were calibrated; the normalized entropy of given probabilities only when asked (`evaluate --probs-entropy`).
- U is scaled to 0..100 per slice as the authors' code does: `scaling="slice"` (default), 100 U / max U on each
  2D slice (each slice along the first axis of a 3D volume, nnU-Net's axial (z, y, x) order; a 2D image is one
  slice); the paper's "normalizing the entropy estimates per slice ... between 0 and 100". `scaling="case"`:
  100 U / max U over the whole case (for 2D images the same); `scaling="absolute"`: 100 U for maps already in
  [0, 1], comparable across cases. A slice (or case) whose U is 0 everywhere stays 0.
- For each threshold T (100, 75, 50, 25) a voxel with scaled U > T is `uncertain`; every other voxel is
  compared with the ground truth: TP (prediction and ground truth), FP (prediction only), FN (ground truth
  only); the remaining true negatives are not a class of the paper but `uncertain_tn` counts the uncertain
  ones. T = 100 marks nothing uncertain, so its counts are the plain confusion counts.
- `filtered_tp` / `filtered_fp` / `filtered_fn` are the fractions of all TP / FP / FN voxels marked uncertain
  at T. A useful uncertainty filters FP and FN first and keeps TP as T drops (paper 000 Fig. 4).

AUROC: the area under the ROC curve of the voxel uncertainty as a detector of voxel errors (prediction label
!= ground-truth label), i.e. the probability that a random error voxel is more uncertain than a random correct
voxel, ties counting one half (Mann-Whitney). Computed from streaming fine histograms
(`histograms.nonnegative_key`, bin width 2^-11 of the value) instead of sklearn's `roc_auc_score`, which needs
every voxel of every case in memory plus a sort (1e8 voxels: several GB): values sharing a fine bin count as
ties, so the result equals sklearn's when no error and correct voxel share a bin, and differs by at most half
the fraction of (error, correct) pairs that share one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_kaz.evaluation.histograms import N_NONNEGATIVE_KEYS, nonnegative_key

THRESHOLDS = (100, 75, 50, 25)
_BLOCK = 1 << 20
THRESHOLD_COLUMNS = ("tp", "fp", "fn", "uncertain", "uncertain_tn", "filtered_tp", "filtered_fp", "filtered_fn")


SCALINGS = ("slice", "case", "absolute")


def scaled_uncertainty(u: np.ndarray, scaling: str = "slice") -> np.ndarray:
    """Uncertainty scaled to 0..100 (float32): 100 U / max U per 2D slice (`slice`, the authors'), over the
    whole case (`case`), or 100 U (`absolute`); see the module docstring."""
    u = np.asarray(u, dtype=np.float32)
    if scaling == "absolute":
        return np.clip(u * np.float32(100.0), 0.0, 100.0)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    per_slice = scaling == "slice" and u.ndim >= 3
    peak = u.reshape(u.shape[0], -1).max(1).reshape((-1,) + (1,) * (u.ndim - 1)) if per_slice else u.max()
    peak = np.asarray(peak, dtype=np.float32)
    scale = np.divide(np.float32(100.0), peak, out=np.zeros_like(peak), where=peak > 0)
    return (u * scale).clip(0.0, 100.0)


def threshold_counts(pred: np.ndarray, gt: np.ndarray, u100: np.ndarray,
                     thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, float]]:
    """Per threshold T: certain TP / FP / FN voxels, uncertain voxels and the filtered fractions (module)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    # the scaled uncertainty at the (few) TP, FP and FN voxels; the threshold loop then works on those only
    u_tp, u_fp, u_fn = u100[pred & gt], u100[pred & ~gt], u100[~pred & gt]
    rows = []
    for t in thresholds:
        n_unc = int(np.count_nonzero(u100 > t))
        unc = [int(np.count_nonzero(u > t)) for u in (u_tp, u_fp, u_fn)]
        totals = (u_tp.size, u_fp.size, u_fn.size)
        row = {"T": t, "tp": totals[0] - unc[0], "fp": totals[1] - unc[1], "fn": totals[2] - unc[2],
               "uncertain": n_unc, "uncertain_tn": n_unc - sum(unc)}
        for name, k, n in zip(("filtered_tp", "filtered_fp", "filtered_fn"), unc, totals):
            row[name] = k / n if n else float("nan")
        rows.append(row)
    return rows


class ErrorAuroc:
    """Streaming AUROC of voxel uncertainty for detecting voxel errors (module docstring)."""

    def __init__(self) -> None:
        self._hist = np.zeros(2 * N_NONNEGATIVE_KEYS, dtype=np.int64)  # [key, is_error] interleaved

    def add(self, uncertainty: np.ndarray, error: np.ndarray) -> None:
        u = np.asarray(uncertainty).ravel()
        e = np.asarray(error, dtype=bool).ravel()
        if u.size != e.size:
            raise ValueError(f"{u.size} uncertainty values but {e.size} error flags")
        if u.size == 0:
            return
        if not (u.min() >= 0 and np.isfinite(u.max())):
            raise ValueError("uncertainty values must be finite and >= 0")
        flags = e.view(np.uint8)
        for i in range(0, u.size, _BLOCK):  # blocks whose temporaries stay in cache
            key = nonnegative_key(u[i:i + _BLOCK])
            key <<= 1
            key += flags[i:i + _BLOCK]
            self._hist += np.bincount(key, minlength=self._hist.size)

    def merge(self, other: "ErrorAuroc") -> "ErrorAuroc":
        self._hist += other._hist
        return self

    @property
    def n_errors(self) -> int:
        return int(self._hist[1::2].sum())

    @property
    def n_voxels(self) -> int:
        return int(self._hist.sum())

    def auroc(self) -> float:
        """P(U_error > U_correct) + P(same fine bin) / 2; NaN unless both errors and correct voxels exist."""
        ok = self._hist[0::2].astype(np.float64)
        err = self._hist[1::2].astype(np.float64)
        n_ok, n_err = ok.sum(), err.sum()
        if n_ok == 0 or n_err == 0:
            return float("nan")
        ok_below = np.cumsum(ok) - ok
        return float((np.dot(err, ok_below) + 0.5 * np.dot(err, ok)) / (n_ok * n_err))


def figure_slice(gt: np.ndarray, pred: np.ndarray) -> int | None:
    """Index along axis 0 of a 3D case with the most ground-truth or predicted voxels (None for 2D)."""
    if gt.ndim == 2:
        return None
    fg = (gt > 0) | (pred > 0)
    return int(np.argmax(fg.reshape(fg.shape[0], -1).sum(1)))


def uncertainty_figure(path: Path, gt: np.ndarray, pred: np.ndarray, prob: np.ndarray, u100: np.ndarray,
                       image: np.ndarray | None = None, thresholds: Sequence[float] = THRESHOLDS,
                       title: str = "") -> None:
    """Paper 000 Fig. 4 for one 2D slice: image, ground truth, prediction, probability, uncertainty, then the
    TP (green) / FP (red) / FN (blue) / uncertain (yellow) overlay at each threshold. Writes a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    gt, pred = gt.astype(bool), pred.astype(bool)
    if image is None:
        base = np.zeros(gt.shape, dtype=np.float32)
    else:
        image = np.asarray(image, dtype=np.float32)
        lo, hi = np.percentile(image, [0.5, 99.5])
        base = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    colours = {"TP": (0.1, 0.8, 0.1), "FP": (0.9, 0.1, 0.1), "FN": (0.1, 0.3, 1.0), "uncertain": (1.0, 0.85, 0.0)}
    panels = [("image", base, "gray"), ("ground truth", gt, "gray"), ("prediction", pred, "gray"),
              ("probability", prob, "viridis"), ("uncertainty (0-100)", u100, "magma")]
    n_cols = max(len(panels), len(thresholds))
    fig, axes = plt.subplots(2, n_cols, figsize=(2.6 * n_cols, 5.6), squeeze=False)
    for ax, (name, arr, cmap) in zip(axes[0], panels):
        im = ax.imshow(arr, cmap=cmap, vmin=0, vmax=100 if name.startswith("uncertainty") else 1,
                       interpolation="nearest")
        ax.set_title(name, fontsize=9)
        if name in ("probability", "uncertainty (0-100)"):
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax, t in zip(axes[1], thresholds):
        rgb = np.repeat(base[..., None], 3, axis=-1) * 0.6
        unc = u100 > t
        for name, mask in (("TP", pred & gt), ("FP", pred & ~gt), ("FN", ~pred & gt)):
            rgb[mask & ~unc] = colours[name]
        rgb[unc & (pred | gt)] = colours["uncertain"]
        rgb[unc & ~(pred | gt)] = 0.5 * rgb[unc & ~(pred | gt)] + 0.5 * np.array(colours["uncertain"])
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"T = {t:g}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes[0][len(panels):]) + list(axes[1][len(thresholds):]):
        ax.axis("off")
    fig.legend(handles=[Patch(color=c, label=n) for n, c in colours.items()], loc="lower center", ncol=4,
               fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.08, top=0.88 if title else 0.93, wspace=0.15, hspace=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
