"""nnUNetTrainer subclasses found by the stock `nnUNetv2_train -tr NAME` once
`export nnUNet_extTrainer=$(nnunet-kaz trainer-dir)` is set (see `nnunet_kaz.paths.trainer_dir`).

Base trainers: XBoundNetTrainer, XBoundNetTrainer_Adam, XBoundNetTrainerSGDR, nnUNetTrainerSGDR,
nnUNetTrainerDropout. Named variants (short schedules, dropout rates, seeds) live in `variants`.
"""
from nnunet_kaz.paths import trainer_dir
from nnunet_kaz.trainers import variants as _variants
from nnunet_kaz.trainers.dropout_trainer import nnUNetTrainerDropout
from nnunet_kaz.trainers.losses import build_logdice_ce_loss
from nnunet_kaz.trainers.seeding import SeededTrainerMixin
from nnunet_kaz.trainers.sgdr_trainer import SGDRSnapshotMixin, XBoundNetTrainerSGDR, nnUNetTrainerSGDR
from nnunet_kaz.trainers.variants import *  # noqa: F401,F403  (the named variants)
from nnunet_kaz.trainers.xboundnet_trainer import XBoundNetTrainer, XBoundNetTrainer_Adam

__all__ = [
    "XBoundNetTrainer", "XBoundNetTrainer_Adam", "XBoundNetTrainerSGDR", "nnUNetTrainerSGDR",
    "nnUNetTrainerDropout", "SGDRSnapshotMixin", "SeededTrainerMixin", "build_logdice_ce_loss", "trainer_dir",
    *_variants.__all__,
]
