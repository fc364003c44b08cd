"""MC-dropout trainers for nnU-Net's default networks: dropout after the nonlinearity of every convolution.

Two kinds, named so the difference is visible:
- `nnUNetTrainerDropout` (`_p01` ... `_p05`): element-wise `torch.nn.Dropout`, one Bernoulli variable per
  activation (Gal & Ghahramani 2016's MC dropout; the kind paper 000's authors use in XBoundNet++).
- `nnUNetTrainerDropoutSpatial` (`_p01` ... `_p05`): spatial (channel) dropout, `torch.nn.Dropout2d` /
  `Dropout3d`, one Bernoulli variable per feature map, as paper 004 (Hoebel et al., "spatial dropout after each
  convolutional layer", N = 10 samples) uses; `nnUNetTrainerDropoutSpatialWCE_*` adds paper 004's weighted
  cross-entropy ("wcc").

Where the dropout sits. dynamic-network-architectures places its `dropout_op` between a convolution and its
normalisation (conv -> dropout -> InstanceNorm -> nonlinearity): the InstanceNorm turns a feature map that
spatial dropout zeroed into the norm's bias, so no map is ever zero where the next convolution reads it, and
element-wise dropout is renormalised away the same way. Here the dropout module follows the nonlinearity
instead (conv -> norm -> nonlinearity -> dropout, `add_dropout_after_nonlinearities`), so a dropped map (or
activation) is exactly zero at the input of the next convolution, as in paper 004's U-Net and Gal & Ghahramani.
In a residual block of nnU-Net's ResEnc U-Nets the second convolution's nonlinearity comes after the residual
sum: the dropout follows that nonlinearity (the block's output), and the first convolution's.
"""
from __future__ import annotations

import pydoc

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_kaz.trainers.checked_resume import CheckedResumeMixin
from nnunet_kaz.trainers.weighted_ce import WeightedCEMixin


class ActivationDropout(nn.Sequential):
    """A nonlinearity followed by its dropout (no parameters of its own: checkpoints keep nnU-Net's keys)."""

    def __init__(self, nonlin: nn.Module, dropout: nn.Module):
        super().__init__(nonlin, dropout)


def add_dropout_after_nonlinearities(network: nn.Module, nonlin_class: type, make_dropout) -> int:
    """Replace every `nonlin_class` module of `network` by `ActivationDropout(nonlin, make_dropout())`, in place;
    returns how many. A module registered under two names (nnU-Net's `ConvDropoutNormReLU` keeps its
    nonlinearity as `.nonlin` and inside `.all_modules`) gets one dropout, shared by both names."""
    wrapped: dict[int, ActivationDropout] = {}
    for parent in list(network.modules()):
        if isinstance(parent, ActivationDropout):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nonlin_class):
                if id(child) not in wrapped:
                    wrapped[id(child)] = ActivationDropout(child, make_dropout())
                setattr(parent, name, wrapped[id(child)])
    return len(wrapped)


class nnUNetTrainerDropout(CheckedResumeMixin, nnUNetTrainer):
    """nnU-Net's planned network (PlainConvUNet or residual encoder U-Net) with element-wise
    `torch.nn.Dropout(dropout_p)` after the nonlinearity of every convolution of encoder and decoder (module
    docstring: a dropped activation is zero at the next convolution).

    Element-wise dropout as in Gal & Ghahramani's MC dropout (paper 004 uses spatial dropout instead: see
    `nnUNetTrainerDropoutSpatial`). The rate is a class attribute so inference, which calls
    `build_network_architecture` on the trainer class, rebuilds exactly the trained network. Variants carry the
    rate in their name: `nnUNetTrainerDropout_p01` is p = 0.1.
    """

    dropout_p: float = 0.2
    spatial_dropout: bool = False

    @classmethod
    def dropout_class(cls, configuration_manager: ConfigurationManager) -> type[nn.Module]:
        """`torch.nn.Dropout`, or `torch.nn.Dropout2d` / `Dropout3d` (matching the plans' conv_op) when spatial."""
        if not cls.spatial_dropout:
            return nn.Dropout
        conv_op = str(configuration_manager.network_arch_init_kwargs["conv_op"])
        return nn.Dropout3d if conv_op.endswith("3d") else nn.Dropout2d if conv_op.endswith("2d") else nn.Dropout1d

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        requires_import = configuration_manager.network_arch_init_kwargs_req_import
        network = get_network_from_plans(configuration_manager.network_arch_class_name, kwargs, requires_import,
                                         num_input_channels, num_output_channels, allow_init=True,
                                         deep_supervision=enable_deep_supervision)
        nonlin = kwargs.get("nonlin")
        nonlin_class = pydoc.locate(nonlin) if isinstance(nonlin, str) else nonlin
        if not isinstance(nonlin_class, type):
            raise ValueError(f"{cls.__name__}: the plans name no nonlinearity class (nonlin = {nonlin!r}); the "
                             "dropout follows the nonlinearity of every convolution")
        dropout, p = cls.dropout_class(configuration_manager), cls.dropout_p
        add_dropout_after_nonlinearities(network, nonlin_class, lambda: dropout(p=p, inplace=False))
        return network


class nnUNetTrainerDropoutSpatial(nnUNetTrainerDropout):
    """Paper 004's MC-dropout U-Net on nnU-Net's planned network: spatial (channel) dropout, `torch.nn.Dropout2d` /
    `Dropout3d` (p = `dropout_p`), after the nonlinearity of every convolution of encoder and decoder (paper 004
    section 2: "spatial dropout ... after each convolutional layer"), so a dropped feature map is zero at the next
    convolution. Variants carry the rate: `nnUNetTrainerDropoutSpatial_p02`."""

    spatial_dropout = True


class nnUNetTrainerDropoutSpatialWCE(WeightedCEMixin, nnUNetTrainerDropoutSpatial):
    """Paper 004's recipe: `nnUNetTrainerDropoutSpatial`'s network trained with the inverse-frequency weighted
    cross-entropy ("wcc", `WeightedCEMixin`), the cost function whose uncertainty measures correlated best with
    Dice in its Tables 1-2. Variants carry the rate: `nnUNetTrainerDropoutSpatialWCE_p02`."""
