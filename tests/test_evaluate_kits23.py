"""`nnunet-kaz evaluate` on a KiTS23 phantom converted by convert-kits23: kits23.csv, the nsd column,
failure_detection.csv, rater_agreement.csv against the library on the same arrays, and the bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnunet_kaz.cli import main as cli_main
from nnunet_kaz.evaluation.failure_detection import aurc
from nnunet_kaz.evaluation.kits23_metrics import kits23_case_metrics
from nnunet_kaz.evaluation.rater_agreement import ncc
from nnunet_kaz.evaluation.surface_dice import surface_dice
from nnunet_kaz.uncertainty import normalized_entropy

SPACING = (2.0, 0.9, 0.9)


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalkits")
    raw = root / "raw"
    raw.mkdir()
    assert cli_main(["phantom", "--kind", "kits3d", "--format", "kits23", "-o", str(root / "kits23"), "-n", "4",
                     "--seed", "5", "--size", "12", "40", "40", "--spacing", *map(str, SPACING)]) == 0
    import os
    old = os.environ.get("nnUNet_raw")
    os.environ["nnUNet_raw"] = str(raw)
    try:
        assert cli_main(["convert-kits23", "--kits", str(root / "kits23"), "--id", "921"]) == 0
        assert cli_main(["convert-kits23", "--kits", str(root / "kits23"), "--id", "922", "--regions"]) == 0
    finally:
        if old is None:
            os.environ.pop("nnUNet_raw")
        else:
            os.environ["nnUNet_raw"] = old
    ds = raw / "Dataset921_KiTS23"
    pred_dir = root / "pred"
    pred_dir.mkdir()
    rng = np.random.default_rng(0)
    for f in sorted((ds / "labelsTr").iterdir()):
        case = f.name[:-7]
        ref = sitk.ReadImage(str(f))
        gt = sitk.GetArrayFromImage(ref)
        pred = np.roll(gt, int(rng.integers(0, 3)), axis=2)
        img = sitk.GetImageFromArray(pred)
        img.CopyInformation(ref)
        sitk.WriteImage(img, str(pred_dir / f.name))
        onehot = np.eye(4, dtype=np.float32)[pred].transpose(3, 0, 1, 2)
        probs = 0.7 * onehot + 0.3 * rng.dirichlet(np.ones(4), size=gt.shape).transpose(3, 0, 1, 2)
        np.savez_compressed(pred_dir / f"{case}.npz", probabilities=(probs / probs.sum(0)).astype(np.float32))
    return root, raw, pred_dir


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_evaluate_kits23_end_to_end(kits, capsys):
    root, raw, pred_dir = kits
    ds = raw / "Dataset921_KiTS23"
    out = root / "eval"
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(ds / "labelsTr"), "--probs", str(pred_dir),
                     "--probs-entropy", "--raters", str(ds / "raterDisagreementTr"), "--nsd-tolerance", "2", "2:1.0",
                     "--figure-cases", "0", "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "KiTS23 aggregate: mean dice" in printed and "rater agreement: NCC" in printed
    kt = pd.read_csv(out / "kits23.csv")
    metrics = pd.read_csv(out / "metrics.csv")
    rat = pd.read_csv(out / "rater_agreement.csv")
    cases = sorted(kt.case.unique())
    assert len(cases) == 4 and list(kt.columns) == ["case", "region", "dice", "surface_dice"]
    for case in cases:
        gt, pred = read(ds / "labelsTr" / f"{case}.nii.gz"), read(pred_dir / f"{case}.nii.gz")
        for row, ref in zip(kt[kt.case == case].itertuples(), kits23_case_metrics(pred, gt, SPACING)):
            assert row.region == ref["region"]
            assert row.dice == pytest.approx(ref["dice"]) and row.surface_dice == pytest.approx(ref["surface_dice"])
        for lab, tol in ((1, 2.0), (2, 1.0), (3, 2.0)):
            got = metrics[(metrics.case == case) & (metrics.label == lab)].nsd.iloc[0]
            assert got == pytest.approx(surface_dice(pred == lab, gt == lab, SPACING, tol))
        with np.load(pred_dir / f"{case}.npz") as z:
            u = normalized_entropy(z["probabilities"])
        d = read(ds / "raterDisagreementTr" / f"{case}.nii.gz")
        assert rat[rat.case == case].ncc.iloc[0] == pytest.approx(ncc(u, d), abs=1e-6)
    summ = pd.read_csv(out / "kits23_summary.csv")
    assert summ.region.tolist() == ["kidney_and_mass", "mass", "tumor", "aggregate"]
    assert summ.dice.iloc[-1] == pytest.approx(kt.dice.mean())
    info = json.loads((out / "evaluation.json").read_text())
    assert info["kits23"]["mean_surface_dice"] == pytest.approx(kt.surface_dice.mean())
    assert info["rater_agreement"]["n_cases"] == 4
    fd = pd.read_csv(out / "failure_detection.csv")
    assert set(fd.source) == {"unc_mean", "unc_sum", "unc_foreground_mean", "unc_patch_max"}
    assert set(fd.label) == {1, 2, 3} and (fd.n_cases == 4).all()
    m1 = metrics[metrics.label == 1]
    with_u = [float(normalized_entropy(np.load(pred_dir / f"{c}.npz")["probabilities"]).mean()) for c in m1.case]
    row = fd[(fd.label == 1) & (fd.source == "unc_mean")].iloc[0]
    assert row.aurc == pytest.approx(aurc(1 - m1.dice.to_numpy(), -np.array(with_u)), abs=1e-6)
    assert (out / "risk_coverage_label1.png").stat().st_size > 5000


def test_region_dataset_is_kits23_automatically(kits):
    root, raw, pred_dir = kits
    out = root / "eval_regions"
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(raw / "Dataset922_KiTS23" / "labelsTr"),
                     "-o", str(out), "-q"]) == 0
    assert len(pd.read_csv(out / "kits23.csv")) == 12
    assert "nsd" not in pd.read_csv(out / "metrics.csv").columns
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(raw / "Dataset922_KiTS23" / "labelsTr"),
                     "--no-kits23", "-o", str(root / "eval_nokits"), "-q"]) == 0
    assert not (root / "eval_nokits" / "kits23.csv").exists()


def _dice(p, g):
    return 1.0 if not (p.any() or g.any()) else 2.0 * np.count_nonzero(p & g) / (np.count_nonzero(p) + np.count_nonzero(g))


def test_region_scores_are_matched_with_the_region_dice(kits, tmp_path, capsys):
    """scores.csv of a region-based prediction names dataset.json's regions (kidney = {1,2,3}, masses = {2,3},
    tumor = 2): each is correlated with that region's Dice, not with the Dice of the label of the same name."""
    from scipy.stats import spearmanr

    root, raw, pred_dir = kits
    gt_dir = raw / "Dataset922_KiTS23" / "labelsTr"
    cases = sorted(f.name[:-7] for f in gt_dir.iterdir())
    rng = np.random.default_rng(3)
    names = {"kidney": (1, 2, 3), "masses": (2, 3), "tumor": (2,)}
    scores = pd.DataFrame([{"case": c, "label": n, "mean_entropy": rng.random(), "pairwise_dice": rng.random(),
                            "n_members": 1, "n_samples": 4} for c in cases for n in names])
    scores.to_csv(tmp_path / "scores.csv", index=False)
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--scores", str(tmp_path / "scores.csv"),
                     "-o", str(out), "-q"]) == 0
    corr = pd.read_csv(out / "score_correlations.csv")
    fd = pd.read_csv(out / "failure_detection.csv")
    assert set(corr.label) == {"kidney_and_mass", "mass", "tumor", "all"}
    kits_name = {"kidney": "kidney_and_mass", "masses": "mass", "tumor": "tumor"}
    for name, labs in names.items():
        dice = []
        for c in cases:
            gt, pred = read(gt_dir / f"{c}.nii.gz"), read(pred_dir / f"{c}.nii.gz")
            dice.append(_dice(np.isin(pred, labs), np.isin(gt, labs)))
        sub = scores[scores.label == name]
        for col in ("mean_entropy", "pairwise_dice"):
            row = corr[(corr.label == kits_name[name]) & (corr.score == col)].iloc[0]
            x = sub[col].to_numpy()
            if np.ptp(dice) > 0:
                assert row.spearman_rho == pytest.approx(spearmanr(x, dice).statistic) and row.n == 4
            else:
                assert np.isnan(row.spearman_rho)
            sign = 1 if col == "pairwise_dice" else -1
            got = fd[(fd.label == kits_name[name]) & (fd.source == col)].aurc.iloc[0]
            assert got == pytest.approx(aurc(1 - np.array(dice), sign * x), abs=1e-9)
    assert (out / "risk_coverage_mass.png").stat().st_size > 5000 and (out / "score_scatter.png").is_file()
    bad = scores.assign(label=scores.label.replace({"masses": "cyst"}))
    bad.to_csv(tmp_path / "bad.csv", index=False)
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--scores", str(tmp_path / "bad.csv"),
                     "-o", str(tmp_path / "e2"), "-q"]) == 2
    assert "cyst" in capsys.readouterr().err and not (tmp_path / "e2").exists()
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--scores", str(tmp_path / "scores.csv"),
                     "--no-kits23", "-o", str(tmp_path / "e3"), "-q"]) == 2
    err = capsys.readouterr().err  # region scores need the KiTS23 evaluation that --no-kits23 turned off
    assert "leave the KiTS23 evaluation on (--kits23)" in err and str(tmp_path / "scores.csv") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e3").exists()


