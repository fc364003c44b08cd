"""nnUNetTrainer subclasses found by the stock `nnUNetv2_train -tr NAME` once
`export nnUNet_extTrainer=$(nnunet-kaz trainer-dir)` is set (see `nnunet_kaz.paths.trainer_dir`).

Base trainers: XBoundNetTrainer, XBoundNetTrainer_Adam, XBoundNetTrainerSGDR, nnUNetTrainerSGDR, RelUNetTrainer
(paper 002's recipe: SGDR, Dice loss, batch 40, for ResEnc L 2D plans) and RelUNetTrainer_fullTrain,
nnUNetTrainerDropout (element-wise), nnUNetTrainerDropoutSpatial (Dropout2d/3d, paper 004; both after the
nonlinearity), nnUNetTrainerDropoutSpatialWCE (paper 004's recipe), nnUNetTrainerWCE / XBoundNetTrainerWCE
(weighted cross-entropy), PaperDAMixin (paper 000's augmentation, as XBoundNetTrainer_paperDA). MHEX+ heads
(paper 003): XBoundNetTrainerMHEX, nnUNetTrainerMHEX (`mhex_trainer`). Paper 000's whole recipe:
XBoundNetTrainerPaper (`paper_trainer`). Named variants (short schedules, dropout rates, seeds) live in `variants`.

Exports are lazy (nnunet_kaz.lazy), so `nnunet-kaz trainer-dir` does not import nnU-Net; `__all__` (and so
`from nnunet_kaz.trainers import *`, which the trainer folder's module does) includes every named variant.
"""
import importlib

from nnunet_kaz.lazy import lazy_exports

_EXPORTS = {
    "trainer_dir": "nnunet_kaz.paths",
    "XBoundNetTrainer": "xboundnet_trainer", "XBoundNetTrainer_Adam": "xboundnet_trainer",
    "build_logdice_ce_loss": "losses",
    "XBoundNetTrainerSGDR": "sgdr_trainer", "nnUNetTrainerSGDR": "sgdr_trainer", "SGDRSnapshotMixin": "sgdr_trainer",
    "XBoundNetTrainerSGDR_nnUNetLR": "sgdr_trainer", "nnUNetTrainerSGDR_nnUNetLR": "sgdr_trainer",
    "nnUNetTrainerDropout": "dropout_trainer", "nnUNetTrainerDropoutSpatial": "dropout_trainer",
    "nnUNetTrainerDropoutSpatialWCE": "dropout_trainer",
    "SeededTrainerMixin": "seeding",
    "nnUNetTrainerWCE": "weighted_ce", "XBoundNetTrainerWCE": "weighted_ce", "WeightedCEMixin": "weighted_ce",
    "PaperDAMixin": "augmentation", "PaperDARecipe": "augmentation",
    "RelUNetTrainer": "relunet_trainer", "RelUNetTrainer_fullTrain": "relunet_trainer",
    "XBoundNetTrainerMHEX": "mhex_trainer", "nnUNetTrainerMHEX": "mhex_trainer", "MHEXTrainerMixin": "mhex_trainer",
    "XBoundNetTrainerPaper": "paper_trainer",
}
_static_getattr, _static_dir = lazy_exports(__name__, {k: v for k, v in _EXPORTS.items() if "." not in v})


def __getattr__(name: str):
    if name == "trainer_dir":
        from nnunet_kaz.paths import trainer_dir

        return trainer_dir
    if name in _EXPORTS:
        return _static_getattr(name)
    variants = importlib.import_module(f"{__name__}.variants")
    if name == "__all__":
        return [*_EXPORTS, *variants.__all__]
    if name in variants.__all__:
        return getattr(variants, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__getattr__("__all__"))
