"""nnUNetTrainer subclasses found by the stock `nnUNetv2_train -tr NAME` once
`export nnUNet_extTrainer=$(nnunet-kaz trainer-dir)` is set (see `nnunet_kaz.paths.trainer_dir`).

Base trainers: XBoundNetTrainer, XBoundNetTrainer_Adam, XBoundNetTrainerSGDR, nnUNetTrainerSGDR,
nnUNetTrainerDropout, nnUNetTrainerWCE / XBoundNetTrainerWCE (weighted cross-entropy), PaperDAMixin (paper
000's augmentation, as XBoundNetTrainer_paperDA). MHEX+ heads (paper 003): XBoundNetTrainerMHEX, nnUNetTrainerMHEX
(`mhex_trainer`). Named variants (short schedules, dropout rates, seeds) live in
`variants`.
"""
from nnunet_kaz.paths import trainer_dir
from nnunet_kaz.trainers import variants as _variants
from nnunet_kaz.trainers.augmentation import PaperDAMixin, PaperDARecipe
from nnunet_kaz.trainers.dropout_trainer import nnUNetTrainerDropout
from nnunet_kaz.trainers.losses import build_logdice_ce_loss
from nnunet_kaz.trainers.mhex_trainer import MHEXTrainerMixin, XBoundNetTrainerMHEX, nnUNetTrainerMHEX
from nnunet_kaz.trainers.seeding import SeededTrainerMixin
from nnunet_kaz.trainers.sgdr_trainer import SGDRSnapshotMixin, XBoundNetTrainerSGDR, nnUNetTrainerSGDR
from nnunet_kaz.trainers.variants import *  # noqa: F401,F403  (the named variants)
from nnunet_kaz.trainers.weighted_ce import WeightedCEMixin, XBoundNetTrainerWCE, nnUNetTrainerWCE
from nnunet_kaz.trainers.xboundnet_trainer import XBoundNetTrainer, XBoundNetTrainer_Adam

__all__ = [
    "XBoundNetTrainer", "XBoundNetTrainer_Adam", "XBoundNetTrainerSGDR", "nnUNetTrainerSGDR",
    "nnUNetTrainerDropout", "SGDRSnapshotMixin", "SeededTrainerMixin", "build_logdice_ce_loss", "trainer_dir",
    "nnUNetTrainerWCE", "XBoundNetTrainerWCE", "WeightedCEMixin", "PaperDAMixin", "PaperDARecipe",
    "XBoundNetTrainerMHEX", "nnUNetTrainerMHEX", "MHEXTrainerMixin",
    *_variants.__all__,
]
