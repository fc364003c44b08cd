"""What the conformal guarantee delivered on a test set (`nnunet-kaz evaluate --conformal DIR`).

`DIR` is a folder of `nnunet-kaz predict --conformal` outputs: `conformal.json` (alpha, the labels and their
thresholds) and per case `{case}_conformal_{label}{ending}` (0/1 masks). Per case and label:
- `fnr`: the fraction of the ground truth's target voxels outside the conformal mask, 0 when the case has none
  (the convention the threshold was fitted with: Angelopoulos et al., Conformal Risk Control, section 3.1);
- the mask's size against the segmentation's and the ground truth's (what the guarantee costs).
The guarantee is E[FNR] <= alpha over exchangeable cases: the summary compares the MEAN realised FNR with alpha;
single cases may exceed it. With `groups` and an active `bootstrap` (intervals.py) the mean FNR gets its 95 %
interval over patient resamples (mean_fnr_ci_low, mean_fnr_ci_high).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_kaz.errors import KazError

COLUMNS = ["case", "label", "fnr", "label_present", "mask_voxels", "segmentation_voxels", "gt_voxels",
           "mask_over_segmentation", "mask_over_gt"]


@dataclass
class ConformalCheck:
    masks: "object"                      # nnunet_kaz.conformal.ConformalMasks
    files: dict[tuple[str, str], Path]   # (case, label name) -> mask file
    rows: list[dict] = field(default_factory=list)
    groups: "object | None" = None       # intervals.CaseGroups: the patient of every case
    bootstrap: "object | None" = None    # intervals.Bootstrap

    @classmethod
    def from_folder(cls, folder: Path, cases: dict[str, tuple[int, ...]], ending: str) -> "ConformalCheck":
        """Check that `folder` holds conformal.json and a mask of each case's shape for every label and case."""
        from nnunet_kaz.cases import read_header
        from nnunet_kaz.conformal import ConformalMasks

        folder = Path(folder)
        if not (folder / "conformal.json").is_file():
            raise KazError(f"{folder} has no conformal.json (the folder of a `predict --conformal` run) (conformal)",
                           option="conformal")
        masks = ConformalMasks.load(folder / "conformal.json")
        files, missing, wrong = {}, [], []
        for case, shape in cases.items():
            for t in masks.targets:
                f = folder / f"{case}_conformal_{t.name}{ending}"
                if not f.is_file():
                    missing.append(f.name)
                elif read_header(f).squeezed.shape != tuple(shape):
                    wrong.append(f"{f.name} {read_header(f).squeezed.shape} vs {tuple(shape)}")
                files[(case, t.name)] = f
        if missing or wrong:
            parts = ([f"{len(missing)} conformal mask(s) missing in {folder}: {', '.join(missing[:10])}"] if missing
                     else []) + ([f"conformal mask(s) of another shape than the ground truth: {', '.join(wrong[:10])}"]
                                 if wrong else [])
            raise KazError("; ".join(parts), option="conformal")
        return cls(masks, files)

    def add(self, case: str, pred: np.ndarray, gt: np.ndarray) -> None:
        from nnunet_kaz.cases import read_segmentation

        for t in self.masks.targets:
            mask = read_segmentation(self.files[(case, t.name)])[0].reshape(gt.shape) > 0
            truth, seg = t.mask(gt), t.mask(pred)
            n_gt, n_seg, n_mask = int(truth.sum()), int(seg.sum()), int(mask.sum())
            self.rows.append({"case": case, "label": t.name,
                              "fnr": float(np.count_nonzero(truth & ~mask)) / n_gt if n_gt else 0.0,
                              "label_present": n_gt > 0, "mask_voxels": n_mask, "segmentation_voxels": n_seg,
                              "gt_voxels": n_gt, "mask_over_segmentation": n_mask / n_seg if n_seg else np.nan,
                              "mask_over_gt": n_mask / n_gt if n_gt else np.nan})

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def summary(self) -> pd.DataFrame:
        from nnunet_kaz.evaluation.intervals import mean_estimate

        t = self.table()
        with_ci = self.groups is not None and self.bootstrap is not None and self.bootstrap.active
        out = []
        for name, g in t.groupby("label", sort=False):
            ci = {}
            if with_ci:
                n_p = len(self.groups.patients)
                est = mean_estimate(g["fnr"], self.groups.index(g["case"]), self.bootstrap.weights(n_p), n_p)
                ci = dict(zip(("mean_fnr_ci_low", "mean_fnr_ci_high"), self.bootstrap.interval(est.resampled)))
            out.append({"label": name, "alpha": self.masks.alpha, "mean_fnr": g["fnr"].mean(), **ci,
                        "mean_fnr_at_most_alpha": bool(g["fnr"].mean() <= self.masks.alpha),
                        "n_cases": len(g), "n_cases_with_label": int(g["label_present"].sum()),
                        "max_fnr": g["fnr"].max(), "mean_mask_over_segmentation": g["mask_over_segmentation"].mean(),
                        "mean_mask_over_gt": g["mask_over_gt"].mean()})
        return pd.DataFrame(out)

    def write_into(self, folder: Path) -> None:
        self.table().to_csv(Path(folder) / "conformal.csv", index=False)
        self.summary().to_csv(Path(folder) / "conformal_summary.csv", index=False)

    def report_lines(self) -> list[str]:
        return [f"conformal {r.label}: mean realised FNR {r.mean_fnr:.4f} (alpha {r.alpha}; over {r.n_cases} cases, "
                f"max {r.max_fnr:.4f}); mask / segmentation {r.mean_mask_over_segmentation:.2f}x, mask / ground "
                f"truth {r.mean_mask_over_gt:.2f}x" for r in self.summary().itertuples()]
