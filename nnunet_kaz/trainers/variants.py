"""Named trainer variants for `nnUNetv2_train -tr NAME`: short schedules for tests and the CPU demo (in the
style of nnU-Net's `_5epochs` trainers), dropout rates and seeds in the class name.

Every class here is created at import time and exported, so nnU-Net's lookup (a name in the module that
`nnUNet_extTrainer` points at) finds it, and each lands in its own results folder.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kaz.trainers.augmentation import PaperDAMixin
from nnunet_kaz.trainers.dropout_trainer import (
    nnUNetTrainerDropout,
    nnUNetTrainerDropoutSpatial,
    nnUNetTrainerDropoutSpatialWCE,
)
from nnunet_kaz.trainers.mhex_trainer import XBoundNetTrainerMHEX, nnUNetTrainerMHEX
from nnunet_kaz.trainers.paper_trainer import XBoundNetTrainerPaper
from nnunet_kaz.trainers.relunet_trainer import RelUNetTrainer, RelUNetTrainer_fullTrain
from nnunet_kaz.trainers.seeding import SeededTrainerMixin
from nnunet_kaz.trainers.sgdr_trainer import XBoundNetTrainerSGDR, nnUNetTrainerSGDR
from nnunet_kaz.trainers.weighted_ce import XBoundNetTrainerWCE, nnUNetTrainerWCE
from nnunet_kaz.trainers.xboundnet_trainer import XBoundNetTrainer, XBoundNetTrainer_Adam

SEEDS = range(5)
DROPOUT_RATES = {"p01": 0.1, "p02": 0.2, "p03": 0.3, "p05": 0.5}
DEBUG = dict(num_epochs=2, num_iterations_per_epoch=3, num_val_iterations_per_epoch=2)
DEMO = dict(num_epochs=10, num_iterations_per_epoch=12, num_val_iterations_per_epoch=3)
# SGDR short runs: two cycles each, snapshots from the last epochs of each cycle
SGDR_DEBUG = dict(num_epochs=6, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1)
SGDR_DEBUG_ATTRS = dict(sgdr_cycle_ends=(3, 6), snapshot_window=2, snapshot_top_k=2,
                        snapshot_drop_margin=None)  # keep both cycles: tests count snapshots per cycle
SGDR_DEMO = dict(num_epochs=12, num_iterations_per_epoch=12, num_val_iterations_per_epoch=3)
SGDR_DEMO_ATTRS = dict(sgdr_cycle_ends=(4, 12), snapshot_window=3, snapshot_top_k=2)

_registry: dict[str, type] = {}


def variant(base: type, name: str, doc: str, schedule: dict | None = None, mixins: tuple = (),
            **attrs) -> type:
    """Subclass `base` (after `mixins`) with class attributes `attrs` and, if given, a schedule
    (num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch) set after nnU-Net's __init__."""
    namespace = {"__doc__": doc, "__module__": __name__, **attrs}
    if schedule:
        # explicit signature: nnUNetTrainer.__init__ records its caller's parameters by name for checkpoints
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super(cls, self).__init__(plans, configuration, fold, dataset_json, device)
            for key, value in schedule.items():
                setattr(self, key, value)

        namespace["__init__"] = __init__
    cls = type(name, (*mixins, base), namespace)
    _registry[name] = cls
    return cls


def _with_seeds(base: type) -> None:
    mixins = () if issubclass(base, SeededTrainerMixin) else (SeededTrainerMixin,)
    for s in SEEDS:
        variant(base, f"{base.__name__}_seed{s}", f"{base.__name__} with seed {s} (init, augmentation, dropout).",
                mixins=mixins, seed=s)


def _test_variant(base: type, name: str, doc: str, schedule: dict, **attrs) -> type:
    """A variant for the tests, seeded (0) so that a test sees the same trained model on every run: with
    `nnUNet_n_proc_DA=0` on the CPU its weights are bit-identical from run to run (seeding.py)."""
    return variant(base, name, f"{doc} Seeded (0).", schedule, mixins=(SeededTrainerMixin,), seed=0, **attrs)


