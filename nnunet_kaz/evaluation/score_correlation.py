"""Per-image uncertainty scores against segmentation quality (paper 004 tables 1-2: Spearman correlation).

The predictor's `scores.csv` holds one row per case and label: columns `case, label`, the scores
(`mean_entropy, relunet_score, relunet_score_eq9, relunet_score_cross, cv, pairwise_dice, pairwise_dice_pooled,
labelled_uncertainty`; any further numeric column is treated as a score too) and bookkeeping (`n_members,
n_samples`, and `conformal_volume` of predict --conformal: not scores). Each score is correlated with the
per-case Dice of `metrics.csv` (Spearman's rho and its two-sided p-value, scipy.stats.spearmanr). A good
uncertainty score correlates NEGATIVELY with Dice (paper 004), pairwise Dice positively. Rows whose score or
Dice is NaN are dropped and counted; fewer than 3 pairs or a constant column give NaN.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_kaz.errors import KazError

NOT_SCORES = ("case", "label", "n_members", "n_samples", "conformal_volume")  # bookkeeping, not scores
CORRELATION_COLUMNS = ("label", "score", "metric", "spearman_rho", "p_value", "n", "n_dropped")


def read_scores(path: Path) -> pd.DataFrame:
    """Read a predictor `scores.csv`, checking it has `case`, `label` and at least one score column."""
    try:
        df = pd.read_csv(path, dtype={"case": str})
    except Exception as e:
        raise KazError(f"cannot read scores table {path}: {e}") from e
    missing = [c for c in ("case", "label") if c not in df.columns]
    if missing:
        raise KazError(f"{path}: missing column(s) {missing}; expected case, label and score columns")
    if not score_columns(df):
        raise KazError(f"{path}: no numeric score column besides {list(NOT_SCORES)}")
    return df


def score_columns(scores: pd.DataFrame) -> list[str]:
    return [c for c in scores.columns if c not in NOT_SCORES and pd.api.types.is_numeric_dtype(scores[c])]


def _label_key(labels: pd.Series) -> pd.Series:
    """Label values (ints) or names (KiTS23 regions such as "mass"), one type for matching."""
    return labels.astype(int) if pd.api.types.is_numeric_dtype(labels) else labels.astype(str)


def joined(scores: pd.DataFrame, metrics: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Scores and the metric matched on (case, label); errors listing cases that appear in only one table.
    Labels are label values or, for region-based KiTS23 scores, region names (matched with kits23.csv)."""
    s = scores.assign(case=scores["case"].astype(str), label=_label_key(scores["label"]))
    m = metrics[["case", "label", metric]].assign(case=metrics["case"].astype(str),
                                                 label=_label_key(metrics["label"]))
    merged = s.merge(m, on=["case", "label"], how="outer", indicator=True)
    only_scores = merged.loc[merged["_merge"] == "left_only", "case"].unique().tolist()
    if only_scores:
        raise KazError(f"scores.csv has cases/labels without metrics: {sorted(only_scores)[:20]}")
    return merged[merged["_merge"] == "both"].drop(columns="_merge")


def score_correlations(scores: pd.DataFrame, metrics: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Spearman rho and p-value of every score against `metric`, per label and over all labels pooled
    (label `all`, only when there are several). Columns: label, score, metric, spearman_rho, p_value, n,
    n_dropped."""
    from scipy.stats import spearmanr

    data = joined(scores, metrics, metric)
    groups = [(str(lab), g) for lab, g in data.groupby("label")]
    if len(groups) > 1:
        groups.append(("all", data))
    rows = []
    for label, g in groups:
        for col in score_columns(scores):
            ok = g[col].notna() & g[metric].notna() & np.isfinite(g[col]) & np.isfinite(g[metric])
            x, y = g.loc[ok, col].to_numpy(float), g.loc[ok, metric].to_numpy(float)
            rho = p = float("nan")
            if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = spearmanr(x, y)
                rho, p = float(res.statistic), float(res.pvalue)
            rows.append({"label": label, "score": col, "metric": metric, "spearman_rho": rho, "p_value": p,
                         "n": int(ok.sum()), "n_dropped": int((~ok).sum())})
    return pd.DataFrame(rows, columns=list(CORRELATION_COLUMNS))


def score_scatter(scores: pd.DataFrame, metrics: pd.DataFrame, path: Path, metric: str = "dice") -> None:
    """One scatter panel per score against `metric` (colour = label), titled with Spearman's rho; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = joined(scores, metrics, metric)
    cols = score_columns(scores)
    corr = score_correlations(scores, metrics, metric)
    n = len(cols)
    n_cols = min(3, n)
    n_rows = int(np.ceil(n / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols, 3.2 * n_rows), squeeze=False)
    pooled = "all" if (corr["label"] == "all").any() else None
    for ax, col in zip(axes.ravel(), cols):
        for i, (lab, g) in enumerate(data.groupby("label")):
            ax.scatter(g[col], g[metric], s=12, alpha=0.7, color=f"C{i}",
                       label=f"label {lab}" if isinstance(lab, (int, np.integer)) else str(lab))
        r = corr[(corr["score"] == col) & (corr["label"] == (pooled or corr["label"].iloc[0]))].iloc[0]
        ax.set_title(f"{col}\nrho = {r.spearman_rho:.3f}, p = {r.p_value:.2g}, n = {r.n}", fontsize=9)
        ax.set_xlabel(col)
        ax.set_ylabel(metric)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if data["label"].nunique() > 1:
        axes.ravel()[0].legend(fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.88, wspace=0.35, hspace=0.6)
    fig.savefig(path, dpi=100)
    plt.close(fig)
