"""Our trainers compile their Dice term as nnUNetTrainer._build_loss does when nnU-Net compiles (nnUNet_compile)."""
from __future__ import annotations

import json

import torch

from tests.conftest import KAZ


def test_xboundnet_trainer_compiles_the_dice_term_like_nnunet(tiny_kaz, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_kaz.trainers import XBoundNetTrainer

    pre = tiny_kaz.root / "nnUNet_preprocessed" / KAZ
    plans = json.loads((pre / "nnUNetTinyPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, tiny_kaz.env[name])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)
    for cls in (nnUNetTrainer, XBoundNetTrainer):
        trainer = cls(dict(plans, continue_training=False), "2d", 0, dataset_json, device=torch.device("cpu"))
        monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
        before = len(compiled)
        loss = trainer._build_loss()
        dice = loss.loss.dc if hasattr(loss, "loss") else loss.dc
        assert len(compiled) == before + 1 and compiled[-1] is dice, cls.__name__


def test_two_stage_xboundnet_trains_to_finite_losses(tiny_kaz):
    """The depth cap leaves 2 stages on the 32x32 tiny plans, so one deep-supervision output: nnU-Net's weighting
    would give it 0 / 0 and every loss would be NaN."""
    import math

    folder = tiny_kaz.train("XBoundNetTrainer_debug")
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert max(int(k.split(".")[2]) for k in ckpt["network_weights"] if k.startswith("encoder.stages.")) == 1
    losses = ckpt["logging"]["train_losses"] + ckpt["logging"]["val_losses"]
    assert losses and all(math.isfinite(v) for v in losses)
