"""Paper 000's training recipe (`XBoundNetTrainerPaper`, issue 21) read from real `nnUNetv2_train` runs: what the
run used (fold_N/debug.json holds the trainer's attributes as strings), epochs that are passes over the fold's
training slices, and the plateau / early stopping counted in those passes against a transcription of Keras'
callbacks (the authors' code)."""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch

from nnunet_kaz.paths import trainer_dir
from tests.conftest import KAZ, KAZ_ID, run

pytestmark = pytest.mark.integration

# scripted validation losses (see `keras_reference`): a plateau after epoch 1, a tiny improvement at epoch 4 that
# early stopping counts (any decrease) but the plateau does not (Keras' min_delta 1e-4), then no improvement
VAL_LOSSES = [1.0, 0.8, 0.85, 0.9, 0.79995, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
PLATEAU, STOP = 2, 3

MODULE = textwrap.dedent(f'''
    import json
    import os
    import torch
    from nnunet_kaz.trainers import XBoundNetTrainerPaper_debug

    VAL_LOSSES = {VAL_LOSSES!r}


    class _Recorded(XBoundNetTrainerPaper_debug):
        """Records every batch's cases and the validation loss the trainer computed; then logs a scripted one."""
        max_epochs = {len(VAL_LOSSES)}
        plateau_patience = {PLATEAU}
        early_stopping_patience = {STOP}

        def _record(self, **row):
            with open(os.path.join(self.output_folder, "record.jsonl"), "a") as f:
                f.write(json.dumps({{"epoch": self.current_epoch, **row}}) + "\\n")

        def train_step(self, batch):
            self._record(kind="train", keys=[str(k) for k in batch["keys"]], n=int(batch["data"].shape[0]))
            return super().train_step(batch)

        def validation_step(self, batch):
            out = super().validation_step(batch)
            self._record(kind="val", keys=[str(k) for k in batch["keys"]], loss=float(out["loss"]))
            return out

        def on_validation_epoch_end(self, val_outputs):
            super().on_validation_epoch_end(val_outputs)
            self._record(kind="val_loss", value=float(self.logger.get_value("val_losses", step=-1)))
            self.logger.log("val_losses", VAL_LOSSES[self.current_epoch], self.current_epoch)

        def on_epoch_end(self):
            torch.save({{k: v.detach().clone() for k, v in self.network.state_dict().items()}},
                       os.path.join(self.output_folder, f"weights_epoch{{self.current_epoch}}.pt"))
            super().on_epoch_end()


    class XBoundNetTrainerPaper_recorded(_Recorded):
        pass


    class XBoundNetTrainerPaper_recordedShuffled(_Recorded):
        shuffle_training_cases = True
''')


def keras_reference(losses, plateau_patience, stop_patience, lr=1e-4, factor=0.1, min_delta=1e-4):
    """Transcription of Keras' ReduceLROnPlateau (min_delta absolute, `wait >= patience`) and EarlyStopping
    (min_delta 0, `wait >= patience`, restore_best_weights) as the authors' model.fit runs them: the learning rate
    of each epoch that runs, and the best epoch."""
    lrs, best_p, wait_p, best_e, wait_e, best_epoch = [], np.inf, 0, np.inf, 0, None
    for epoch, loss in enumerate(losses):
        lrs.append(lr)
        if loss < best_p - min_delta:
            best_p, wait_p = loss, 0
        else:
            wait_p += 1
            if wait_p >= plateau_patience:
                lr, wait_p = lr * factor, 0
        wait_e += 1
        if loss < best_e:
            best_e, best_epoch, wait_e = loss, epoch, 0
        elif wait_e >= stop_patience:
            break
    return lrs, best_epoch


def _debug(folder):
    return json.loads((folder / "fold_0" / "debug.json").read_text())


def _fold0_split(tiny_kaz):
    return json.loads((tiny_kaz.root / "nnUNet_preprocessed" / KAZ / "splits_final.json").read_text())[0]


@pytest.fixture(scope="module")
def recorded_env(tiny_kaz, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ext_paper_trainers")
    (folder / "kaz_paper_recorded.py").write_text(MODULE)
    return dict(tiny_kaz.env, nnUNet_extTrainer=f"{trainer_dir()}:{folder}")


@pytest.fixture(scope="module")
def recorded(tiny_kaz, recorded_env):
    """Train a recorded trainer once per module (real nnUNetv2_train, `nnUNet_n_proc_DA` workers)."""
    done = {}

    def train(trainer: str, n_proc: str):
        if trainer not in done:
            run(["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", trainer, "-p", "nnUNetTinyPlans", "-device",
                 "cpu"], dict(recorded_env, nnUNet_n_proc_DA=n_proc))
            done[trainer] = tiny_kaz.results(trainer)
        return done[trainer]
    return train


def test_the_run_uses_paper_000s_recipe(tiny_kaz, recorded):
    """Optimiser, weight decay, batch size, single output, loss, augmentation and epoch length as the stock
    nnUNetv2_train ran them (debug.json of the recorded subclass below, which changes only the epoch count and
    the patiences), against the paper's numbers and the fold's split."""
    folder = recorded("XBoundNetTrainerPaper_recorded", "0")
    debug = _debug(folder)
    plans = json.loads((tiny_kaz.root / "nnUNet_preprocessed" / KAZ / "nnUNetTinyPlans.json").read_text())
    assert plans["configurations"]["2d"]["batch_size"] == 2  # the plans say 2: the 4 below is the recipe's
    assert debug["batch_size"] == "4"
    assert debug["optimizer"].startswith("Adam (") and "lr: 0.0001" in debug["optimizer"]
    assert "weight_decay: 0.0\n" in debug["optimizer"] and debug["weight_decay"] == "0.0"
    assert debug["enable_deep_supervision"] == "False" and debug["network"] == "XBoundNet"
    assert "DeepSupervisionWrapper" not in debug["loss"]  # a list of outputs would not even reach this loss
    assert "MemoryEfficientLogDiceLoss" in debug["loss"] and "RobustCrossEntropyLoss" in debug["loss"]
    assert debug["oversample_foreground_percent"] == "0.0"
    assert "PaperSpatialTransform" in debug["data_augmentation"] and "RandomTransform(p=0.3, transform=Contrast" \
        in debug["data_augmentation"] and "rotation_deg=20.0" in debug["data_augmentation"]
    split = _fold0_split(tiny_kaz)
    assert debug["num_iterations_per_epoch"] == str(math.ceil(len(split["train"]) / 4))
    assert debug["num_val_iterations_per_epoch"] == str(math.ceil(len(split["val"]) / 4))
    assert f"over {len(split['train'])} cases, batch 4" in debug["data_passes"]
    assert json.loads((folder / "fold_0" / "split.json").read_text()) == {k: sorted(v) for k, v in split.items()}
    assert debug["plateau_patience"] == str(PLATEAU) and debug["early_stopping_patience"] == str(STOP)


@pytest.mark.parametrize("trainer,n_proc", [("XBoundNetTrainerPaper_recorded", "0"),
                                            ("XBoundNetTrainerPaper_recordedShuffled", "2")])
def test_epochs_are_passes_and_the_plateau_and_early_stopping_count_them(tiny_kaz, recorded, trainer, n_proc):
    """Every epoch trains on each of the fold's training slices exactly once (sorted, or a new permutation per
    pass; also with two augmentation workers) and validates on each validation slice once; the learning rate
    drops and training stops at the epochs Keras' callbacks give for the logged losses, so after the same number
    of passes over the training slices; the restored weights are the best epoch's."""
    folder = recorded(trainer, n_proc) / "fold_0"
    split = _fold0_split(tiny_kaz)
    rows = [json.loads(line) for line in (folder / "record.jsonl").read_text().splitlines()]
    ref_lrs, best = keras_reference(VAL_LOSSES, PLATEAU, STOP)
    epochs = sorted({r["epoch"] for r in rows})
    assert epochs == list(range(len(ref_lrs))) and len(ref_lrs) < len(VAL_LOSSES)  # stopped early, as Keras
    orders = []
    for e in epochs:
        train = [r for r in rows if r["epoch"] == e and r["kind"] == "train"]
        keys = [k for r in train for k in r["keys"]]
        assert sorted(keys) == sorted(split["train"])  # one pass: every training slice exactly once
        assert [r["n"] for r in train] == [len(r["keys"]) for r in train]  # the data holds those slices only
        assert len(train) == math.ceil(len(split["train"]) / 4) and all(r["n"] <= 4 for r in train)
        val = [r for r in rows if r["epoch"] == e and r["kind"] == "val"]
        assert sorted(k for r in val for k in r["keys"]) == sorted(split["val"])
        orders.append(keys)
    if trainer.endswith("Shuffled"):
        assert len({tuple(o) for o in orders}) > 1  # a new order per pass (seeded: the same on every run)
    else:
        assert all(o == sorted(split["train"]) for o in orders)  # the authors' fixed order
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["logging"]["lrs"] == pytest.approx(ref_lrs, rel=1e-9)
    n_train = len(split["train"])
    first_drop = next(i for i, lr in enumerate(ref_lrs) if lr < ref_lrs[0])
    seen = sum(len(r["keys"]) for r in rows if r["kind"] == "train" and r["epoch"] < first_drop)
    assert seen == first_drop * n_train  # the plateau waited whole passes over the training slices
    weights = final["network_weights"]
    for e in epochs:
        other = torch.load(folder / f"weights_epoch{e}.pt", map_location="cpu")
        assert all(torch.equal(weights[k], other[k]) for k in weights) == (e == best), e


def test_validation_loss_weights_the_batches_by_their_size():
    """Keras averages the validation loss over batches weighted by their sizes; nnU-Net's plain mean of the
    batches is corrected by the trainer (batches of 4 and 1: (4 x 0.5 + 1 x 2.0) / 5 = 0.8, not 1.25)."""
    from nnunet_kaz.trainers.paper_trainer import XBoundNetTrainerPaper

    class Logger:
        def __init__(self):
            self.logged = {}

        def log(self, key, value, epoch):
            self.logged[key] = value

    trainer = object.__new__(XBoundNetTrainerPaper)  # only what nnU-Net's on_validation_epoch_end reads
    trainer.is_ddp, trainer.current_epoch, trainer.logger = False, 0, Logger()
    counts = {"tp_hard": np.array([1.0]), "fp_hard": np.array([0.0]), "fn_hard": np.array([0.0])}
    outputs = [{"loss": np.float32(0.5), **counts, "n_cases": 4}, {"loss": np.float32(2.0), **counts, "n_cases": 1}]
    trainer.on_validation_epoch_end(outputs)
    assert trainer.logger.logged["val_losses"] == pytest.approx((4 * 0.5 + 1 * 2.0) / 5, rel=1e-6)


def test_keras_plateau_reduces_after_patience_epochs_without_improvement():
    """torch's ReduceLROnPlateau counts `> patience`, Keras `>= patience` (and min_delta absolute): keras_plateau
    gives Keras' epochs, checked against the transcription above on losses that include a sub-min_delta gain."""
    from nnunet_kaz.trainers.xboundnet_trainer import keras_plateau

    losses = [1.0, 0.9, 0.9, 0.95, 0.89995, 0.8, 0.85, 0.86, 0.87, 0.88, 0.7, 0.71]
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = keras_plateau(opt, 0.1, 3)
    got = []
    for loss in losses:
        got.append(opt.param_groups[0]["lr"])
        sched.step_validation_loss(loss)
    ref, _ = keras_reference(losses, 3, len(losses) + 1)
    assert got == pytest.approx(ref, rel=1e-9) and len(set(ref)) == 3