_short = [
    _test_variant(nnUNetTrainer, "nnUNetTrainer_debug", "nnU-Net's default trainer for tests: 2 epochs x 3 iterations.",
                  DEBUG),
    _test_variant(XBoundNetTrainer, "XBoundNetTrainer_debug", "XBoundNetTrainer for tests: 2 epochs x 3 iterations.",
                  DEBUG),
    variant(XBoundNetTrainer, "XBoundNetTrainer_demo", "XBoundNetTrainer for the CPU demo: 10 epochs x 12 "
            "iterations, features capped at 32.", DEMO, max_features=32),
    _test_variant(XBoundNetTrainer_Adam, "XBoundNetTrainer_Adam_debug", "XBoundNetTrainer_Adam for tests.", DEBUG),
    _test_variant(nnUNetTrainerSGDR, "nnUNetTrainerSGDR_debug", "nnUNetTrainerSGDR for tests: cycles end at 3, 6.",
                  SGDR_DEBUG, **SGDR_DEBUG_ATTRS),
    _test_variant(XBoundNetTrainerSGDR, "XBoundNetTrainerSGDR_debug",
                  "XBoundNetTrainerSGDR for tests: cycles end at 3, 6.",
                  SGDR_DEBUG, **SGDR_DEBUG_ATTRS),
    variant(XBoundNetTrainerSGDR, "XBoundNetTrainerSGDR_demo", "XBoundNetTrainerSGDR for the demo: cycles end at "
            "epochs 4 and 12, top-2 of the last 3 epochs of each, features capped at 32.", SGDR_DEMO,
            max_features=32, **SGDR_DEMO_ATTRS),
]
# loss and augmentation variants (issue 3 item 6)
_loss_da = [
    _test_variant(nnUNetTrainerWCE, "nnUNetTrainerWCE_debug", "nnUNetTrainerWCE for tests.", DEBUG),
    _test_variant(XBoundNetTrainerWCE, "XBoundNetTrainerWCE_debug", "XBoundNetTrainerWCE for tests.", DEBUG),
    variant(XBoundNetTrainer, "XBoundNetTrainer_paperDA", "XBoundNetTrainer with paper 000's augmentation recipe "
            "(30% spatial: flip, +-10% shift, +-20 deg, zoom 0.9-1.1; 30% contrast 0.8-1.2).", mixins=(PaperDAMixin,)),
]
_test_variant(_registry["XBoundNetTrainer_paperDA"], "XBoundNetTrainer_paperDA_debug",
              "XBoundNetTrainer_paperDA for tests.", DEBUG)
_dropout = [variant(nnUNetTrainerDropout, f"nnUNetTrainerDropout_{tag}",
                    f"nnU-Net's network with element-wise dropout p = {p} after the nonlinearity of every "
                    "convolution (Gal & Ghahramani).", dropout_p=p)
            for tag, p in DROPOUT_RATES.items()]
_dropout += [variant(nnUNetTrainerDropoutSpatial, f"nnUNetTrainerDropoutSpatial_{tag}",
                     f"nnU-Net's network with spatial (channel) dropout p = {p}, Dropout2d/3d, after the "
                     "nonlinearity of every convolution (paper 004).", dropout_p=p)
             for tag, p in DROPOUT_RATES.items()]
# paper 004's recipe: spatial dropout and weighted cross-entropy (issue 22)
_dropout += [variant(nnUNetTrainerDropoutSpatialWCE, f"nnUNetTrainerDropoutSpatialWCE_{tag}",
                     f"Paper 004's recipe: spatial dropout p = {p} after the nonlinearity of every convolution "
                     "and inverse-frequency weighted cross-entropy.", dropout_p=p)
             for tag, p in DROPOUT_RATES.items()]
_test_variant(_registry["nnUNetTrainerDropout_p02"], "nnUNetTrainerDropout_p02_debug",
              "nnUNetTrainerDropout_p02 for tests.", DEBUG)
_test_variant(_registry["nnUNetTrainerDropoutSpatial_p02"], "nnUNetTrainerDropoutSpatial_p02_debug",
              "nnUNetTrainerDropoutSpatial_p02 for tests.", DEBUG)
