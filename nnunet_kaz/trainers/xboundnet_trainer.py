"""nnU-Net trainers that train XBoundNet++ (paper 000 section 2.1) from the configuration's existing plans."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunet_kaz.errors import KazError
from nnunet_kaz.trainers.checked_resume import CheckedResumeMixin, refuse_to_start
from nnunet_kaz.trainers.losses import build_logdice_ce_loss


XBOUNDNET_CLASS = "nnunet_kaz.networks.XBoundNet"
# plans keys XBoundNet++ needs from any planned U-Net (PlainConvUNet, ResidualEncoderUNet, or XBoundNet plans); the
# others are passed on too, and XBoundNet warns once naming those it ignores (block counts of nnU-Net's U-Nets)
PLANS_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "conv_bias", "norm_op",
              "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs")
PER_STAGE_KEYS = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage")


class PlansError(KazError, SystemExit):
    """Plans XBoundNet++ cannot be built from. A KazError for nnunet-kaz's commands; uncaught (the stock
    `nnUNetv2_train` / `nnUNetv2_predict`) it ends the process with its one-line message and exit code 1."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = f"error: {message}"


def configuration_name(plans_manager: PlansManager | None, configuration_manager: ConfigurationManager) -> str:
    """'PLANS configuration NAME' for messages (the configuration whose resolved dict is this one)."""
    if plans_manager is None:
        return f"configuration {configuration_manager.data_identifier}"
    names = [c for c in plans_manager.available_configurations
             if plans_manager.get_configuration(c).configuration == configuration_manager.configuration]
    return f"{plans_manager.plans_name} configuration {names[0] if names else configuration_manager.data_identifier}"


def build_xboundnet_from_plans(configuration_manager: ConfigurationManager, num_input_channels: int,
                               num_output_channels: int, deep_supervision: bool, max_features: int | None = None,
                               keep_planned_depth: bool = True, plans_manager: PlansManager | None = None,
                               **network_kwargs) -> nn.Module:
    """XBoundNet++ with the stages, features, strides and kernels of the configuration's planned U-Net
    (features capped at `max_features` when given, e.g. for CPU demos).

    With `keep_planned_depth=False` the deepest stages are dropped (the others' strides and kernels kept) so that
    the ASPP bridge keeps the paper's context (`nnunet_kaz.networks.topology.fitting_depth`: no pooled axis of the
    bridge below max(dilations) + 1 voxels; nnU-Net's 7 stages for a 256x256 patch become 4, bridge 32x32). Either
    way one warning names the cap and every ASPP branch that degenerates to its centre tap on the planned patch.
    PlansError (one message naming the configuration) when the patch does not fit the total downsampling.
    """
    from nnunet_kaz.networks.topology import (
        PAPER_DILATIONS, check_patch_fits, describe_degenerate, fitting_depth, stage_sizes)

    plan_kwargs = configuration_manager.network_arch_init_kwargs
    where = configuration_name(plans_manager, configuration_manager)
    missing = [k for k in PLANS_KEYS[:5] if k not in plan_kwargs]
    if missing:
        raise PlansError(f"{where} lacks {missing}; XBoundNet++ needs a U-Net-like plan")
    kwargs = dict(plan_kwargs)
    patch = list(configuration_manager.patch_size)
    try:
        check_patch_fits(patch, kwargs["strides"], where)
    except ValueError as e:
        raise PlansError(str(e)) from None
    dilations = network_kwargs.get("aspp_dilations", kwargs.get("aspp_dilations", PAPER_DILATIONS))
    n_planned = int(kwargs["n_stages"])
    notes = []
    if not keep_planned_depth:
        n_fit = fitting_depth(patch, kwargs["strides"], dilations)
        if n_fit < n_planned:
            for key in PER_STAGE_KEYS:
                if isinstance(kwargs.get(key), (list, tuple)):
                    kwargs[key] = list(kwargs[key])[:n_fit]
            if isinstance(kwargs.get("n_conv_per_stage_decoder"), (list, tuple)):
                kwargs["n_conv_per_stage_decoder"] = list(kwargs["n_conv_per_stage_decoder"])[:n_fit - 1]
            kwargs["n_stages"] = n_fit
            notes.append(f"depth capped from {n_planned} to {n_fit} stages (set keep_planned_depth = True to keep "
                         f"the plans' depth)")
    bridge = stage_sizes(patch, kwargs["strides"][:kwargs["n_stages"]])[-1]
    notes.append(f"bridge {'x'.join(map(str, bridge))} for patch {'x'.join(map(str, patch))}")
    degenerate = describe_degenerate(bridge, list(kwargs["kernel_sizes"])[kwargs["n_stages"] - 1], dilations)
    if degenerate or len(notes) > 1:
        warnings.warn(f"XBoundNet++ on {where}: {'; '.join(notes)}" + (f"; {degenerate}" if degenerate else ""),
                      stacklevel=2)
    if max_features is not None:
        kwargs["features_per_stage"] = [min(int(f), max_features) for f in kwargs["features_per_stage"]]
    requires_import = [k for k in configuration_manager.network_arch_init_kwargs_req_import if k in kwargs]
    kwargs.update(network_kwargs)
    return get_network_from_plans(XBOUNDNET_CLASS, kwargs, requires_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=deep_supervision)