def test_bad_inputs_name_the_files_and_write_nothing(kits, tmp_path, capsys):
    root, raw, pred_dir = kits
    ds = raw / "Dataset921_KiTS23"
    raters = tmp_path / "raters"
    raters.mkdir()
    files = sorted((ds / "raterDisagreementTr").iterdir())
    for f in files[1:]:
        (raters / f.name).write_bytes(f.read_bytes())
    small = sitk.GetImageFromArray(np.zeros((12, 40, 39), np.float32))
    sitk.WriteImage(small, str(raters / files[2].name))
    base = ["evaluate", "--pred", str(pred_dir), "--gt", str(ds / "labelsTr"), "--probs", str(pred_dir),
            "--probs-entropy"]
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main([*base, "--raters", str(raters), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(raters / files[0].name[:-7]) in err and str(raters / files[2].name) in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert cli_main([*base[:5], "--raters", str(ds / "raterDisagreementTr"), "-o", str(out)]) == 2  # no probs
    assert "uncertainty" in capsys.readouterr().err and not out.exists()
    # a KiTS23 evaluation of a dataset without labels 1-3
    kaz = tmp_path / "Dataset923_K"
    (kaz / "labelsTr").mkdir(parents=True)
    (kaz / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ablation_zone": 1},
                                                  "channel_names": {"0": "CT"}, "numTraining": 1,
                                                  "file_ending": ".nii.gz"}))
    f = files[0].name
    one = sitk.GetImageFromArray((read(ds / "labelsTr" / f) > 0).astype(np.uint8))
    sitk.WriteImage(one, str(kaz / "labelsTr" / f))
    capsys.readouterr()
    assert cli_main(["evaluate", "--pred", str(kaz / "labelsTr"), "--gt", str(kaz / "labelsTr"), "--kits23",
                     "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(kaz / "dataset.json") in err and "KiTS23" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert cli_main([*base, "--nsd-tolerance", "1:x", "-o", str(out)]) == 2
    assert "1:x" in capsys.readouterr().err and not out.exists()


def _compare(tmp_path, runs_yaml: str):
    """`nnunet-kaz compare` on a runs.yaml text; its output folder and comparison.csv."""
    runs = tmp_path / "runs.yaml"
    runs.write_text(runs_yaml)
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(runs), "-o", str(out), "-q"]) == 0
    return out, pd.read_csv(out / "comparison.csv")


