"""`XBoundNetTrainerPaper`: paper 000's training recipe (sections 2.1 and 3.1) on the stock `nnUNetv2_train`.

The recipe, and where nnU-Net's machinery is bent to it:
- network: XBoundNet++ from the plans with ONE output (no deep supervision; the authors' network has none);
- loss: 0.7 LogDice + 0.3 CE (paper 000 eq. 1; CE on two softmax classes is BCE on the foreground logit
  difference), the soft Dice taken over the whole batch as the authors' `log_dice_loss` (flattened batch);
- optimiser: Adam, lr 1e-4, no weight decay (Keras' Adam has none), batch size 4 whatever the plans say;
- ReduceLROnPlateau (factor 0.1, patience 15) and early stopping (patience 50) on the validation loss, Keras'
  semantics (XBoundNetTrainer_Adam), the lowest-validation-loss weights restored as `checkpoint_final.pth`;
  at most `max_epochs` = 400 epochs (the authors' `epochs = 400`; the paper states none);
- an epoch is ONE PASS over the fold's training cases: ceil(n_train / 4) iterations, every training case exactly
  once, no foreground oversampling (`EpochPassDataLoader` instead of nnU-Net's sampling with replacement); the
  order is the sorted case list every epoch, as the authors' unshuffled `tf.data` pipeline (the paper is silent;
  `shuffle_training_cases = True` draws a seeded permutation per pass instead);
- the validation loss of an epoch is the loss over ALL the fold's validation cases, once each, in batches of 4
  without augmentation and with dropout off (Keras' `validation_data`): the per-batch losses averaged with the
  batch sizes as weights (the last batch may be smaller), as Keras averages;
- paper 000's augmentation (PaperDAMixin).
For a 2D KAZ dataset a case is one slice; for the 2d configuration of 3D volumes a case is a volume from which
nnU-Net's loader cuts one random slice, so an epoch is then one slice per volume.

With augmentation workers (`nnUNet_n_proc_DA` > 0) batches come from batchgenerators' deterministic
MultiThreadedAugmenter (worker w makes global batches w, w + W, ...; handed over in that order) instead of
nnU-Net's NonDetMultiThreadedAugmenter, whose arrival order would mix batches of neighbouring passes. DDP is
refused (one GPU and batch 4 is the paper's setting).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_kaz.trainers.augmentation import PaperDAMixin
from nnunet_kaz.trainers.checked_resume import refuse_to_start
from nnunet_kaz.trainers.xboundnet_trainer import XBoundNetTrainer_Adam

SPLIT_FILE = "split.json"  # fold_N/split.json: the training and validation cases this run used


class EpochPassDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader (crop, pad, transforms unchanged) walking the cases in passes instead of sampling with
    replacement: global batch g holds cases [b * B, (b + 1) * B) of pass p = g // n_batches (b = g % n_batches,
    n_batches = ceil(n / B); the last batch of a pass holds the n mod B rest). A pass is the sorted case list, or
    with `shuffle` a permutation drawn from (`pass_seed`, p), the same in every worker. Worker w of W (its
    `thread_id`) makes global batches start + w, start + w + W, ...; `rewind` sets start and W."""

    @classmethod
    def adopt(cls, loader: nnUNetDataLoader, shuffle: bool, pass_seed: int) -> "EpochPassDataLoader":
        """Turn nnU-Net's loader, built by nnUNetTrainer.get_dataloaders with the trainer's patch sizes and
        transforms, into a pass loader in place (nnU-Net constructs its loader class itself, so there is no hook
        to pass another class; its state and configuration are kept as they are)."""
        loader.__class__ = cls
        loader.order = sorted(loader.indices)
        loader.shuffle, loader.pass_seed = shuffle, int(pass_seed)
        loader.oversample_foreground_percent = 0.0  # every case as it comes, no forced foreground crops
        loader.rewind(0, 1)
        return loader

    @property
    def batches_per_pass(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def rewind(self, start_batch: int, n_workers: int) -> None:
        self.start_batch, self.n_workers, self.made = int(start_batch), int(n_workers), 0

    def pass_cases(self, p: int) -> list[str]:
        if not self.shuffle:
            return list(self.order)
        return [self.order[i] for i in np.random.default_rng([self.pass_seed, p]).permutation(len(self.order))]

    def get_indices(self) -> list[str]:
        g = self.start_batch + self.thread_id + self.made * self.n_workers
        self.made += 1
        p, b = divmod(g, self.batches_per_pass)
        return self.pass_cases(p)[b * self.batch_size:(b + 1) * self.batch_size]

    def generate_train_batch(self) -> dict:
        batch = super().generate_train_batch()  # preallocates batch_size rows; a pass's last batch fills fewer
        n = len(batch["keys"])
        if n < self.batch_size:
            batch["data"] = batch["data"][:n]
            target = batch["target"]
            batch["target"] = [t[:n] for t in target] if isinstance(target, list) else target[:n]
        return batch


class XBoundNetTrainerPaper(PaperDAMixin, XBoundNetTrainer_Adam):
    """Paper 000's recipe (module docstring). Class attributes: `paper_batch_size` (4), `max_epochs` (400),
    `shuffle_training_cases` (False: the authors' fixed order), `loss_batch_dice` (True: one soft Dice over the
    batch), and those of XBoundNetTrainer_Adam (`initial_lr_adam`, `plateau_factor`, `plateau_patience`,
    `early_stopping_patience`) and PaperDAMixin (`paper_da`)."""

    paper_batch_size: int = 4
    max_epochs: int = 400
    shuffle_training_cases: bool = False
    loss_batch_dice: bool | None = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weight_decay = 0.0
        self.enable_deep_supervision = False
        self.oversample_foreground_percent = 0.0
        self.num_epochs = self.max_epochs

    def initialize(self):
        if self.is_ddp:
            refuse_to_start(self, f"{type(self).__name__} trains on one device (paper 000: batch size 4); "
                                  "run nnUNetv2_train without -num_gpus")
        super().initialize()

    def _set_batch_size_and_oversample(self):
        self.batch_size = self.paper_batch_size
        self.oversample_foreground_percent = 0.0

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self.num_iterations_per_epoch = math.ceil(len(dataset_tr.identifiers) / self.batch_size)
        self.num_val_iterations_per_epoch = math.ceil(len(dataset_val.identifiers) / self.batch_size)
        if self.local_rank == 0:
            os.makedirs(self.output_folder, exist_ok=True)
            with open(os.path.join(self.output_folder, SPLIT_FILE), "w") as f:
                json.dump({"train": sorted(dataset_tr.identifiers), "val": sorted(dataset_val.identifiers)}, f,
                          indent=1)
        self.print_to_log_file(f"one epoch = one pass over the {len(dataset_tr.identifiers)} training cases: "
                               f"{self.num_iterations_per_epoch} iterations of batch {self.batch_size}; validation "
                               f"loss over all {len(dataset_val.identifiers)} validation cases "
                               f"({self.num_val_iterations_per_epoch} batches)")
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        train, val = super().get_dataloaders()
        # drawn in the main process from numpy's state (seeded by the _seedN variants), so every worker walks the
        # same permutations
        pass_seed = int(np.random.randint(2 ** 31 - 1))
        train = self._pass_augmenter(train, self.shuffle_training_cases, pass_seed)
        val = self._pass_augmenter(val, False, pass_seed)
        # what the run really used, as strings in fold_N/debug.json (nnU-Net records only the augmenter objects)
        loaders = {"train": self._loader(train), "val": self._loader(val)}
        self.data_augmentation = repr(loaders["train"].transforms)
        self.data_passes = "; ".join(
            f"{k}: {type(dl).__name__} over {len(dl.order)} cases, batch {dl.batch_size}, {dl.batches_per_pass} "
            f"batches per pass, {'shuffled' if dl.shuffle else 'sorted'} order, foreground oversampling "
            f"{dl.oversample_foreground_percent}" for k, dl in loaders.items())
        return train, val

    @staticmethod
    def _loader(gen) -> EpochPassDataLoader:
        return gen.data_loader if isinstance(gen, SingleThreadedAugmenter) else gen.generator

    @staticmethod
    def _pass_augmenter(gen, shuffle: bool, pass_seed: int):
        """The same augmenter with a pass loader; nnU-Net's non-deterministic multi-process augmenter replaced by
        batchgenerators' deterministic one (same workers, cache and pinning) so batches arrive in pass order."""
        if isinstance(gen, SingleThreadedAugmenter):
            EpochPassDataLoader.adopt(gen.data_loader, shuffle, pass_seed)
            return gen
        if not isinstance(gen, NonDetMultiThreadedAugmenter):
            raise TypeError(f"unexpected nnU-Net augmenter {type(gen).__name__}")
        gen._finish()
        loader = EpochPassDataLoader.adopt(gen.generator, shuffle, pass_seed)
        return MultiThreadedAugmenter(loader, gen.transform, gen.num_processes,
                                      num_cached_per_queue=max(2, gen.num_cached // gen.num_processes),
                                      seeds=gen.seeds, pin_memory=gen.pin_memory, wait_time=gen.wait_time)

    def on_train_start(self):
        super().on_train_start()
        # nnU-Net (and the seeded variants) drew warm-up batches; the first epoch starts at the first batch of
        # pass `current_epoch` (0, or the resumed epoch)
        for gen in (self.dataloader_train, self.dataloader_val):
            loader = self._loader(gen)
            single = isinstance(gen, SingleThreadedAugmenter)
            loader.rewind(self.current_epoch * loader.batches_per_pass, 1 if single else gen.num_processes)
            if not single:  # fresh workers copy the rewound loader
                gen.restart()

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)
        out["n_cases"] = len(batch["keys"])
        return out

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        # nnU-Net logs the plain mean of the batches' losses; batch i's loss scaled by k * n_i / N (k batches, N
        # cases) makes that mean the batch-size-weighted one, Keras' validation loss
        sizes = np.array([o.pop("n_cases") for o in val_outputs], dtype=float)
        scale = len(sizes) * sizes / sizes.sum()
        super().on_validation_epoch_end([{**o, "loss": o["loss"] * w} for o, w in zip(val_outputs, scale)])


__all__ = ["XBoundNetTrainerPaper", "EpochPassDataLoader", "SPLIT_FILE"]