def wrap_deep_supervision(loss: nn.Module, n_outputs: int, is_ddp: bool, compiled: bool) -> nn.Module:
    """Weight outputs 1, 1/2, 1/4, ... and drop the lowest resolution, as nnUNetTrainer._build_loss, except that a
    network with a single output (two stages, e.g. XBoundNet++ on a small patch) keeps it: nnU-Net's rule would
    give it weight 0 / 0 = NaN and the loss would be NaN from the first iteration."""
    weights = np.array([1 / (2 ** i) for i in range(n_outputs)])
    if n_outputs > 1:
        # DDP without compile complains about unused parameters when a weight is exactly 0 (nnU-Net's workaround)
        weights[-1] = 1e-6 if (is_ddp and not compiled) else 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


class XBoundNetTrainer(CheckedResumeMixin, nnUNetTrainer):
    """XBoundNet++ with LogDice + CE (alpha = 0.7, paper 000 eq. 1); nnU-Net's SGD + poly schedule otherwise.

    Class attributes (subclass to change, as nnU-Net users do):
    - `logdice_alpha`: weight of the LogDice term; CE (or BCE for regions) gets 1 - alpha.
    - `network_kwargs`: extra XBoundNet arguments (e.g. `{"dropout_p": 0.0}` or other ASPP dilations).
    - `max_features`: cap on the planned features per stage (None: as planned).
    - `keep_planned_depth`: False (default) drops the deepest planned stages until the ASPP bridge keeps the
      paper's context (max(dilations) + 1 voxels along every pooled axis: 4 stages and a 32x32 bridge for
      nnU-Net's 7-stage 256x256 plan); True builds the plans' depth. Either way one warning names every ASPP
      branch that degenerates to its centre tap. `nnUNetXBoundNetPlans` (`nnunet-kaz plan`) already have that depth.
    - `loss_batch_dice`: one soft Dice over the whole batch (True) or per sample (False); None: the plans'
      `batch_dice`.
    """

    logdice_alpha: float = 0.7
    network_kwargs: dict = {}
    max_features: int | None = None
    keep_planned_depth: bool = False
    loss_batch_dice: bool | None = None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        # a classmethod (nnU-Net's is static) so subclasses change the network through class attributes and
        # inference, which calls this on the trainer class, rebuilds exactly the trained network
        return build_xboundnet_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                          enable_deep_supervision, cls.max_features, cls.keep_planned_depth,
                                          plans_manager, **cls.network_kwargs)

    def initialize(self):
        try:
            super().initialize()
        except PlansError as e:  # plans XBoundNet++ cannot be built from: one line, nothing of this run left
            refuse_to_start(self, str(e))

    def _build_loss(self) -> nn.Module:
        batch_dice = self.configuration_manager.batch_dice if self.loss_batch_dice is None else self.loss_batch_dice
        loss = build_logdice_ce_loss(self.label_manager.has_regions, batch_dice, self.logdice_alpha,
                                     self.label_manager.ignore_label, self.is_ddp)
        if self._do_i_compile():  # as nnUNetTrainer._build_loss: the Dice term is compiled with the network
            loss.dc = torch.compile(loss.dc)
        if self.enable_deep_supervision:
            loss = wrap_deep_supervision(loss, len(self._get_deep_supervision_scales()), self.is_ddp,
                                         self._do_i_compile())
        return loss


class _StopTraining(Exception):
    """Raised at the start of an epoch once early stopping has triggered."""


class ValidationLossPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """ReduceLROnPlateau for nnU-Net's hooks: nnU-Net's `on_train_epoch_start` calls
    `lr_scheduler.step(current_epoch)`, which here does nothing (a plateau scheduler must not read the epoch
    number as its metric); the trainer steps it with the validation loss through `step_validation_loss`."""

    def step(self, current_epoch=None):  # noqa: D102 - nnU-Net's per-epoch call, deliberately a no-op
        return None

    def step_validation_loss(self, val_loss: float) -> None:
        super().step(val_loss)

    def replay(self, val_losses: list[float]) -> None:
        """Rebuild the plateau state (best loss, epochs without improvement, cooldown) of a resumed run from
        its logged validation losses: nnU-Net's checkpoints do not hold the scheduler. The learning rates stay
        the optimizer's, which the checkpoint restored with the reductions already in them."""
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for loss in val_losses:
            super().step(float(loss))
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = lrs


BEST_VAL_LOSS_CHECKPOINT = "checkpoint_best_val_loss.pth"


