"""Paper 000's nested cross-validation (issue 21): the splits by set arithmetic, the clear error for too few
patients, and a miniature of the whole protocol on the real nnU-Net commands (two outer folds x two seeds, two
epochs each), whose pooled Table 1 is recomputed here from the per-fold per-slice metrics."""
from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pandas as pd
import pytest

from nnunet_kaz.cli import main as cli_main
from nnunet_kaz.datasets.splits import nested_cv_splits, read_nested_cv, write_patient_splits
from nnunet_kaz.errors import KazError
from tests.conftest import run, shrink_plans, nnunet_env

ROLES = ("train", "val", "test")


def _case_patient(n_patients: int) -> dict[str, str]:
    # 1 to 12 slices per patient: group sizes in cases differ, patients must still never be split
    return {f"K_P{p:03d}_a{15 * a:03d}": f"P{p:03d}" for p in range(n_patients) for a in range(1 + (7 * p) % 12)}


def check_nested_by_sets(folds: list[dict], case_patient: dict[str, str]) -> None:
    """Per outer fold: train / val / test disjoint in cases and in patients, together every case, each case's
    patient in the matching patient set; over the folds: every patient tested exactly once."""
    patients = set(case_patient.values())
    tested = []
    for k, f in enumerate(folds):
        cases = {r: set(f[r]) for r in ROLES}
        pats = {r: set(f["patients"][r]) for r in ROLES}
        for i, a in enumerate(ROLES):
            for b in ROLES[i + 1:]:
                assert not cases[a] & cases[b] and not pats[a] & pats[b], (k, a, b)
            assert {case_patient[c] for c in cases[a]} == pats[a], (k, a)  # no patient split across roles
        assert set.union(*cases.values()) == set(case_patient) and set.union(*pats.values()) == patients
        assert all(pats[r] for r in ROLES)
        tested += sorted(pats["test"])
    assert sorted(tested) == sorted(patients)  # every patient in exactly one test fold


@pytest.mark.parametrize("n_patients,n_outer", [(5, 5), (23, 5), (76, 5), (4, 2)])
def test_nested_splits_are_disjoint_and_test_every_patient_once(n_patients, n_outer):
    case_patient = _case_patient(n_patients)
    check_nested_by_sets(nested_cv_splits(case_patient, n_outer, 0.2, seed=3), case_patient)


