"""convert-kaz: phantom BMP folders -> nnU-Net raw dataset -> nnU-Net planning, patient-wise and nested
splits, and bad input reported file by file with nothing written."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from nnunet_kaz.cli import main as cli_main
from nnunet_kaz.datasets import (convert_kaz, make_kaz2d_dataset, nested_cv_splits, patient_kfold_splits,
                                 read_kaz_meta, write_dataset_splits, write_kaz2d_bmp_folders)
from nnunet_kaz.errors import KazError
from tests.conftest import nnunet_env, run


def patients_of(cases, meta):
    return {meta["cases"][c]["patient"] for c in cases}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kazconv")
    env = nnunet_env(root)
    bmp = write_kaz2d_bmp_folders(root / "bmp", n_patients=6, seed=3, image_size=(60, 90), slices_per_patient=4)
    out = convert_kaz(bmp / "images", bmp / "masks", 905, "KazConv", resize=(32, 32), truth=bmp / "truth",
                      raw_root=root / "nnUNet_raw", preprocessed_root=root / "nnUNet_preprocessed")
    return root, env, bmp, out


def test_bmp_folders_look_like_kaz_data(converted):
    _, _, bmp, _ = converted
    names = sorted(p.name for p in (bmp / "images").iterdir())
    assert len(names) == 24 and names[:2] == ["P001_a000.bmp", "P001_a045.bmp"]
    for sub in ("masks", "truth"):
        assert sorted(p.name for p in (bmp / sub).iterdir()) == names
        m = np.asarray(Image.open(bmp / sub / names[0]))
        assert m.shape == (60, 90) and set(np.unique(m)) == {0, 255}
    assert np.asarray(Image.open(bmp / "images" / names[0])).dtype == np.uint8


def test_converted_dataset_records_original_sizes(converted):
    _, _, bmp, out = converted
    meta = read_kaz_meta(out)
    assert len(meta["cases"]) == 24
    case = meta["cases"]["KazConv_P002_a090"]
    assert case["patient"] == "P002" and case["angle"] == 90.0
    assert case["original_size"] == [60, 90] and case["size"] == [32, 32]
    assert case["image"].endswith("P002_a090.bmp")
    lab = np.asarray(Image.open(out / "labelsTr" / "KazConv_P002_a090.png"))
    src = np.asarray(Image.open(bmp / "masks" / "P002_a090.bmp")) > 0
    expected = np.asarray(Image.fromarray(src.astype(np.uint8)).resize((32, 32), Image.NEAREST))
    assert np.array_equal(lab, expected) and set(np.unique(lab)) == {0, 1}
    img = np.asarray(Image.open(out / "imagesTr" / "KazConv_P002_a090_0000.png"))
    assert img.shape == (32, 32) and img.dtype == np.uint8
    assert (out / "truthTr" / "KazConv_P002_a090.png").is_file()
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 24 and ds["labels"] == {"background": 0, "ablation_zone": 1}


@pytest.mark.integration
def test_patient_wise_splits_and_nnunet_planning(converted):
    root, env, _, out = converted
    pre = root / "nnUNet_preprocessed" / out.name
    splits = json.loads((pre / "splits_final.json").read_text())
    meta = read_kaz_meta(out)
    assert len(splits) == 5
    val_patients = [patients_of(s["val"], meta) for s in splits]
    assert Counter(p for v in val_patients for p in v) == Counter({f"P00{k}": 1 for k in range(1, 7)})
    for s in splits:
        assert not patients_of(s["train"], meta) & patients_of(s["val"], meta)
        assert sorted(s["train"] + s["val"]) == sorted(meta["cases"])
    before = (pre / "splits_final.json").read_text()
    # the real nnU-Net reads every image and label (fingerprint) and plans; preprocessing and the integrity
    # check are exercised by the integration tests and test_phantoms
    run(["nnUNetv2_plan_and_preprocess", "-d", "905", "-c", "2d", "-np", "1", "--no_pp"],
        dict(env, nnUNet_n_proc_DA="1"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["patch_size"] == [32, 32]
    assert plans["configurations"]["2d"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert (pre / "splits_final.json").read_text() == before  # nnU-Net keeps and uses our splits
    nested = json.loads((pre / "nested_cv" / "splits_final.json").read_text())
    for k, fold in enumerate(nested):
        test = (pre / "nested_cv" / f"test_fold{k}.txt").read_text().split()
        assert test and not set(test) & set(fold["train"] + fold["val"])
        assert sorted(test + fold["train"] + fold["val"]) == sorted(meta["cases"])
        assert not patients_of(test, meta) & patients_of(fold["train"] + fold["val"], meta)


@pytest.mark.parametrize("n_patients", [25, 76])
def test_nested_cv_proportions(n_patients):
    case_patient = {f"K_P{p:03d}_a{15 * a:03d}": f"P{p:03d}" for p in range(n_patients) for a in range(12)}
    folds = nested_cv_splits(case_patient, 5, 0.2, seed=1)
    tests = [set(f["patients"]["test"]) for f in folds]
    assert set.union(*tests) == set(case_patient.values()) and sum(map(len, tests)) == n_patients
    for f in folds:
        n = {k: len(v) for k, v in f["patients"].items()}
        assert sum(n.values()) == n_patients
        for role, share in (("train", 0.64), ("val", 0.16), ("test", 0.20)):
            assert abs(n[role] / n_patients - share) <= 1.0 / n_patients + 1e-9, (role, n)
        assert not set(f["patients"]["train"]) & set(f["patients"]["val"])
        assert len(f["train"]) == 12 * n["train"]
    assert patient_kfold_splits(case_patient, 5, seed=1) != patient_kfold_splits(case_patient, 5, seed=2)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def test_bad_input_lists_every_offending_file(tmp_path):
    img, msk = tmp_path / "images", tmp_path / "masks"
    good = np.zeros((20, 30), np.uint8)
    zone = good.copy()
    zone[5:10, 5:10] = 255
    for p in range(1, 6):
        _write(img / f"P{p}_a000.bmp", good)
        _write(msk / f"P{p}_a000.bmp", zone)
    _write(msk / "P9_a015.bmp", zone)  # a mask without an image
    _write(img / "P1_a030.bmp", good)
    _write(msk / "P1_a030.bmp", np.zeros((21, 30)))  # sizes differ
    _write(img / "P2_a030.bmp", good)
    _write(msk / "P2_a030.bmp", np.where(zone > 0, 128, 0))  # not binary
    _write(img / "P3_a45.bmp", good)
    _write(img / "P3_a045.bmp", good)  # duplicate patient/angle
    _write(msk / "P3_a045.bmp", zone)
    _write(img / "scan7.bmp", good)  # does not match the pattern
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    with pytest.raises(KazError) as err:
        convert_kaz(img, msk, 906, raw_root=raw, preprocessed_root=pre)
    msg = str(err.value)
    for name in ("P9_a015.bmp", "masks/P1_a030.bmp", "masks/P2_a030.bmp", "P3_a45.bmp", "P3_a045.bmp",
                 "scan7.bmp"):
        assert name in msg, name
    assert "without an image" in msg and "differs" in msg and "not binary" in msg and "duplicate" in msg
    assert not raw.exists() and not pre.exists()


def test_custom_pattern_and_0_1_masks_via_cli(tmp_path, monkeypatch, capsys):
    img, msk = tmp_path / "in" / "img", tmp_path / "in" / "seg"
    for p in range(5):
        for angle in (0, 90):
            arr = np.full((24, 24), 60, np.uint8)
            arr[8:14, 8:14] = 120
            _write(img / f"patient-{p}.slice{angle}.bmp", arr)
            _write(msk / f"patient-{p}.slice{angle}_label.bmp", (arr > 100).astype(np.uint8))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    args = ["convert-kaz", "--images", str(img), "--masks", str(msk), "--id", "907", "--name", "Custom",
            "--pattern", r"patient-(?P<patient>\d+)\.slice(?P<angle>\d+)"]
    assert cli_main(args) == 0
    out = tmp_path / "raw" / "Dataset907_Custom"
    assert (out / "labelsTr" / "Custom_3_a090.png").is_file()
    assert read_kaz_meta(out)["cases"]["Custom_3_a090"]["original_size"] == [24, 24]
    assert cli_main(args) == 2  # exists: refuses without --overwrite
    assert "exists" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0


def test_splits_for_a_phantom_dataset(tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    make_kaz2d_dataset(raw / "Dataset908_Ph", n_patients=5, seed=0, image_size=(32, 32), slices_per_patient=2)
    out = write_dataset_splits(908, raw_root=raw, preprocessed_root=pre)
    splits = json.loads(out["splits_final"].read_text())
    val_patients = [{c.split("_")[1] for c in s["val"]} for s in splits]
    assert all(len(v) == 1 for v in val_patients)  # 5 patients, 5 folds: one patient per fold
    assert set.union(*val_patients) == {f"P00{k}" for k in range(1, 6)}
    assert all(len(s["val"]) == 2 and len(s["train"]) == 8 for s in splits)
    with pytest.raises(KazError, match="no dataset with id 909"):
        write_dataset_splits(909, raw_root=raw, preprocessed_root=pre)
    with pytest.raises(KazError, match="exists"):
        write_dataset_splits(908, raw_root=raw, preprocessed_root=pre)


def test_held_out_test_patients_go_to_imagests_and_no_fold(tmp_path):
    import json as _json

    from nnunet_kaz.datasets import write_kaz2d_bmp_folders
    from nnunet_kaz.datasets.kaz_convert import convert_kaz

    bmp = write_kaz2d_bmp_folders(tmp_path / "bmp", 7, seed=3, image_size=(40, 52), slices_per_patient=2)
    out = convert_kaz(bmp / "images", bmp / "masks", 612, "Held", resize=(32, 32), truth=bmp / "truth",
                      raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre", test_patients=2)
    test_cases = sorted(p.name for p in (out / "imagesTs").iterdir())
    assert test_cases == ["Held_P006_a000_0000.png", "Held_P006_a090_0000.png",
                          "Held_P007_a000_0000.png", "Held_P007_a090_0000.png"]
    assert len(list((out / "labelsTs").iterdir())) == 4 and len(list((out / "truthTs").iterdir())) == 4
    assert _json.loads((out / "dataset.json").read_text())["numTraining"] == 10
    splits = _json.loads((tmp_path / "pre" / out.name / "splits_final.json").read_text())
    in_folds = {c for s in splits for c in s["train"] + s["val"]}
    assert not any("P006" in c or "P007" in c for c in in_folds) and len(in_folds) == 10
