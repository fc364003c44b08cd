"""Issue-3 trainers on the real `nnUNetv2_train`: SGDR snapshots, seeds, dropout rebuilt for inference."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from nnunet_kaz.trainers import (
    XBoundNetTrainerSGDR_debug,
    nnUNetTrainerDropout_p02_debug,
    nnUNetTrainerDropoutSpatial_p02_debug,
    nnUNetTrainerDropoutSpatialWCE_p02_debug,
)
from nnunet_kaz.trainers.sgdr import sgdr_lr
from tests.conftest import KAZ, KAZ_ID, run

pytestmark = pytest.mark.integration


def _weights(folder):
    return torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)["network_weights"]


def test_sgdr_run_keeps_top_k_snapshots_per_cycle(tiny_kaz):
    folder = tiny_kaz.train("XBoundNetTrainerSGDR_debug") / "fold_0"
    manifest = json.loads((folder / "snapshots.json").read_text())
    ends, k = manifest["cycle_ends"], manifest["top_k"]
    assert ends == [3, 6] and k == 2
    for cycle in range(len(ends)):
        entries = [s for s in manifest["snapshots"] if s["cycle"] == cycle]
        assert len(entries) == k
        start = ends[cycle - 1] if cycle else 0
        assert all(ends[cycle] - manifest["window"] <= s["epoch"] < ends[cycle] for s in entries)
        assert all((folder / s["file"]).is_file() for s in entries)
        for s in entries:
            assert s["lr"] == pytest.approx(sgdr_lr(s["epoch"], ends, manifest["lr_max"], manifest["lr_min"]))
        assert start >= 0
    on_disk = sorted(p.name for p in folder.glob("checkpoint_snapshot_*.pth"))
    assert on_disk == sorted(s["file"] for s in manifest["snapshots"])
    # the learning rates nnU-Net logged follow the SGDR formula
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    lrs = ckpt["logging"]["lrs"]
    assert len(lrs) == 6
    for epoch, lr in enumerate(lrs):
        expected = manifest["lr_min"] + (manifest["lr_max"] - manifest["lr_min"]) / 2 * (
            1 + math.cos(math.pi * (epoch - (0 if epoch < 3 else 3)) / 3))
        assert lr == pytest.approx(expected)


def test_same_seed_gives_identical_weights_and_different_seeds_differ(tiny_kaz):
    env = dict(tiny_kaz.env, nnUNet_n_proc_DA="0")
    first = _weights(tiny_kaz.train("XBoundNetTrainer_debug_seed0"))
    run(["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", "XBoundNetTrainer_debug_seed0", "-p", "nnUNetTinyPlans",
         "-device", "cpu"], env)  # the same run again, overwriting the first
    second = _weights(tiny_kaz.results("XBoundNetTrainer_debug_seed0"))
    other = _weights(tiny_kaz.train("XBoundNetTrainer_debug_seed1"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("trainer,kind", [(nnUNetTrainerDropout_p02_debug, torch.nn.Dropout),
                                          (nnUNetTrainerDropoutSpatial_p02_debug, torch.nn.Dropout2d),
                                          (nnUNetTrainerDropoutSpatialWCE_p02_debug, torch.nn.Dropout2d)])
def test_dropout_network_is_rebuilt_identically_for_inference(tiny_kaz, monkeypatch, trainer, kind):
    """Element-wise (Gal & Ghahramani) or spatial (paper 004) dropout after the nonlinearity of every
    convolution, p = 0.2, and the predictor rebuilds exactly that network from the checkpoint."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_kaz.trainers.dropout_trainer import ActivationDropout

    folder = tiny_kaz.train(trainer.__name__)
    for key, value in tiny_kaz.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    plans = json.loads((folder / "plans.json").read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    trained = trainer.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2, True)
    describe = lambda net: [(n, type(m).__name__, m.p) for n, m in net.named_modules()  # noqa: E731
                            if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert describe(predictor.network) == describe(trained)
    convs = [m for m in trained.modules() if isinstance(m, ConvDropoutNormReLU)]
    assert len(describe(trained)) == len(convs) >= 2 * 4  # one after every convolution of encoder and decoder
    # each after the convolution's nonlinearity (conv -> norm -> nonlinearity -> dropout), none inside
    assert all(not hasattr(c, "dropout") and isinstance(c.nonlin, ActivationDropout) for c in convs)
    assert all(c.all_modules[-1] is c.nonlin and type(c.nonlin[1]) is kind and c.nonlin[1].p == 0.2 for c in convs)
    if "WCE" in trainer.__name__:  # paper 004's recipe: spatial dropout trained with the weighted cross-entropy
        weights = json.loads((folder / "fold_0" / "class_weights.json").read_text())["weights"]
        assert len(weights) == 2 and weights[1] > weights[0]  # the zone is the rarer class
        assert "RobustCrossEntropyLoss" in json.loads((folder / "fold_0" / "debug.json").read_text())["loss"]


@pytest.mark.parametrize("attrs,match", [
    (dict(sgdr_cycle_ends=(3, 5)), "do not fit num_epochs"),
    (dict(snapshot_top_k=3, snapshot_window=2), "snapshot_top_k"),
    (dict(snapshot_window=4), "longer than the shortest"),
])
def test_sgdr_trainer_refuses_bad_settings(tiny_kaz, monkeypatch, capsys, attrs, match):
    for key, value in tiny_kaz.env.items():
        if key.startswith("nnUNet"):
            monkeypatch.setenv(key, value)
    plans = json.loads((tiny_kaz.root / "nnUNet_preprocessed" / KAZ / "nnUNetTinyPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((tiny_kaz.raw / "dataset.json").read_text())
    bad = type("Bad", (XBoundNetTrainerSGDR_debug,), attrs)
    trainer = bad(plans, "2d", 0, dataset_json, torch.device("cpu"))
    with pytest.raises(SystemExit) as exit_info:
        trainer.initialize()
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err.splitlines()[-1].removeprefix("nnUNetv2_train: error: "))
    assert not Path(trainer.output_folder).exists()  # the empty fold folder and the log of the refused run are gone