def test_nested_splits_installed_as_nnunets_splits_final(tmp_path):
    case_patient = _case_patient(13)
    out = write_patient_splits(tmp_path, case_patient, 5, seed=1, nested=True)
    nested = json.loads(out["nested_cv"].read_text())
    check_nested_by_sets(nested["folds"], case_patient)
    splits = json.loads(out["splits_final"].read_text())
    assert [{"train": sorted(s["train"]), "val": sorted(s["val"])} for s in splits] == \
        [{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in nested["folds"]]
    for k, f in enumerate(nested["folds"]):  # nnU-Net fold k never sees test_k
        assert not set(f["test"]) & (set(splits[k]["train"]) | set(splits[k]["val"]))
        assert (tmp_path / "nested_cv" / f"test_fold{k}.txt").read_text().split() == f["test"]
    assert read_nested_cv(tmp_path)["splits_final"] == "nested"
    write_patient_splits(tmp_path, case_patient, 5, seed=1)  # the plain k-fold splits: not the nested ones
    with pytest.raises(KazError, match="does not hold the nested CV's outer folds"):
        read_nested_cv(tmp_path)


@pytest.mark.parametrize("n_patients,n_outer,need", [(4, 5, 5), (3, 2, 4), (2, 3, 3)])
def test_too_few_patients_is_one_clear_error(n_patients, n_outer, need):
    with pytest.raises(KazError, match=f"needs at least {need} patients.*found {n_patients}"):
        nested_cv_splits(_case_patient(n_patients), n_outer)


def test_convert_kaz_nested_refuses_too_few_patients_before_writing(tmp_path, monkeypatch, capsys):
    from nnunet_kaz.datasets import write_kaz2d_bmp_folders

    bmp = write_kaz2d_bmp_folders(tmp_path / "bmp", 4, seed=0, image_size=(24, 24), slices_per_patient=2)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    args = ["convert-kaz", "--images", str(bmp / "images"), "--masks", str(bmp / "masks"), "-d", "912", "--nested"]
    assert cli_main(args + ["--folds", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least 5 patients" in err[0] and "found 4" in err[0]
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    assert not (tmp_path / "pre").exists()
    assert cli_main(args + ["--folds", "2", "--normalization", "rgb_to_0_1"]) == 0  # 4 patients: 2 outer folds fit
    pre = tmp_path / "pre" / "Dataset912_KAZ"
    nested = read_nested_cv(pre)
    assert len(nested["folds"]) == 2
    dataset = json.loads((tmp_path / "raw" / "Dataset912_KAZ" / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "rgb_to_0_1"}


def test_table1_by_hand():
    """Mean and sample SD per column, undefined distances (exactly one empty mask) left out and counted."""
    from nnunet_kaz.evaluation.table1 import table1, table1_markdown

    nan = float("nan")
    metrics = pd.DataFrame({"case": ["a", "b", "c"], "label": 1, "precision": [1.0, 0.5, nan],
                            "recall": [1.0, 0.5, 0.0], "dice": [1.0, 0.5, 0.0], "jaccard": [1.0, 1 / 3, 0.0],
                            "mad": [0.0, 2.0, nan], "msd": [0.0, -2.0, nan], "hd": [0.0, 4.0, nan]})
    row = table1({"m": metrics}).iloc[0]
    assert row["n_slices"] == 3 and row["hd_n_undefined"] == 1 and "dice_n_undefined" not in row
    assert (row["recall_mean"], row["recall_sd"]) == pytest.approx((0.5, 0.5))  # sqrt((0.25 + 0 + 0.25) / 2)
    assert (row["precision_mean"], row["precision_sd"]) == pytest.approx((0.75, math.sqrt(0.125)))
    assert (row["mad_mean"], row["mad_sd"]) == pytest.approx((1.0, math.sqrt(2.0)))
    assert (row["msd_mean"], row["hd_mean"]) == pytest.approx((-1.0, 2.0))
    md = table1_markdown(table1({"m": metrics}), "pixels")
    assert "| m | 0.75±0.35 | 0.50±0.50 | 0.50±0.50 | 0.44±0.51 | 1.00±1.41 | -1.00±1.41 | 2.00±2.83 |" in md
    with pytest.raises(KazError, match="appears twice"):
        table1({"m": pd.concat([metrics, metrics])})


# --- the miniature protocol on the real nnU-Net ------------------------------------------------------------------
NESTED_ID, NESTED = 991, "Dataset991_KazNested"
TRAINER, SEEDS, OUTER = "XBoundNetTrainerPaper_debugSegments", (0, 1), (0, 1)


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    """5 phantom patients x 3 slices, nested splits (5 outer folds: 3 / 1 / 1 patients), outer folds 0 and 1
    trained with two seeds by the job list's own commands (10 passes of 3 batches each), then `nested-cv
    evaluate` (2 MC samples)."""
    from nnunet_kaz.datasets import make_kaz2d_dataset

    root = tmp_path_factory.mktemp("nested")
    env = nnunet_env(root)
    make_kaz2d_dataset(root / "nnUNet_raw" / NESTED, n_patients=5, seed=1, image_size=(32, 32), slices_per_patient=3)
    run(["nnunet-kaz", "splits", "-d", str(NESTED_ID), "--nested"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(NESTED_ID), "-c", "2d", "-np", "1"],
        dict(env, nnUNet_n_proc_DA="1"))
    shrink_plans(root / "nnUNet_preprocessed", NESTED, "nnUNetPlans", "nnUNetTinyPlans")
    common = ["-d", str(NESTED_ID), "-tr", TRAINER, "--seeds", "0,1", "--outer-folds", "0,1", "-p", "nnUNetTinyPlans"]
    run(["nnunet-kaz", "nested-cv", "jobs", *common, "-device", "cpu", "-o", str(root / "jobs")], env)
    jobs = (root / "jobs" / "train_jobs.txt").read_text().splitlines()
    for line in jobs:
        run(shlex.split(line), env)
    out = root / "evaluation"
    run(["nnunet-kaz", "nested-cv", "evaluate", *common, "--mc", "2", "--alpha", "0.4", "-device", "cpu", "-q",
         "-o", str(out)], env)
    nested = json.loads((root / "nnUNet_preprocessed" / NESTED / "nested_cv" / "nested_cv.json").read_text())
    return root, out, nested, jobs


@pytest.mark.integration
def test_nested_protocol_jobs_train_outer_folds_without_their_test_patients(nested_run):
    root, _, nested, jobs = nested_run
    assert jobs == [f"nnUNetv2_train {NESTED_ID} 2d {k} -tr {TRAINER}_seed{s} -p nnUNetTinyPlans -device cpu"
                    for s in SEEDS for k in OUTER]
    array = (root / "jobs" / "train_array.sbatch").read_text()
    assert f"#SBATCH --array=0-{len(jobs) - 1}" in array and "SLURM_ARRAY_TASK_ID + 1" in array
    assert "nnunet-kaz nested-cv evaluate" in (root / "jobs" / "evaluate.sbatch").read_text()
    for k in OUTER:
        fold = nested["folds"][k]
        for s in SEEDS:
            used = json.loads((root / "nnUNet_results" / NESTED / f"{TRAINER}_seed{s}__nnUNetTinyPlans__2d" /
                               f"fold_{k}" / "split.json").read_text())
            assert used == {"train": fold["train"], "val": fold["val"]}
            assert not (set(used["train"]) | set(used["val"])) & set(fold["test"])


@pytest.mark.integration
def test_nested_protocol_pools_the_test_folds_into_table_1(nested_run):
    """Per outer fold: calibration and conformal fitted on its validation slices, its test slices predicted by
    both seeds x 2 MC samples without mirroring, evaluated; the pooled table = mean and SD (ddof 1) of the
    per-fold per-slice metrics, recomputed here."""
    _, out, nested, _ = nested_run
    table = pd.read_csv(out / "table1.csv")
    protocol = json.loads((out / "protocol.json").read_text())
    assert [m["slug"] for m in protocol["methods"]] == ["single_seed0", "ensemble"]
    tested = [c for k in OUTER for c in nested["folds"][k]["test"]]
    assert len(tested) == len(set(tested))
    for method in protocol["methods"]:
        per_fold = []
        for k in OUTER:
            work = out / f"fold_{k}" / method["slug"]
            assert (work / "calibration.json").is_file() and (work / "conformal.json").is_file()
            cal = json.loads((work / "calibration.json").read_text())
            assert sorted(cal["fit_set"]["cases"]) == sorted(nested["folds"][k]["val"])  # fitted on val_k only
            args = json.loads((work / "test" / "predict_args.json").read_text())
            assert args["mirror"] is False and args["mc"] == method["mc"]
            scores = pd.read_csv(work / "test" / "scores.csv")
            assert sorted(scores["case"]) == sorted(nested["folds"][k]["test"])
            assert (scores["n_samples"] == len(method["seeds"]) * max(1, method["mc"])).all()
            metrics = pd.read_csv(work / "evaluation" / "metrics.csv")
            assert sorted(metrics["case"]) == sorted(nested["folds"][k]["test"])
            per_fold.append(metrics)
        pooled = pd.read_csv(out / "pooled" / method["slug"] / "evaluation" / "metrics.csv")
        assert sorted(pooled["case"]) == sorted(tested)
        row = table[table["method"] == method["name"]].iloc[0]
        assert row["n_slices"] == len(tested) and row["unit"] == "pixels"
        assert row["hd_n_undefined"] < len(tested)  # the members segment: real distances to recompute
        by_hand = pd.concat(per_fold)
        for col in ("precision", "recall", "dice", "jaccard", "mad", "msd", "hd"):
            values = by_hand[col].to_numpy(dtype=float)
            defined = values[~np.isnan(values)]
            mean = defined.sum() / len(defined) if len(defined) else math.nan
            sd = math.sqrt(((defined - mean) ** 2).sum() / (len(defined) - 1)) if len(defined) > 1 else math.nan
            # CSV round trip of float64 means: relative 1e-12 is far above the ~1e-16 of the repr
            assert row[f"{col}_mean"] == pytest.approx(mean, rel=1e-12, nan_ok=True), (method["slug"], col)
            assert row[f"{col}_sd"] == pytest.approx(sd, rel=1e-12, nan_ok=True), (method["slug"], col)
    md = (out / "table1.md").read_text()
    assert "| Method | Precision | Recall | DSC | Jaccard | MAD (pixels) | MSD (pixels) | HD (pixels) |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == len(protocol["methods"]) and all(r.count("±") == 7 for r in rows)
    assert "negative when the prediction's surface" in md


@pytest.mark.integration
def test_nested_evaluate_refuses_members_that_saw_the_test_patients(nested_run, tmp_path):
    root, _, nested, _ = nested_run
    env = nnunet_env(root)
    split = root / "nnUNet_results" / NESTED / f"{TRAINER}_seed1__nnUNetTinyPlans__2d" / "fold_1" / "split.json"
    good = split.read_text()
    used = json.loads(good)
    used["train"] = used["train"] + nested["folds"][1]["test"][:1]
    split.write_text(json.dumps(used))
    try:
        proc = run(["nnunet-kaz", "nested-cv", "evaluate", "-d", str(NESTED_ID), "-tr", TRAINER, "--seeds", "0,1",
                    "--outer-folds", "0,1", "-p", "nnUNetTinyPlans", "-o", str(tmp_path / "ev")], env, check=False)
    finally:
        split.write_text(good)
    assert proc.returncode == 2 and "1 of its training cases are in test_1" in proc.stderr
    assert not (tmp_path / "ev").exists()
