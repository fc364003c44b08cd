"""`nnunet-kaz evaluate` and `compare` on small NIfTI and PNG folders: outputs agree with the array functions,
and bad inputs give exit code 2 with messages naming the cases, leaving nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage
from skimage import io

from nnunet_kaz.cli import main
from nnunet_kaz.evaluation.overlap import overlap_metrics
from nnunet_kaz.evaluation.surface import surface_metrics

SPACING_ZYX = (2.5, 0.8, 0.7)
LABELS = {"background": 0, "kidney": 1, "tumour": 2}


def write_nifti(arr: np.ndarray, path: Path, spacing_zyx=SPACING_ZYX, dtype=np.uint8) -> None:
    img = sitk.GetImageFromArray(arr.astype(dtype))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path))


def make_case(rng, shape=(12, 32, 30)):
    """Kidney (1) with a tumour (2), softmax probabilities (3, *shape) and their argmax."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING_ZYX)], indexing="ij")
    c = np.array([14.0, 12.0, 10.0]) + rng.normal(0, 0.8, 3)
    r = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c)))
    rt = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c + [0, 3, 2])))
    gt = np.where(rt < 3.5, 2, np.where(r < 8, 1, 0)).astype(np.uint8)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (3, *shape)), (0, 1, 1, 1)) * 2
    logits = np.stack([(r - 8) / 1.2, (8 - r) / 1.2, (3.5 - rt) / 0.8 + 0.5]) + noise
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return gt, probs.astype(np.float32), probs.argmax(0).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    for d in ("gt", "pred", "img"):
        (root / d).mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        case = f"case_{i:03d}"
        gt, probs, pred = make_case(rng)
        if i == 2:
            pred[pred == 2] = 1                  # tumour missed: its distances are undefined (NaN)
        write_nifti(gt, root / "gt" / f"{case}.nii.gz")
        write_nifti(pred, root / "pred" / f"{case}.nii.gz")
        write_nifti(probs[2], root / "pred" / f"{case}_entropy.nii.gz", dtype=np.float32)  # a map, not a case
        write_nifti(gt * 100.0, root / "img" / f"{case}_0000.nii.gz", dtype=np.float32)
        np.savez_compressed(root / "pred" / f"{case}.npz", probabilities=probs)
        for name, v in (("kidney", 1), ("tumour", 2)):
            rows.append({"case": case, "label": name, "mean_entropy": rng.random(), "relunet_score": rng.random(),
                         "cv": rng.random(), "pairwise_dice": rng.random(), "labelled_uncertainty": rng.random(),
                         "n_members": 2, "n_samples": 4})
    pd.DataFrame(rows).to_csv(root / "pred" / "scores.csv", index=False)
    (root / "pred" / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    return root


def test_evaluate_nifti_folder(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["evaluate", "--pred", str(dataset / "pred"), "--gt", str(dataset / "gt"), "--probs",
               str(dataset / "pred"), "--images", str(dataset / "img"), "--scores", str(dataset / "pred/scores.csv"),
               "--figure-cases", "1", "--probs-entropy", "-q", "-o", str(out)])
    assert rc == 0
    m = pd.read_csv(out / "metrics.csv", dtype={"case": str})
    assert list(m.columns) == ["case", "label", "dice", "jaccard", "precision", "recall", "specificity", "rvd",
                               "hd", "hd95", "assd", "mad", "msd"]
    assert len(m) == 6 and set(m["label"]) == {1, 2}
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "gt/case_001.nii.gz")))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "pred/case_001.nii.gz")))
    row = m[(m["case"] == "case_001") & (m["label"] == 2)].iloc[0]
    want = {**overlap_metrics(pred == 2, gt == 2), **surface_metrics(pred == 2, gt == 2, SPACING_ZYX)}
    for k, v in want.items():
        assert row[k] == pytest.approx(v, rel=1e-6), k   # spacing passes through float32 NIfTI headers
    missed = m[(m["case"] == "case_002") & (m["label"] == 2)].iloc[0]
    assert missed["dice"] == 0 and np.isnan(missed["hd95"]) and np.isnan(missed["precision"])
    s = pd.read_csv(out / "summary.csv").set_index(["label", "statistic"])
    assert s.loc[("2", "n_nan"), "hd95"] == 1 and s.loc[("2", "n"), "hd95"] == 2
    assert s.loc[("2", "mean"), "hd95"] == pytest.approx(m[m["label"] == 2]["hd95"].mean())  # NaN left out
    assert s.loc[("all", "n"), "dice"] == 6
    cal = pd.read_csv(out / "calibration.csv")
    assert list(cal.columns) == ["scope", "class", "ece", "ace", "mce", "brier", "n_voxels",
                                 *[f"{m}_ci_{e}" for m in ("ece", "ace", "mce", "brier") for e in ("low", "high")]]
    assert list(cal["class"]) == ["top-label", "1", "2", "macro"] * 2
    macro = cal[cal["class"] == "macro"].set_index("scope")
    for scope in ("all", "roi"):  # the mean of the class-wise rows
        rows = cal[(cal["scope"] == scope) & cal["class"].isin(["1", "2"])]
        assert macro.loc[scope, "ece"] == pytest.approx(rows["ece"].mean(), abs=1e-15)
    assert (cal["ece_ci_low"] <= cal["ece"] + 1e-12).all() and (cal["ece"] <= cal["ece_ci_high"] + 1e-12).all()
    assert (cal.loc[cal["scope"] == "roi", "n_voxels"] < cal.loc[cal["scope"] == "all", "n_voxels"].max()).all()
    assert (out / "reliability_roi_top-label.png").is_file() and (out / "reliability_all_2.png").is_file()
    th = pd.read_csv(out / "uncertainty_thresholds_summary.csv")
    assert list(th[th["label"] == 1]["T"]) == [100, 75, 50, 25]
    assert (th[th["T"] == 100]["uncertain"] == 0).all()
    assert np.all(np.diff(th[th["label"] == 1]["uncertain"]) >= 0)     # lower T marks more voxels uncertain
    auroc = pd.read_csv(out / "uncertainty_auroc.csv").set_index("scope")
    assert 0.5 < auroc.loc["all", "auroc"] <= 1 and auroc.loc["all", "uncertainty"].startswith("probs_entropy")
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["uncertainty_case_000_label1.png",
                                                                  "uncertainty_case_000_label2.png"]
    corr = pd.read_csv(out / "score_correlations.csv")
    assert set(corr["label"].astype(str)) == {"1", "2", "all"} and (corr["n"] == corr["label"].map(
        {1: 3, 2: 3, "1": 3, "2": 3, "all": 6})).all()
    info = json.loads((out / "evaluation.json").read_text())
    assert info["nan_counts"]["hd95"] == 1 and info["cases"] == ["case_000", "case_001", "case_002"]
    printed = capsys.readouterr().out
    assert "label 1: dice" in printed and "AUROC" in printed
    # running again replaces the earlier evaluation; only the metrics: no calibration files remain
    assert main(["evaluate", "--pred", str(dataset / "pred"), "--gt", str(dataset / "gt"), "--labels", "1", "-q",
                 "--scores", str(dataset / "pred/scores.csv"), "-o", str(out)]) == 0
    assert not (out / "calibration.csv").exists() and set(pd.read_csv(out / "metrics.csv")["label"]) == {1}
    assert set(pd.read_csv(out / "score_correlations.csv")["label"]) == {1}   # label 2's scores left out
    # probabilities alone give no uncertainty analysis: the entropy of given probabilities only when asked
    assert main(["evaluate", "--pred", str(dataset / "pred"), "--gt", str(dataset / "gt"), "--probs",
                 str(dataset / "pred"), "--figure-cases", "0", "-q", "-o", str(out)]) == 0
    assert (out / "calibration.csv").exists() and not (out / "uncertainty_thresholds.csv").exists()