def keras_plateau(optimizer: torch.optim.Optimizer, factor: float, patience: int,
                  min_delta: float = 1e-4) -> ValidationLossPlateau:
    """Keras' `ReduceLROnPlateau(factor, patience, min_delta)` (mode min, cooldown 0) as torch's scheduler: Keras
    reduces when `wait >= patience` epochs failed to beat the best by more than min_delta (absolute), torch when
    `num_bad_epochs > patience` with its threshold, so torch gets patience - 1 and threshold_mode "abs"."""
    if patience < 1:
        raise ValueError(f"plateau patience must be >= 1, got {patience}")
    return ValidationLossPlateau(optimizer, mode="min", factor=factor, patience=patience - 1, threshold=min_delta,
                                 threshold_mode="abs")


class XBoundNetTrainer_Adam(XBoundNetTrainer):
    """The paper's optimisation (paper 000 section 2.1; AUTHORS_CODE.md for what the paper leaves open): Adam
    lr 1e-4, ReduceLROnPlateau on the validation loss (factor 0.1, patience 15), early stopping after
    `early_stopping_patience` (50) epochs without a better validation loss, and the authors'
    `restore_best_weights=True`: the weights of the epoch with the lowest validation loss are written as
    `checkpoint_final.pth` (and, while training, as `checkpoint_best_val_loss.pth`), so nnU-Net's final
    validation and `predict` (checkpoint `final`) use them. nnU-Net's `checkpoint_best.pth` keeps its own
    meaning (best EMA pseudo-Dice).

    Keras' semantics (the authors' callbacks): the learning rate drops once `plateau_patience` epochs in a row
    did not lower the validation loss by more than `plateau_min_delta` (absolute, Keras' default 1e-4); torch's
    ReduceLROnPlateau counts `> patience` where Keras counts `>= patience`, so torch gets patience - 1. Early
    stopping: any decrease counts (Keras' min_delta 0).

    Everything else is nnU-Net's: an epoch of `num_iterations_per_epoch` (250) batches sampled with replacement
    and foreground oversampling, the validation loss of 50 sampled batches, the planned batch size, weight decay
    3e-5, deep supervision and nnU-Net's augmentation; so patience 15 / 50 counts those epochs.
    `XBoundNetTrainerPaper` is the paper's whole recipe (epochs = passes over the training slices)."""

    initial_lr_adam: float = 1e-4
    plateau_factor: float = 0.1
    plateau_patience: int = 15
    plateau_min_delta: float = 1e-4
    early_stopping_patience: int = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.initial_lr_adam
        self._best_val_loss = np.inf
        self._best_epoch: int | None = None
        self._best_weights: dict | None = None
        self._epochs_without_improvement = 0

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, keras_plateau(optimizer, self.plateau_factor, self.plateau_patience, self.plateau_min_delta)

    def on_epoch_start(self):
        if self._epochs_without_improvement >= self.early_stopping_patience:
            raise _StopTraining
        super().on_epoch_start()

    def _network_module(self) -> nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return getattr(mod, "_orig_mod", mod)

    def on_epoch_end(self):
        val_loss = float(self.logger.get_value("val_losses", step=-1))
        self.lr_scheduler.step_validation_loss(val_loss)
        if val_loss < self._best_val_loss:
            self._best_val_loss, self._best_epoch, self._epochs_without_improvement = val_loss, self.current_epoch, 0
            self._best_weights = {k: v.detach().to("cpu", copy=True)
                                  for k, v in self._network_module().state_dict().items()}
            self.save_checkpoint(os.path.join(self.output_folder, BEST_VAL_LOSS_CHECKPOINT))
        else:
            self._epochs_without_improvement += 1
        super().on_epoch_end()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """Resuming (`--c`): early stopping's and the plateau scheduler's state are rebuilt from the logged
        validation losses, the best weights from `checkpoint_best_val_loss.pth` when it belongs to an epoch
        before the resumed one."""
        super().load_checkpoint(filename_or_checkpoint)
        losses = list(self.logger.my_fantastic_logging.get("val_losses", []))[: self.current_epoch]
        if isinstance(self.lr_scheduler, ValidationLossPlateau):
            self.lr_scheduler.replay(losses)
        if losses:
            best = int(np.argmin(losses))
            self._best_val_loss, self._best_epoch = float(losses[best]), best
            self._epochs_without_improvement = len(losses) - 1 - best
        path = os.path.join(self.output_folder, BEST_VAL_LOSS_CHECKPOINT)
        if losses and os.path.isfile(path):
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            if ckpt.get("current_epoch") == self._best_epoch + 1:
                self._best_weights = ckpt["network_weights"]

    def on_train_end(self):
        if self._best_weights is not None:
            self._network_module().load_state_dict(self._best_weights)
            self.print_to_log_file(f"Restoring the weights of epoch {self._best_epoch} (lowest validation loss "
                                   f"{self._best_val_loss:.4f}) as the final weights (restore_best_weights)")
        super().on_train_end()

    def run_training(self):
        try:
            super().run_training()
        except _StopTraining:
            self.print_to_log_file(f"Early stopping: no better validation loss for "
                                   f"{self.early_stopping_patience} epochs")
            self.on_train_end()
