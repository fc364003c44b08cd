"""The evaluate-side accumulator of issue 16: NSD column, kits23 table, aggregations feeding failure detection,
rater agreement per case and pooled, and the input checks (tolerances, rater folders)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nnunet_kaz.errors import KazError
from nnunet_kaz.evaluation.failure_detection import aurc
from nnunet_kaz.evaluation.field_report import FieldMetrics, check_rater_folder, parse_nsd_tolerances
from nnunet_kaz.evaluation.kits23_metrics import kits23_case_metrics
from nnunet_kaz.evaluation.rater_agreement import ncc
from nnunet_kaz.evaluation.surface_dice import surface_dice


def test_parse_nsd_tolerances():
    assert parse_nsd_tolerances(["2"]) == {None: 2.0}
    assert parse_nsd_tolerances(["1:1.5,2:3", "0.5"]) == {1: 1.5, 2: 3.0, None: 0.5}
    for bad in (["x"], ["1:"], ["0:1"], ["-1"], ["1:nan"]):
        with pytest.raises(KazError, match="NSD tolerance"):
            parse_nsd_tolerances(bad)


def test_rater_folder_check_names_every_file(tmp_path):
    d = tmp_path / "raters"
    d.mkdir()
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(d / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "b.png")
    shape = lambda f: np.asarray(Image.open(f)).shape  # noqa: E731
    assert check_rater_folder(d, {"a": (8, 9)}, (".png",), shape) == {"a": d / "a.png"}
    with pytest.raises(KazError) as e:
        check_rater_folder(d, {"a": (8, 9), "b": (8, 9), "c": (8, 9)}, (".png",), shape)
    msg = str(e.value)
    assert str(d / "c") in msg and str(d / "b.png") in msg and "(8, 8)" in msg and str(d / "a.png") not in msg
    with pytest.raises(KazError, match="does not exist"):
        check_rater_folder(tmp_path / "nope", {"a": (8, 9)}, (".png",), shape)


def test_accumulator_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    sp = (2.0, 0.8, 0.8)
    fm = FieldMetrics(kits23=True, nsd_tolerances={None: 1.0, 2: 2.0}, raters={}, roi_margin=2.0,
                      read_map=lambda f: np.load(f))
    metrics, cases = [], []
    for k in range(5):
        case = f"c{k}"
        gt = np.zeros((6, 20, 20), np.uint8)
        gt[1:5, 4:16, 4:16] = 1
        gt[2:4, 6:10, 6:10] = 2
        pred = np.roll(gt, k % 3, axis=2)
        u = rng.random(gt.shape).astype(np.float32) * (1 + k)
        d = (pred != gt).astype(np.float32)
        np.save(tmp_path / f"{case}.npy", d)
        fm.raters[case] = tmp_path / f"{case}.npy"
        nsd = fm.add_case(case, pred, gt, sp, [1, 2], u)
        assert nsd[1] == pytest.approx(surface_dice(pred == 1, gt == 1, sp, 1.0))
        assert nsd[2] == pytest.approx(surface_dice(pred == 2, gt == 2, sp, 2.0))
        for lab in (1, 2):
            p, g = pred == lab, gt == lab
            metrics.append({"case": case, "label": lab, "dice": 2 * (p & g).sum() / (p.sum() + g.sum())})
        assert fm.rater_rows[-1]["ncc"] == pytest.approx(ncc(u, d), nan_ok=True)  # c0: no disagreement, NaN
        cases.append((case, pred, gt))
    metrics = pd.DataFrame(metrics)
    scores = pd.DataFrame({"case": metrics.case, "label": metrics.label, "mean_entropy": rng.random(10),
                           "pairwise_dice": rng.random(10), "n_members": 2})
    fm.finish(metrics, scores)
    t = fm.failure
    assert set(t.source) == {"mean_entropy", "pairwise_dice", "unc_mean", "unc_sum", "unc_foreground_mean",
                             "unc_patch_max"}
    row = t[(t.label == 1) & (t.source == "unc_mean")].iloc[0]
    agg = pd.DataFrame(fm.aggregation_rows)
    a1 = agg[agg.label == 1]
    assert row.aurc == pytest.approx(aurc(1 - metrics[metrics.label == 1].dice.to_numpy(), -a1.unc_mean.to_numpy()))
    kt = fm.kits_table
    assert list(kt.columns) == ["case", "region", "dice", "surface_dice"] and len(kt) == 15
    assert kt.iloc[3:6].to_dict("records") == [{"case": "c1", **r} for r in kits23_case_metrics(*cases[1][1:], sp)]
    s = fm.summary()
    assert s["kits23"]["mean_dice"] == pytest.approx(kt.dice.mean())
    assert s["rater_agreement"]["n_cases"] == 5 and 0 <= s["rater_agreement"]["pooled_roi_auroc"] <= 1
    out = tmp_path / "out"
    out.mkdir()
    fm.write_into(out)
    assert sorted(p.name for p in out.iterdir()) == ["failure_detection.csv", "kits23.csv", "kits23_summary.csv",
                                                    "rater_agreement.csv", "risk_coverage_label1.png",
                                                    "risk_coverage_label2.png"]
    assert any("KiTS23 aggregate" in line for line in fm.report_lines())