def test_evaluate_png_folder(tmp_path):
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    gt = np.zeros((40, 50), np.uint8)
    gt[10:30, 12:32] = 1
    pred = np.roll(gt, 3, axis=1)
    io.imsave(tmp_path / "gt" / "kaz_01.png", gt, check_contrast=False)
    io.imsave(tmp_path / "pred" / "kaz_01.png", pred, check_contrast=False)
    p1 = ndimage.gaussian_filter(pred.astype(np.float32), 2)
    np.savez_compressed(tmp_path / "pred" / "kaz_01.npz", probabilities=np.stack([1 - p1, p1])[:, None])  # nnU-Net 2D
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--probs",
                 str(tmp_path / "pred"), "-q", "-o", str(tmp_path / "out")]) == 0
    m = pd.read_csv(tmp_path / "out" / "metrics.csv").iloc[0]
    assert m["hd"] == pytest.approx(3.0) and m["dice"] == pytest.approx(17 / 20)   # pixels (spacing 1)
    cal = pd.read_csv(tmp_path / "out" / "calibration.csv", dtype={"class": str})
    assert list(cal["class"]) == ["1", "1"] and cal.loc[0, "n_voxels"] == 40 * 50
    # the predictor's {case}_uncertainty.npz: several maps, chosen by key; (C, 1, H, W) variance -> max over C
    errors = pred != gt
    variance = np.stack([np.zeros_like(p1), errors.astype(np.float32)])[:, None]
    np.savez_compressed(tmp_path / "pred" / "kaz_01_uncertainty.npz", entropy=1 - errors.astype(np.float32),
                        variance=variance)
    for key, want in (("variance", 1.0), ("entropy", 0.0)):
        assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--uncertainty",
                     str(tmp_path / "pred"), "--uncertainty-key", key, "-q", "-o", str(tmp_path / "out")]) == 0
        auroc = pd.read_csv(tmp_path / "out" / "uncertainty_auroc.csv").set_index("scope")
        assert auroc.loc["all", "auroc"] == want and key in auroc.loc["all", "uncertainty"]
    # next to the predictions the maps are read without --uncertainty; --probs-entropy asks for the other map
    for flags, want in (([], 0.0), (["--probs", str(tmp_path / "pred"), "--probs-entropy"], None)):
        assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), *flags, "-q", "-o",
                     str(tmp_path / "out")]) == 0
        auroc = pd.read_csv(tmp_path / "out" / "uncertainty_auroc.csv").set_index("scope")
        info = json.loads((tmp_path / "out" / "evaluation.json").read_text())
        if want is not None:
            assert auroc.loc["all", "auroc"] == want and info["inputs"]["uncertainty"].endswith("(next to the "
                                                                                                 "predictions)")
        else:
            assert auroc.loc["all", "uncertainty"].startswith("probs_entropy") and info["inputs"]["uncertainty"] == ""
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--uncertainty",
                 str(tmp_path / "pred"), "--probs-entropy", "--probs", str(tmp_path / "pred"), "-q", "-o",
                 str(tmp_path / "out2")]) == 2  # one source or the other


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_name_the_cases(dataset, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    gt_dir = dataset / "gt"
    out = tmp_path / "out"
    base = ["evaluate", "--pred", str(pred), "--gt", str(gt_dir), "-q", "-o", str(out)]
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_dir / "case_000.nii.gz")))
    write_nifti(a, pred / "case_000.nii.gz")
    write_nifti(a, pred / "other_case.nii.gz")
    err = run_error(base, capsys)
    assert "other_case" in err and "case_001, case_002" in err and "--pred-subset" in err
    (pred / "other_case.nii.gz").unlink()
    write_nifti(a[:, :-1], pred / "case_001.nii.gz")
    write_nifti(a, pred / "case_002.nii.gz", spacing_zyx=(2.0, 0.8, 0.7))
    err = run_error(base, capsys)
    assert "shape mismatch" in err and "case_001" in err and "spacing mismatch" in err and "case_002" in err
    err = run_error(base[:-2] + ["--pred-subset", "--probs", str(dataset / "img"), "-o", str(out)], capsys)
    assert "case_000" in err and "npz" in err
    for f in ("case_001.nii.gz", "case_002.nii.gz"):
        (pred / f).unlink()
    err = run_error(base + ["--pred-subset", "--labels", "7"], capsys)
    assert "label(s) [7] occur in no ground truth" in err
    (pred / "dataset.json").write_text(json.dumps({"labels": LABELS}))
    err = run_error(base + ["--pred-subset", "--labels", "7"], capsys)
    assert "[7] are not in the dataset's labels [1, 2]" in err
    np.savez_compressed(pred / "case_000.npz", probabilities=np.ones((2, 5, 5), np.float32))
    err = run_error(base + ["--pred-subset", "--probs", str(pred)], capsys)
    assert "case_000.npz" in err and "do not match" in err
    assert not out.exists()                       # nothing written by any failed run
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    err = run_error(["evaluate", "--pred", str(pred), "--gt", str(gt_dir), "--pred-subset", "-o", str(keep)], capsys)
    assert "not an earlier output" in err and (keep / "notes.txt").is_file()
    err = run_error(["evaluate", "--pred", str(pred), "--gt", str(gt_dir), "--pred-subset", "-o", str(pred)], capsys)
    assert "would replace the input folder" in err