def test_compare_shows_aurc_and_overlays_the_curves(kits, tmp_path):
    root, raw, pred_dir = kits
    gt = raw / "Dataset921_KiTS23" / "labelsTr"
    out, t = _compare(tmp_path, f"gt: {gt}\nfigure_cases: 0\nruns:\n  - label: shifted\n    pred: {pred_dir}\n"
                                f"    probs_entropy: true\n"
                                f"  - label: perfect\n    pred: {gt}\n    probs: {pred_dir}\n    probs_entropy: true\n")
    for i, slug in enumerate(("shifted", "perfect")):
        fd = pd.read_csv(out / "runs" / slug / "failure_detection.csv")
        fd = fd[fd.source == "unc_mean"]
        assert t.loc[i, "aurc"] == pytest.approx(fd.aurc.mean()) and t.loc[i, "e_aurc"] == pytest.approx(fd.e_aurc.mean())
        assert t.loc[i, "aurc_source"] == "unc_mean"
    assert t.loc[1, "aurc"] == pytest.approx(0.0)  # every Dice 1: no risk to rank
    assert "| AURC | E-AURC | AUGRC | risk @ 80 % |" in (out / "comparison.md").read_text()
    assert (out / "risk_coverage_overlay.png").stat().st_size > 5000
    assert "ncc_raters" not in t.columns


