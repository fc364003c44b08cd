"""Reliability diagrams: accuracy against confidence per equal-width bin, with the bin counts underneath."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_kaz.evaluation.calibration import ReliabilityHistogram


def reliability_diagram(histograms: dict[str, ReliabilityHistogram], path: Path, title: str = "") -> None:
    """Write a PNG: top, accuracy (fraction of positive / correct voxels) against confidence per bin with the
    diagonal of perfect calibration; bottom, voxel count per bin (log scale). One histogram is drawn as bars
    with the calibration gap shaded; several (a method comparison) are overlaid as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.2, 6.4), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    single = len(histograms) == 1
    for i, (name, h) in enumerate(histograms.items()):
        b = h.bins()
        centres = (b["lower"] + b["upper"]) / 2
        width = 1.0 / h.n_bins
        label = f"{name} (ECE {h.ece():.4f})"
        if single:
            top.bar(b["lower"], b["accuracy"].fillna(0), width=width, align="edge", color="tab:blue",
                    edgecolor="k", lw=0.5, label=label)
            gap_lo = np.minimum(b["accuracy"], b["confidence"]).fillna(0)
            gap_hi = np.maximum(b["accuracy"], b["confidence"]).fillna(0)
            top.bar(b["lower"], gap_hi - gap_lo, bottom=gap_lo, width=width, align="edge", color="tab:red",
                    alpha=0.3, edgecolor="tab:red", lw=0.5, label="gap")
            bottom.bar(b["lower"], b["count"], width=width, align="edge", color="gray", edgecolor="k", lw=0.5)
            for x, n in zip(centres, b["count"]):
                if n:
                    bottom.text(x, n, f"{n:.0e}" if n >= 1e4 else str(int(n)), ha="center", va="bottom",
                                fontsize=6, rotation=90)
        else:
            top.plot(b["confidence"], b["accuracy"], "o-", ms=3, lw=1.2, label=label, color=f"C{i}")
            bottom.step(np.r_[b["lower"], 1.0], np.r_[b["count"], b["count"].iloc[-1]], where="post", lw=1.2,
                        color=f"C{i}")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy (observed frequency)")
    top.legend(fontsize=7, loc="upper left")
    if title:
        top.set_title(title, fontsize=10)
    bottom.set_yscale("log")
    bottom.set_ylabel("voxels per bin")
    bottom.set_xlabel("confidence (predicted probability)")
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.08, top=0.95, hspace=0.06)  # tight_layout: 0.5 s/figure
    fig.savefig(path, dpi=110)
    plt.close(fig)