def run_compare(tmp_path, runs_yaml: str, *extra: str) -> tuple[Path, pd.DataFrame]:
    """`nnunet-kaz compare` on a runs.yaml text written into tmp_path: the output folder and comparison.csv."""
    runs = tmp_path / "runs.yaml"
    runs.write_text(runs_yaml)
    out = tmp_path / "cmp"
    assert main(["compare", str(runs), "-o", str(out), "-q", *extra]) == 0
    return out, pd.read_csv(out / "comparison.csv")


def test_compare_two_methods(dataset, tmp_path, capsys):
    second = tmp_path / "second"
    second.mkdir()
    for f in (dataset / "pred").glob("case_00?.nii.gz"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        write_nifti(ndimage.binary_erosion(a > 0) * a, second / f.name)
    out, t = run_compare(tmp_path, f"gt: {dataset / 'gt'}\nlabels: [1, 2]\nfigure_cases: 0\nruns:\n"
                                   f"  - label: ensemble\n    pred: {dataset / 'pred'}\n    probs_entropy: true\n"
                                   f"  - label: eroded\n    pred: second\n    probs: {dataset / 'pred'}\n")
    assert list(t["method"]) == ["ensemble", "eroded"]
    assert t.loc[0, "dice_mean"] > t.loc[1, "dice_mean"]
    assert t.loc[0, "ece_all"] == pytest.approx(t.loc[1, "ece_all"])   # same probabilities
    assert {"ece_roi", "brier_all", "auroc_roi", "rho_mean_entropy"} <= set(t.columns)
    assert np.isfinite(t.loc[0, "rho_mean_entropy"]) and np.isnan(t.loc[1, "rho_mean_entropy"])  # no scores.csv
    ens = pd.read_csv(out / "runs" / "ensemble" / "metrics.csv")
    assert t.loc[0, "dice_mean"] == pytest.approx(ens["dice"].mean())
    md = (out / "comparison.md").read_text()
    assert md.startswith("### Segmentation\n\n| method |") and "| ensemble | 3 (3) |" in md
    assert (out / "reliability_overlay_roi.png").is_file()
    assert "| eroded |" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"gt: {dataset / 'gt'}\nruns:\n  - label: a\n    pred: nowhere\n  - label: a\n    pred: x\n")
    err = run_error(["compare", str(bad), "-o", str(tmp_path / "cmp2")], capsys)
    assert "nowhere" in err and "used twice" in err and not (tmp_path / "cmp2").exists()