def test_compare_with_raters_puts_rater_agreement_in_the_table(kits, tmp_path, capsys):
    root, raw, pred_dir = kits
    ds = raw / "Dataset921_KiTS23"
    out, t = _compare(tmp_path, f"gt: {ds / 'labelsTr'}\nfigure_cases: 0\nraters: {ds / 'raterDisagreementTr'}\n"
                                f"runs:\n  - label: shifted\n    pred: {pred_dir}\n    probs_entropy: true\n")
    runs = tmp_path / "runs.yaml"
    cases = sorted(f.name[:-7] for f in (ds / "labelsTr").iterdir())
    by_hand = []
    for c in cases:
        with np.load(pred_dir / f"{c}.npz") as z:
            by_hand.append(ncc(normalized_entropy(z["probabilities"]), read(ds / "raterDisagreementTr" / f"{c}.nii.gz")))
    assert t.loc[0, "ncc_raters"] == pytest.approx(np.mean(by_hand), abs=1e-6)
    per_case = pd.read_csv(out / "runs" / "shifted" / "rater_agreement.csv")
    assert t.loc[0, "roi_auroc_raters"] == pytest.approx(per_case.roi_auroc.mean())
    assert 0 <= t.loc[0, "roi_auroc_raters_pooled"] <= 1
    assert "| NCC raters | ROI AUROC raters |" in (out / "comparison.md").read_text()
    # a run with neither probabilities nor uncertainty maps cannot be compared with the raters: nothing written
    runs.write_text(runs.read_text() + f"  - label: bare\n    pred: {ds / 'labelsTr'}\n")
    assert cli_main(["compare", str(runs), "-o", str(tmp_path / "cmp2"), "-q"]) == 2
    assert "bare" in capsys.readouterr().err and not (tmp_path / "cmp2").exists()


def test_compare_on_region_scores_overlays_the_scores_curves(kits, tmp_path):
    """compare on region-based predictions: scores per KiTS23 region (str) beside per-label aggregations (int)."""
    root, raw, pred_dir = kits
    gt = raw / "Dataset922_KiTS23" / "labelsTr"
    cases = sorted(f.name[:-7] for f in gt.iterdir())
    rng = np.random.default_rng(4)
    scored = tmp_path / "scored"
    scored.mkdir()
    for c in cases:
        (scored / f"{c}.nii.gz").symlink_to(pred_dir / f"{c}.nii.gz")
    pd.DataFrame([{"case": c, "label": n, "mean_entropy": rng.random()} for c in cases
                  for n in ("kidney", "masses", "tumor")]).to_csv(scored / "scores.csv", index=False)
    unc = tmp_path / "unc"
    unc.mkdir()
    for c in cases:
        np.savez(unc / f"{c}_uncertainty.npz", entropy=rng.random(read(gt / f"{c}.nii.gz").shape).astype(np.float32))
    out, t = _compare(tmp_path, f"gt: {gt}\nfigure_cases: 0\nruns:\n  - label: scored\n    pred: {scored}\n"
                                f"  - label: both\n    pred: {scored}\n    uncertainty: {unc}\n")
    fd = pd.read_csv(out / "runs" / "scored" / "failure_detection.csv")
    assert set(fd.label) == {"kidney_and_mass", "mass", "tumor"} and t.loc[0, "aurc_source"] == "mean_entropy"
    assert t.loc[0, "aurc"] == pytest.approx(fd.aurc.mean())
    assert np.isfinite(t.loc[0, "rho_mean_entropy"]) and (out / "risk_coverage_overlay.png").stat().st_size > 5000
    both = pd.read_csv(out / "runs" / "both" / "failure_detection.csv")  # regions (scores) and labels (maps)
    assert set(both.label) == {"kidney_and_mass", "mass", "tumor", "1", "2", "3"}
    assert t.loc[1, "aurc_source"] == "unc_mean"
    assert t.loc[1, "aurc"] == pytest.approx(both[both.source == "unc_mean"].aurc.mean())
