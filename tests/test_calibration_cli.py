"""`nnunet-kaz calibrate` on nnU-Net-style validation folders (2D PNG and anisotropic 3D NIfTI), and its errors."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage
from scipy.special import softmax

from nnunet_kaz.cli import main
from nnunet_kaz.postprocessing import apply_calibration, load_calibrator


def overconfident(rng, n_classes, shape, k=3.0):
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 3) for _ in range(n_classes)])
    p_true = softmax(logits / logits.std() * 2.0, axis=0)
    labels = (rng.random(shape)[None] > np.cumsum(p_true, axis=0)).sum(axis=0)
    return softmax(k * np.log(p_true), axis=0).astype(np.float32), labels.astype(np.uint8)


def nnunet_validation_folder(root, n_classes, shape, ending, n_cases=3, seed=0):
    """trainer/fold_0/validation/CASE.npz (+ .pkl) as nnU-Net writes with --npz, trainer/dataset.json,
    raw/labelsTr/CASE<ending>. 2D cases are stored (C, 1, H, W) as nnU-Net's readers give them."""
    rng = np.random.default_rng(seed)
    val = root / "Trainer__nnUNetPlans__2d" / "fold_0" / "validation"
    lab = root / "raw" / "labelsTr"
    val.mkdir(parents=True)
    lab.mkdir(parents=True)
    names = ["background", "kaz", "cyst", "other"][:n_classes]
    (val.parent.parent / "dataset.json").write_text(json.dumps(
        {"labels": {n: i for i, n in enumerate(names)}, "file_ending": ending, "channel_names": {"0": "CT"}}))
    for i in range(n_cases):
        probs, labels = overconfident(rng, n_classes, shape)
        case = f"CASE_{i:03d}"
        if len(shape) == 2:
            np.savez_compressed(val / f"{case}.npz", probabilities=probs[:, None])
            Image.fromarray(labels).save(lab / f"{case}{ending}")
        else:
            np.savez_compressed(val / f"{case}.npz", probabilities=probs)
            img = sitk.GetImageFromArray(labels)
            img.SetSpacing((0.8, 0.8, 3.0))
            sitk.WriteImage(img, str(lab / f"{case}{ending}"))
        (val / f"{case}.pkl").write_bytes(pickle.dumps({"spacing": [999, 1, 1]}))
    (lab / "CASE_999.png").write_bytes(b"")  # a training case that is not in this fold: ignored
    return val, lab


def test_calibrate_2d_png_writes_json_and_calibrated_npz(tmp_path, capsys):
    val, lab = nnunet_validation_folder(tmp_path, 2, (32, 40), ".png")
    out = tmp_path / "out" / "calib.json"
    assert main(["calibrate", "--probs", str(val), "--gt", str(lab), "-o", str(out), "--npz", "--quiet",
                 "--method", "platt"]) == 0
    text = capsys.readouterr().out
    assert "3 validation case(s)" in text and "background, kaz" in text and "ECE" in text
    d = json.loads(out.read_text())
    assert d["method"] == "platt" and [c["name"] for c in d["classes"]] == ["background", "kaz"]
    assert d["fit_set"]["cases"] == ["CASE_000", "CASE_001", "CASE_002"]
    assert sum(d["fit_set"]["n_voxels_per_class"]) == 3 * 32 * 40
    assert d["parameters"]["slopes"][1] == pytest.approx(1 / 3, rel=0.3)  # Platt on logit p undoes k = 3
    cal = load_calibrator(out, labels={"background": 0, "kaz": 1})
    written = sorted(p.name for p in (tmp_path / "out" / "calib_calibrated").iterdir())
    assert written == ["CASE_000.npz", "CASE_001.npz", "CASE_002.npz"]
    with np.load(val / "CASE_001.npz") as z, np.load(tmp_path / "out" / "calib_calibrated" / "CASE_001.npz") as c:
        np.testing.assert_array_equal(c["probabilities"], apply_calibration(z["probabilities"], cal))


def test_calibrate_3d_nifti_temperature(tmp_path):
    val, lab = nnunet_validation_folder(tmp_path, 3, (6, 20, 24), ".nii.gz", n_cases=2)
    out = tmp_path / "calib.json"
    assert main(["calibrate", "--probs", str(val), "--gt", str(lab), "-o", str(out), "--method", "temperature",
                 "--max-voxels-per-class", "500", "--seed", "3", "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["method"] == "temperature" and d["parameters"]["temperature"] > 1.5
    assert d["fit_set"]["n_sampled_per_class"] == [500, 500, 500] and d["fit_set"]["seed"] == 3


def test_calibrate_lists_every_missing_case_and_shape_mismatch_and_writes_nothing(tmp_path, capsys):
    val, lab = nnunet_validation_folder(tmp_path, 2, (16, 16), ".png", n_cases=3)
    (lab / "CASE_000.png").unlink()
    Image.fromarray(np.zeros((16, 17), np.uint8)).save(lab / "CASE_002.png")
    out = tmp_path / "out" / "calib.json"
    assert main(["calibrate", "-p", str(val), "-l", str(lab), "-o", str(out), "--npz"]) == 2
    err = capsys.readouterr().err
    # the old spellings -p / -l still work for this release, with one warning each
    assert "warning: -p is the old spelling of --probs" in err and "warning: -l is the old spelling of --gt" in err
    assert "2 problem(s)" in err and "CASE_000: no label file" in err
    # shapes in the one axis convention of nnunet_kaz.cases: singleton axes dropped from the label (16, 17)
    assert "CASE_002" in err and "(1, 16, 16)" in err and "(16, 17)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["nan", "range", "labels", "dataset"])
def test_calibrate_bad_values_name_the_file_and_write_nothing(tmp_path, capsys, bad):
    val, lab = nnunet_validation_folder(tmp_path, 2, (16, 16), ".png", n_cases=2)
    with np.load(val / "CASE_001.npz") as z:
        p = z["probabilities"].copy()
    if bad == "nan":
        p[1, 0, 3, 3] = np.nan
        np.savez_compressed(val / "CASE_001.npz", probabilities=p)
        expected = "CASE_001.npz: 1 probabilities are NaN"
    elif bad == "range":
        np.savez_compressed(val / "CASE_001.npz", probabilities=p * 4 - 2)  # logits, not probabilities
        expected = "CASE_001.npz: probabilities must lie in [0, 1]"
    elif bad == "labels":
        Image.fromarray(np.full((16, 16), 5, np.uint8)).save(lab / "CASE_001.png")
        expected = "CASE_001.png holds label values [5]"
    else:
        (val.parent.parent / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
        expected = "lists 3 classes but the probabilities"
    out = tmp_path / "calib.json"
    assert main(["calibrate", "--probs", str(val), "--gt", str(lab), "-o", str(out), "--npz", "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "calib_calibrated").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".calib")]
