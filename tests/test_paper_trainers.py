"""Paper schedules trained by the stock `nnUNetv2_train` (issue 13.3 / 13.6): nnUNetTrainerSGDR's paper 002
schedule shortened 25x (3 snapshots per kept cycle, the cycle without a peak dropped) and XBoundNetTrainer_Adam's
restore-best-weights and early stopping.

The trainers are subclasses defined the nnU-Net way, in a module of a folder listed in `nnUNet_extTrainer`. They
change the schedule length and script the monitored quantity (EMA pseudo-Dice, validation loss) that a
32x32 phantom trained for a few iterations cannot shape; everything else (SGD with SGDR, snapshot selection,
dropping, Adam, plateau scheduler, checkpoint writing) is the trainers' own code run by nnU-Net.
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

from nnunet_kaz.paths import trainer_dir
from tests.conftest import KAZ_ID, run

pytestmark = pytest.mark.integration

# paper 002's restarts 100 / 200 / 400 / 800 divided by 25; windows of 4 epochs, top 3
CYCLE_ENDS = (4, 8, 16, 32)
# scripted EMA pseudo-Dice per epoch: cycle 1 never beats cycle 0's best (0.42) -> no peak, dropped;
# epoch 10 is high but outside cycle 2's window (epochs 12-15)
EMA = ([0.30, 0.42, 0.35, 0.40] + [0.20, 0.41, 0.30, 0.38] + [0.10, 0.20, 0.95, 0.30, 0.45, 0.50, 0.44, 0.48]
       + [0.30] * 12 + [0.55, 0.60, 0.58, 0.52])
EXPECTED_SNAPSHOTS = {0: [1, 2, 3], 2: [12, 13, 15], 3: [28, 29, 30]}
# scripted validation losses: best at epoch 1, then 2 epochs without improvement -> stop before epoch 4
VAL_LOSSES = [1.0, 0.5, 0.7, 0.9, 0.4, 0.3]

MODULE = textwrap.dedent(f'''
    import os
    import torch
    from nnunet_kaz.trainers import XBoundNetTrainer_Adam, nnUNetTrainerSGDR

    EMA = {EMA!r}
    VAL_LOSSES = {VAL_LOSSES!r}


    class nnUNetTrainerSGDR_paperShort(nnUNetTrainerSGDR):
        sgdr_cycle_ends = {CYCLE_ENDS!r}
        snapshot_window = 4

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 32, 1, 1

        def on_validation_epoch_end(self, val_outputs):
            super().on_validation_epoch_end(val_outputs)
            self.logger.log("ema_fg_dice", EMA[self.current_epoch], self.current_epoch)


    class XBoundNetTrainer_Adam_scripted(XBoundNetTrainer_Adam):
        early_stopping_patience = 2

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 6, 2, 1

        def on_validation_epoch_end(self, val_outputs):
            super().on_validation_epoch_end(val_outputs)
            self.logger.log("val_losses", VAL_LOSSES[self.current_epoch], self.current_epoch)

        def on_epoch_end(self):
            torch.save({{k: v.detach().clone() for k, v in self.network.state_dict().items()}},
                       os.path.join(self.output_folder, f"weights_epoch{{self.current_epoch}}.pt"))
            super().on_epoch_end()
''')


@pytest.fixture(scope="module")
def scripted_env(tiny_kaz, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ext_trainers")
    (folder / "kaz_scripted_trainers.py").write_text(MODULE)
    return dict(tiny_kaz.env, nnUNet_extTrainer=f"{trainer_dir()}:{folder}")


def _train(tiny_kaz, env, trainer):
    run(["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", trainer, "-p", "nnUNetTinyPlans", "-device", "cpu"], env)
    return tiny_kaz.results(trainer) / "fold_0"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_paper_sgdr_schedule_keeps_3_snapshots_per_kept_cycle_and_drops_the_cycle_without_a_peak(
        tiny_kaz, scripted_env):
    import json

    folder = _train(tiny_kaz, scripted_env, "nnUNetTrainerSGDR_paperShort")
    manifest = json.loads((folder / "snapshots.json").read_text())
    assert manifest["cycle_ends"] == list(CYCLE_ENDS) and manifest["top_k"] == 3
    assert (manifest["lr_max"], manifest["lr_min"]) == (0.1, 1e-4)  # paper 002 Appendix A
    # the rule, recomputed from the logged EMA pseudo-Dice: the top 3 of each cycle's last 4 epochs; a cycle
    # is dropped when its best is not above the last kept cycle's best
    logged = _load(folder / "checkpoint_final.pth")["logging"]
    assert logged["ema_fg_dice"] == pytest.approx(EMA)
    kept, dropped, last_best = {}, [], None
    for c, end in enumerate(CYCLE_ENDS):
        window = list(range(end - 4, end))
        top = sorted(sorted(window, key=lambda e: -logged["ema_fg_dice"][e])[:3])
        best = max(logged["ema_fg_dice"][e] for e in window)
        if last_best is not None and best <= last_best:
            dropped.append(c)
        else:
            kept[c], last_best = top, best
    assert kept == EXPECTED_SNAPSHOTS and dropped == [1]
    assert manifest["dropped_cycles"] == dropped
    by_cycle = {}
    for s in manifest["snapshots"]:
        by_cycle.setdefault(s["cycle"], []).append(s["epoch"])
    assert {c: sorted(e) for c, e in by_cycle.items()} == kept  # 3 per kept cycle, 9 in all
    on_disk = sorted(p.name for p in folder.glob("checkpoint_snapshot_*.pth"))
    assert on_disk == sorted(s["file"] for s in manifest["snapshots"]) and len(on_disk) == 9
    # the logged learning rates are torch's CosineAnnealingWarmRestarts with lr 0.1 / 1e-4: one 4-epoch cycle,
    # then T_0 = 4 doubling from epoch 4 (the shortened 100 / 200 / 400 / 800)
    ref = []
    for start, stop in ((0, 4), (4, 32)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=1e-4)
        for _ in range(start, stop):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert logged["lrs"] == pytest.approx(ref, rel=1e-9)
    # each snapshot holds the weights of its own epoch
    for s in manifest["snapshots"]:
        assert _load(folder / s["file"])["current_epoch"] == s["epoch"] + 1


def test_adam_trainer_restores_the_best_validation_weights_and_stops_early(tiny_kaz, scripted_env):
    folder = _train(tiny_kaz, scripted_env, "XBoundNetTrainer_Adam_scripted")
    final = _load(folder / "checkpoint_final.pth")
    losses = final["logging"]["val_losses"]
    assert losses == pytest.approx(VAL_LOSSES[:4])  # patience 2 after the best epoch 1: epochs 0-3 ran
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best == 1
    weights = final["network_weights"]
    for epoch in range(4):
        other = torch.load(folder / f"weights_epoch{epoch}.pt", map_location="cpu")
        same = all(torch.equal(weights[k], other[k]) for k in weights)
        assert same == (epoch == best), epoch  # final == the best epoch's weights, and only those
    best_file = _load(folder / "checkpoint_best_val_loss.pth")
    assert all(torch.equal(weights[k], best_file["network_weights"][k]) for k in weights)
    # nnU-Net's per-epoch scheduler call is a no-op for the plateau scheduler: the lr stayed at 1e-4
    assert final["logging"]["lrs"] == pytest.approx([1e-4] * 4)


def test_plateau_scheduler_ignores_nnunets_epoch_step():
    from nnunet_kaz.trainers.xboundnet_trainer import ValidationLossPlateau

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = ValidationLossPlateau(opt, mode="min", factor=0.1, patience=1)
    for epoch in range(10):
        sched.step(epoch)  # what nnU-Net's on_train_epoch_start calls
    assert opt.param_groups[0]["lr"] == 1e-4
    for loss in (1.0, 1.0, 1.0):
        sched.step_validation_loss(loss)
    assert math.isclose(opt.param_groups[0]["lr"], 1e-5)


@pytest.mark.parametrize("resume_at", [1, 4, 7, 11])
def test_plateau_state_of_a_resumed_run_equals_the_uninterrupted_run(resume_at):
    """nnU-Net's checkpoints hold the optimizer (its lr) but not the scheduler: `replay` rebuilds the rest
    from the logged losses, so the resumed run reduces the lr at the same epochs as one that never stopped."""
    from nnunet_kaz.trainers.xboundnet_trainer import ValidationLossPlateau

    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 0.85, 0.9, 0.9, 0.9, 0.91, 0.92, 0.8, 0.81, 0.82, 0.83, 0.84]

    def scheduler(lr):
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return opt, ValidationLossPlateau(opt, mode="min", factor=0.1, patience=2, cooldown=1)

    opt, sched = scheduler(1e-4)
    reference = []
    for loss in losses:
        sched.step_validation_loss(loss)
        reference.append(opt.param_groups[0]["lr"])
    assert len(set(reference)) >= 3  # the sequence does trigger reductions
    resumed_opt, resumed = scheduler(reference[resume_at - 1])  # the checkpoint's optimizer lr
    resumed.replay(losses[:resume_at])
    assert resumed_opt.param_groups[0]["lr"] == reference[resume_at - 1]
    got = []
    for loss in losses[resume_at:]:
        resumed.step_validation_loss(loss)
        got.append(resumed_opt.param_groups[0]["lr"])
    assert got == pytest.approx(reference[resume_at:], rel=1e-12)