_test_variant(_registry["nnUNetTrainerDropoutSpatialWCE_p02"], "nnUNetTrainerDropoutSpatialWCE_p02_debug",
              "nnUNetTrainerDropoutSpatialWCE_p02 for tests.", DEBUG)

# MHEX+ heads (issue 7, paper 003)
_mhex = [
    # the plans' depth: the depth cap leaves 2 stages (one head) on tiny test patches, and the collaboration map
    # needs adjacent heads
    _test_variant(XBoundNetTrainerMHEX, "XBoundNetTrainerMHEX_debug",
                  "XBoundNetTrainerMHEX for tests, at the plans' depth.",
                  DEBUG, keep_planned_depth=True),
    _test_variant(nnUNetTrainerMHEX, "nnUNetTrainerMHEX_debug", "nnUNetTrainerMHEX for tests.", DEBUG),
    _test_variant(nnUNetTrainerMHEX, "nnUNetTrainerMHEX_demo", "nnUNetTrainerMHEX for tests that need a member "
                  "that segments (the 6-iteration one may predict nothing): 10 epochs x 12 iterations.", DEMO),
    variant(XBoundNetTrainerMHEX, "XBoundNetTrainerMHEX_demo", "XBoundNetTrainerMHEX for the CPU demo: 10 epochs x "
            "12 iterations, features capped at 32.", DEMO, max_features=32),
]

# Rel-UNet (issue 22, paper 002): its recipe, the full-train ensemble, seeds, short seeded test variants (the
# debug one on SGDR_DEBUG's two cycles; the full-train one 10 epochs, so 60..100 % are 5 distinct epochs)
_relunet = [
    _test_variant(RelUNetTrainer, "RelUNetTrainer_debug", "RelUNetTrainer for tests: cycles end at 3, 6.",
                  SGDR_DEBUG, **SGDR_DEBUG_ATTRS),
    _test_variant(RelUNetTrainer_fullTrain, "RelUNetTrainer_fullTrain_debug", "RelUNetTrainer_fullTrain for tests: "
                  "10 epochs (cycles end at 5, 10), snapshots after 6, 7, 8, 9, 10.",
                  dict(num_epochs=10, num_iterations_per_epoch=1, num_val_iterations_per_epoch=1),
                  sgdr_cycle_ends=(5, 10)),
]

# paper 000's recipe (issue 21): epochs are passes over the fold's training slices, so the short variants only
# lower the maximum epoch count (and, for the demo, the patiences, so its few epochs show the plateau)
_paper = [
    _test_variant(XBoundNetTrainerPaper, "XBoundNetTrainerPaper_debug",
                  "XBoundNetTrainerPaper for tests: at most 2 epochs (passes).", None, max_epochs=2),
    variant(XBoundNetTrainerPaper, "XBoundNetTrainerPaper_demo", "XBoundNetTrainerPaper for the CPU demo: at most 6 "
            "epochs (passes), plateau patience 2, early stopping patience 4, features capped at 32.",
            max_epochs=6, plateau_patience=2, early_stopping_patience=4, max_features=32),
    # 2 passes at lr 1e-4 leave a tiny test model predicting nothing after calibration; the nested protocol's test
    # needs members that segment, so that its Table 1 holds real distances
    _test_variant(XBoundNetTrainerPaper, "XBoundNetTrainerPaper_debugSegments", "XBoundNetTrainerPaper for tests "
                  "that need members that segment: Adam lr 3e-3, at most 10 epochs (passes).", None,
                  max_epochs=10, initial_lr_adam=3e-3),
]

for _base in (XBoundNetTrainer, XBoundNetTrainerSGDR, _registry["nnUNetTrainerDropout_p02"],
              _registry["XBoundNetTrainer_debug"], _registry["XBoundNetTrainer_demo"],
              _registry["XBoundNetTrainerSGDR_demo"], RelUNetTrainer, RelUNetTrainer_fullTrain,
              XBoundNetTrainerPaper, *_paper):
    _with_seeds(_base)

globals().update(_registry)
__all__ = sorted(_registry)