def test_compare_paired_differences_wilcoxon_holm_and_the_reference(dataset, tmp_path):
    """Three methods, reference chosen by --reference: M_diff = M(method) - M(reference); M_p = scipy's Wilcoxon
    over the per-patient differences (here each 3D case is its own patient, its Dice the mean over its labels);
    M_p_holm = a hand Holm over the two methods; the interval of the mean = a hand loop over the same draws."""
    from scipy.stats import wilcoxon

    folders = {}
    for name, op in (("eroded", ndimage.binary_erosion), ("dilated", ndimage.binary_dilation)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for f in (dataset / "pred").glob("case_00?.nii.gz"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            b = op(a > 0, iterations=1 if name == "eroded" else 2)
            write_nifti(np.where(b, np.maximum(a, 1), 0) if name == "dilated" else b * a, folders[name] / f.name)
    out, t = run_compare(tmp_path, f"gt: {dataset / 'gt'}\nlabels: [1, 2]\nfigure_cases: 0\nbootstrap: 300\n"
                                   f"bootstrap_seed: 2\nruns:\n  - label: ensemble\n    pred: {dataset / 'pred'}\n"
                                   f"  - label: eroded\n    pred: eroded\n    probs: {dataset / 'pred'}\n"
                                   f"  - label: dilated\n    pred: dilated\n    probs: {dataset / 'pred'}\n",
                         "--reference", "eroded")
    t = t.set_index("method")
    assert list(t["reference"]) == [False, True, False]
    cols = list(t.columns)
    assert cols[cols.index("dice_mean") + 1:cols.index("dice_mean") + 3] == ["dice_mean_ci_low", "dice_mean_ci_high"]
    per_case = {n: pd.read_csv(out / "runs" / n / "metrics.csv").groupby("case")["dice"].mean()
                for n in ("ensemble", "eroded", "dilated")}
    ps = {}
    for n in ("ensemble", "dilated"):
        assert t.loc[n, "dice_mean_diff"] == pytest.approx(t.loc[n, "dice_mean"] - t.loc["eroded", "dice_mean"])
        ps[n] = wilcoxon(per_case[n] - per_case["eroded"]).pvalue
        assert t.loc[n, "dice_mean_p"] == pytest.approx(ps[n])
    (n_lo, p_lo), (n_hi, p_hi) = sorted(ps.items(), key=lambda kv: kv[1])  # Holm, m = 2, by hand
    holm = {n_lo: min(1.0, 2 * p_lo), n_hi: min(1.0, max(2 * p_lo, p_hi))}
    for n in ps:
        assert t.loc[n, "dice_mean_p_holm"] == pytest.approx(holm[n])
    assert np.isnan(t.loc["eroded", "dice_mean_diff"])
    m = pd.read_csv(out / "runs" / "dilated" / "metrics.csv")
    draws = np.random.default_rng(2).integers(0, 3, (300, 3))
    cases = sorted(m["case"].unique())
    hand = [np.concatenate([m[m["case"] == cases[i]]["dice"] for i in row]).mean() for row in draws]
    assert (t.loc["dilated", "dice_mean_ci_low"], t.loc["dilated", "dice_mean_ci_high"]) == pytest.approx(
        tuple(np.percentile(hand, [2.5, 97.5])))
    info = json.loads((out / "comparison.json").read_text())["settings"]
    assert info["reference"] == "eroded" and info["grouping"]["n_patients"] == 3
    assert info["bootstrap"]["n_resamples"] == 300
    md = (out / "comparison.md").read_text()
    assert "| eroded | reference |" in md and "Holm" in md and "3 patients" in md


def test_compare_calibrators_without_predicting_again(dataset, tmp_path, capsys):
    """`calibrations:` evaluates one folder of uncalibrated probabilities under several calibrator files: each row
    equals the calibration error and Dice computed here from apply_calibration and its argmax; a folder whose
    probabilities are calibrated already (calibration.json) is refused."""
    from nnunet_kaz.evaluation.calibration import CalibrationSet
    from nnunet_kaz.postprocessing import apply_calibration, classes_from_labels, make_calibrator, save_calibrator

    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], 3000)
    y = np.array([rng.choice(3, p=q ** 2 / (q ** 2).sum()) for q in p])
    files = {}
    for method in ("temperature", "platt"):
        files[method] = tmp_path / f"{method}.json"
        save_calibrator(make_calibrator(method, classes_from_labels(LABELS)).fit(p, y), files[method])
    out, t = run_compare(tmp_path, f"gt: {dataset / 'gt'}\nfigure_cases: 0\nbootstrap: 50\nruns:\n  - label: ens\n"
                                   f"    pred: {dataset / 'pred'}\n    calibrations:\n      none: null\n"
                                   f"      temperature: {files['temperature']}\n      platt: {files['platt']}\n")
    t = t.set_index("method")
    runs = tmp_path / "runs.yaml"
    assert list(t.index) == ["ens: none", "ens: temperature", "ens: platt"]
    from nnunet_kaz.postprocessing import load_calibrator

    for name in ("temperature", "platt"):
        cal = CalibrationSet(15, labels=[1, 2])
        dice = []
        for case in ("case_000", "case_001", "case_002"):
            gt = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "gt" / f"{case}.nii.gz")))
            q = apply_calibration(np.load(dataset / "pred" / f"{case}.npz")["probabilities"], load_calibrator(files[name]))
            cal.add_case(q, gt)
            seg = q.argmax(0)
            dice += [overlap_metrics(seg == k, gt == k)["dice"] for k in (1, 2)]
        ref = cal.table().set_index(["scope", "class"])
        assert t.loc[f"ens: {name}", "ece_all"] == pytest.approx(ref.loc[("all", "top-label"), "ece"], abs=1e-12)
        assert t.loc[f"ens: {name}", "ece_macro_all"] == pytest.approx(ref.loc[("all", "macro"), "ece"], abs=1e-12)
        assert t.loc[f"ens: {name}", "dice_mean"] == pytest.approx(np.mean(dice))
    plain = pd.read_csv(out / "runs" / "ens_none" / "calibration.csv")
    assert t.loc["ens: none", "ece_all"] == pytest.approx(plain.loc[0, "ece"])
    assert json.loads((out / "comparison.json").read_text())["calibrations"]["ens: temperature"] == str(files["temperature"])
    # probabilities that are calibrated already: refused, nothing written
    cal_dir = tmp_path / "calibrated"
    cal_dir.mkdir()
    for f in (dataset / "pred").iterdir():
        (cal_dir / f.name).symlink_to(f)
    (cal_dir / "calibration.json").write_text("{}")
    runs.write_text(f"gt: {dataset / 'gt'}\nruns:\n  - label: c\n    pred: {cal_dir}\n    calibration: {files['platt']}\n")
    err = run_error(["compare", str(runs), "-o", str(tmp_path / "cmp2")], capsys)
    assert "calibrated already" in err and not (tmp_path / "cmp2").exists()
