"""Paper 000's Table 1 from per-slice metrics: precision, recall, DSC, Jaccard, MAD, MSD, HD as mean +- SD over the
test slices, one row per method (and label, when there are several).

Definitions (the columns of `evaluate`'s metrics.csv, `overlap.py` and `surface.py`):
- precision = TP / (TP + FP), recall = TP / (TP + FN), DSC = 2 TP / (2 TP + FP + FN), Jaccard = TP / (TP + FP + FN)
  per slice (both masks empty: 1);
- MAD = mean absolute distance of the prediction's surface pixels to the ground-truth surface; MSD = the same
  distances signed, NEGATIVE for prediction surface pixels inside the ground truth (under-segmentation pulls MSD
  below 0, over-segmentation above); HD = the symmetric Hausdorff distance (larger of the two directed maxima);
  in the image spacing: pixels for PNG/BMP slices (paper 000's unit), mm for NIfTI volumes. Undefined when
  exactly one of the two masks is empty: such slices are left out of that column's mean and SD and counted in
  `{metric}_n_undefined`.
- mean and SD over slices: the sample standard deviation (ddof 1; the paper does not say which); pooled over the
  outer folds' test slices, each slice once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_path

# (metrics.csv column, paper 000 Table 1 heading)
TABLE1_COLUMNS = (("precision", "Precision"), ("recall", "Recall"), ("dice", "DSC"), ("jaccard", "Jaccard"),
                  ("mad", "MAD"), ("msd", "MSD"), ("hd", "HD"))
DISTANCE_COLUMNS = ("mad", "msd", "hd")
IMAGE_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def distance_unit(file_ending: str) -> str:
    """'pixels' for 2D image files (spacing 1), 'mm' for medical volumes (their spacing)."""
    return "pixels" if file_ending.lower() in IMAGE_ENDINGS else "mm"


def table1(metrics_by_method: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per method and label: n_slices and, per Table 1 column, `{col}_mean`, `{col}_sd` (ddof 1) over the
    slices where it is defined (distances: `{col}_n_undefined` slices left out). `metrics_by_method` holds
    evaluate's metrics.csv frames (columns case, label, precision, recall, dice, jaccard, mad, msd, hd)."""
    rows = []
    for method, metrics in metrics_by_method.items():
        missing = [c for c in ("case", "label", *(c for c, _ in TABLE1_COLUMNS)) if c not in metrics.columns]
        if missing:
            raise KazError(f"{method}: the metrics lack the column(s) {missing} (evaluate's metrics.csv has them)")
        for label, group in metrics.groupby("label", sort=True):
            if group["case"].duplicated().any():
                raise KazError(f"{method}: a slice appears twice for label {label}; pool each test slice once")
            row = {"method": method, "label": label, "n_slices": int(len(group))}
            for col, _ in TABLE1_COLUMNS:
                values = group[col].astype(float)
                defined = values.dropna()
                row[f"{col}_mean"] = float(defined.mean()) if len(defined) else np.nan
                row[f"{col}_sd"] = float(defined.std(ddof=1)) if len(defined) > 1 else np.nan
                if col in DISTANCE_COLUMNS:
                    row[f"{col}_n_undefined"] = int(values.isna().sum())
            rows.append(row)
    if not rows:
        raise KazError("no metrics to put in Table 1")
    return pd.DataFrame(rows)


def table1_markdown(table: pd.DataFrame, unit: str) -> str:
    """Table 1's layout: `mean±SD`, overlap to 2 decimals, distances to 2 decimals in `unit`."""
    several = table["label"].nunique() > 1
    head = ["Method"] + [f"{name} ({unit})" if col in DISTANCE_COLUMNS else name for col, name in TABLE1_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples(index=False):
        r = r._asdict()
        name = f"{r['method']} (label {r['label']})" if several else str(r["method"])
        cells = [name] + [f"{r[f'{c}_mean']:.2f}±{r[f'{c}_sd']:.2f}" for c, _ in TABLE1_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    n = ", ".join(f"{r.method}: {r.n_slices}" for r in table.itertuples())
    undefined = {c: int(table[f"{c}_n_undefined"].sum()) for c in DISTANCE_COLUMNS}
    lines += ["", f"Mean ± SD (ddof 1) over the test slices (slices: {n}). MSD is signed: negative when the "
              "prediction's surface lies inside the ground truth (under-segmentation). Distances in "
              f"{unit}; a distance is undefined when exactly one mask is empty and such slices are left out "
              f"({', '.join(f'{c.upper()} {v}' for c, v in undefined.items())} in all rows)."]
    return "\n".join(lines) + "\n"


def write_table1(table: pd.DataFrame, out_dir: Path, unit: str, sources: Mapping[str, str] | None = None) -> dict:
    """table1.csv (numbers, with a `unit` column), table1.md (the paper's layout) and table1.json (sources)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "table1.csv", "md": out_dir / "table1.md", "json": out_dir / "table1.json"}
    with atomic_path(paths["csv"]) as tmp:
        table.assign(unit=unit).to_csv(tmp, index=False)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(table1_markdown(table, unit))
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps({"unit": unit, "sources": dict(sources or {}), "sd": "sample (ddof 1)",
                                   "msd_sign": "negative inside the ground truth"}, indent=2) + "\n")
    return paths


def table1_from_evaluations(evaluations: Mapping[str, Path], out_dir: Path) -> pd.DataFrame:
    """Table 1 of several `evaluate` output folders (method name -> folder with metrics.csv and evaluation.json)."""
    frames, endings = {}, set()
    for method, folder in evaluations.items():
        metrics = Path(folder) / "metrics.csv"
        if not metrics.is_file():
            raise KazError(f"{folder}: no metrics.csv (an nnunet-kaz evaluate output folder is needed)")
        frames[method] = pd.read_csv(metrics)
        endings.add(_file_ending(Path(folder)))
    known = endings - {None}
    if len(known) > 1:
        raise KazError(f"the evaluations mix file types {sorted(known)}: pixels and mm cannot share a table")
    table = table1(frames)
    write_table1(table, out_dir, distance_unit(next(iter(known)) if known else ".png"),
                 {m: str(f) for m, f in evaluations.items()})
    return table


def _file_ending(evaluation: Path) -> str | None:
    """The ground truth's file ending, from the cases evaluate recorded (evaluation.json's inputs)."""
    info = evaluation / "evaluation.json"
    if not info.is_file():
        return None
    gt = Path(json.loads(info.read_text()).get("inputs", {}).get("gt", ""))
    dj = gt.parent / "dataset.json"
    return json.loads(dj.read_text()).get("file_ending") if dj.is_file() else None


__all__ = ["table1", "table1_markdown", "write_table1", "table1_from_evaluations", "distance_unit",
           "TABLE1_COLUMNS"]
