"""The real nnU-Net commands on tiny phantoms: plan and preprocess, train XBoundNet++ with
`nnUNetv2_train -tr`, predict with `nnUNetv2_predict -tr`; 2D through the stock planner, 3D through
`nnunet-kaz plan`. Nothing of nnU-Net is mocked; models are shrunk to a few features for CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_kaz.datasets import make_kits3d_dataset
from tests.conftest import KAZ, KAZ_ID, nnunet_env, run, shrink_plans

pytestmark = pytest.mark.integration

KITS_ID, KITS = 991, "Dataset991_KitsTiny"


@pytest.fixture(scope="module")
def kaz_trained(tiny_kaz):
    tiny_kaz.train("XBoundNetTrainer_debug")
    return tiny_kaz.root, tiny_kaz.env


def test_training_writes_xboundnet_checkpoint(kaz_trained):
    import torch

    root, _ = kaz_trained
    fold = root / "nnUNet_results" / KAZ / "XBoundNetTrainer_debug__nnUNetTinyPlans__2d" / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "XBoundNetTrainer_debug"
    keys = list(ckpt["network_weights"])
    # XBoundNet++'s own blocks are in the trained weights: squeeze-excitation, ASPP bridge, attention gates
    assert any("bridge" in k for k in keys) and any("gate" in k for k in keys)
    assert ckpt["current_epoch"] == 2
    assert (fold / "validation" / "summary.json").is_file()


def test_stock_predict_keeps_input_geometry(kaz_trained):
    root, env = kaz_trained
    images = root / "nnUNet_raw" / KAZ / "imagesTs"
    out = root / "pred2d"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(KAZ_ID), "-c", "2d", "-f", "0",
         "-tr", "XBoundNetTrainer_debug", "-p", "nnUNetTinyPlans", "-device", "cpu", "-npp", "1", "-nps", "1"],
        env)
    inputs = sorted(images.glob("*_0000.png"))
    assert inputs
    for img in inputs:
        pred = out / img.name.replace("_0000.png", ".png")
        assert pred.is_file(), pred
        assert np.asarray(Image.open(pred)).shape == np.asarray(Image.open(img)).shape
        assert set(np.unique(np.asarray(Image.open(pred)))) <= {0, 1}


def test_misspelled_trainer_is_named_in_the_error(kaz_trained):
    _, env = kaz_trained
    proc = run(["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", "XBoundNetTrainr", "-device", "cpu"], env,
               check=False)
    assert proc.returncode != 0
    assert "XBoundNetTrainr" in proc.stderr


def test_kits3d_through_nnunet_kaz_plan(tmp_path):
    env = nnunet_env(tmp_path)
    make_kits3d_dataset(tmp_path / "nnUNet_raw" / KITS, n_cases=5, seed=1, shape=(16, 32, 32),
                        spacing=(2.5, 0.8, 0.8))
    run(["nnunet-kaz", "plan", "-d", str(KITS_ID), "-c", "3d_fullres", "-np", "1"], dict(env, nnUNet_n_proc_DA="1"))
    plans_file = tmp_path / "nnUNet_preprocessed" / KITS / "nnUNetXBoundNetPlans.json"
    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "nnunet_kaz.networks.XBoundNet"

    shrink_plans(tmp_path / "nnUNet_preprocessed", KITS, "nnUNetXBoundNetPlans", "nnUNetXBoundNetTinyPlans", 16)
    # the stock trainer builds XBoundNet++ from these plans
    run(["nnUNetv2_train", str(KITS_ID), "3d_fullres", "0", "-tr", "nnUNetTrainer_debug", "-p",
         "nnUNetXBoundNetTinyPlans", "-device", "cpu"], env)
    images = tmp_path / "nnUNet_raw" / KITS / "imagesTr"
    case = sorted(images.glob("*_0000.nii.gz"))[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / case.name).symlink_to(case)
    out = tmp_path / "pred3d"
    run(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(out), "-d", str(KITS_ID), "-c", "3d_fullres",
         "-f", "0", "-tr", "nnUNetTrainer_debug", "-p", "nnUNetXBoundNetTinyPlans", "-device", "cpu",
         "-npp", "1", "-nps", "1"], env)
    ref = sitk.ReadImage(str(case))
    pred = sitk.ReadImage(str(out / case.name.replace("_0000.nii.gz", ".nii.gz")))
    assert pred.GetSize() == ref.GetSize()
    assert np.allclose(pred.GetSpacing(), ref.GetSpacing())
    assert np.allclose(pred.GetOrigin(), ref.GetOrigin())
    assert np.allclose(pred.GetDirection(), ref.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}


def test_nnunet_kaz_plan_unknown_dataset(tmp_path):
    env = nnunet_env(tmp_path)
    proc = run(["nnunet-kaz", "plan", "-d", "123"], env, check=False)
    assert proc.returncode != 0
    assert "no dataset with id 123" in proc.stderr


def test_nnunet_kaz_plan_dataset_without_labels(tmp_path):
    env = nnunet_env(tmp_path)
    folder = tmp_path / "nnUNet_raw" / "Dataset124_NoLabels"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                     "numTraining": 0, "file_ending": ".nii.gz"}))
    proc = run(["nnunet-kaz", "plan", "-d", "124"], env, check=False)
    assert proc.returncode != 0
    assert "no labels" in proc.stderr
