"""Rel-UNet's recipe (paper 002) on the stock `nnUNetv2_train` with nnU-Net ResEnc L plans (issue 22 item 2):
what nnU-Net really ran is read back from `fold_0/debug.json` and the training log, and the full-train
snapshots (60 ... 100 % of training) are predicted with `RESULTS_DIR:0:snapshots`."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from tests.conftest import KAZ, KAZ_ID, run, shrink_plans

pytestmark = pytest.mark.integration

PLANS = "nnUNetResEncUNetLTinyPlans"
TRAINER = "RelUNetTrainer_fullTrain_debug"


@pytest.fixture(scope="module")
def resenc_l(tiny_kaz):
    """nnU-Net's ResEnc L plans of the tiny phantom (`nnUNetPlannerResEncL`, whose 2d configuration reuses the
    nnUNetPlans_2d data), narrowed for the CPU as conftest.shrink_plans does (batch size 2 in the plans)."""
    pre = tiny_kaz.root / "nnUNet_preprocessed"
    if not (pre / KAZ / f"{PLANS}.json").is_file():
        run(["nnUNetv2_plan_experiment", "-d", str(KAZ_ID), "-pl", "nnUNetPlannerResEncL"],
            dict(tiny_kaz.env, nnUNet_n_proc_DA="1"))
        shrink_plans(pre, KAZ, "nnUNetResEncUNetLPlans", PLANS)
    plans = json.loads((pre / KAZ / f"{PLANS}.json").read_text())
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert plans["configurations"]["2d"]["batch_size"] == 2
    return plans


def test_relunet_recipe_and_full_train_snapshots_on_the_stock_command(tiny_kaz, resenc_l, tmp_path):
    run(["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"], tiny_kaz.env)
    results = tiny_kaz.root / "nnUNet_results" / KAZ / f"{TRAINER}__{PLANS}__2d"
    fold = results / "fold_0"
    debug = json.loads((fold / "debug.json").read_text())
    assert debug["batch_size"] == "40"  # paper 002 Appendix A, over the plans' 2
    assert debug["network"] == "ResidualEncoderUNet"
    assert "MemoryEfficientSoftDiceLoss" in debug["loss"] and "CrossEntropy" not in debug["loss"]  # Dice only
    assert debug["initial_lr"] == "0.1" and "SGD" in debug["optimizer"]
    assert "follows Rel-UNet" not in "".join(p.read_text() for p in fold.glob("training_log_*.txt"))  # ResEnc
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    losses = ckpt["logging"]["train_losses"]
    assert len(losses) == 10 and all(-1 <= v <= 0 for v in losses)  # nnU-Net's Dice loss is -soft Dice; CE > 0
    assert json.loads((results / "plans.json").read_text())["configurations"]["2d"]["batch_size"] == 2  # untouched
    manifest = json.loads((fold / "snapshots.json").read_text())
    assert manifest["fractions"] == [0.6, 0.7, 0.8, 0.9, 1.0] and manifest["dropped_cycles"] == []
    # the weights after 6, 7, 8, 9 and 10 of the 10 epochs (0-based epochs 5-9), each file its own epoch's
    assert [s["epoch"] for s in manifest["snapshots"]] == [5, 6, 7, 8, 9]
    for s in manifest["snapshots"]:
        snap = torch.load(fold / s["file"], map_location="cpu", weights_only=False)
        assert snap["current_epoch"] == s["epoch"] + 1
    last = torch.load(fold / manifest["snapshots"][-1]["file"], map_location="cpu", weights_only=False)
    assert all(torch.equal(last["network_weights"][k], ckpt["network_weights"][k]) for k in ckpt["network_weights"])
    out = tmp_path / "pred"
    run(["nnunet-kaz", "predict", "-i", str(tiny_kaz.raw / "imagesTs"), "-o", str(out), "-m", f"{results}:0:snapshots",
         "-device", "cpu"], tiny_kaz.env)
    scores = pd.read_csv(out / "scores.csv")
    assert (scores["n_members"] == 5).all() and (scores["n_samples"] == 5).all()
    args = json.loads((out / "predict_args.json").read_text())
    assert len(args["members"][0]["checkpoints"]) == 5 and args["mirror"] is True  # nnU-Net's inference


def test_relunet_defaults_are_paper_002s():
    from nnunet_kaz.trainers import RelUNetTrainer, RelUNetTrainer_fullTrain, RelUNetTrainer_seed3

    assert RelUNetTrainer.relunet_batch_size == 40 and RelUNetTrainer.snapshot_fractions is None
    assert (RelUNetTrainer.sgdr_lr_max, RelUNetTrainer.sgdr_lr_min, RelUNetTrainer.sgdr_cycle_ends,
            RelUNetTrainer.snapshot_top_k) == (0.1, 1e-4, (100, 200, 400, 800), 3)
    assert RelUNetTrainer_fullTrain.snapshot_fractions == (0.6, 0.7, 0.8, 0.9, 1.0)
    assert RelUNetTrainer_seed3.seed == 3 and issubclass(RelUNetTrainer_seed3, RelUNetTrainer)
    full = object.__new__(RelUNetTrainer_fullTrain)
    full.num_epochs = 800
    assert full.fraction_epochs == [479, 559, 639, 719, 799]
