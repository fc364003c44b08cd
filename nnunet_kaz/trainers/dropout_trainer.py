"""MC-dropout trainers for nnU-Net's default networks: dropout after every convolution.

Two kinds, named so the difference is visible:
- `nnUNetTrainerDropout` (`_p01` ... `_p05`): element-wise `torch.nn.Dropout`, one Bernoulli variable per
  activation (Gal & Ghahramani 2016's MC dropout; the kind paper 000's authors use in XBoundNet++).
- `nnUNetTrainerDropoutSpatial` (`_p01` ... `_p05`): spatial (channel) dropout, `torch.nn.Dropout2d` /
  `Dropout3d`, one Bernoulli variable per feature map, as paper 004 (Hoebel et al., "spatial dropout after each
  convolutional layer", N = 10 samples) uses.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_kaz.trainers.checked_resume import CheckedResumeMixin


class nnUNetTrainerDropout(CheckedResumeMixin, nnUNetTrainer):
    """nnU-Net's planned network (PlainConvUNet or residual encoder U-Net) with element-wise
    `torch.nn.Dropout(dropout_p)` after every convolution of encoder and decoder, where dynamic-network-architectures
    places its `dropout_op` (conv -> dropout -> norm -> nonlin).

    Element-wise dropout as in Gal & Ghahramani's MC dropout (paper 004 uses spatial dropout instead: see
    `nnUNetTrainerDropoutSpatial`). The rate is a class attribute so inference, which calls
    `build_network_architecture` on the trainer class, rebuilds exactly the trained network. Variants carry the
    rate in their name: `nnUNetTrainerDropout_p01` is p = 0.1.
    """

    dropout_p: float = 0.2
    spatial_dropout: bool = False

    @classmethod
    def dropout_op_name(cls, configuration_manager: ConfigurationManager) -> str:
        """`torch.nn.Dropout`, or `torch.nn.Dropout2d` / `Dropout3d` (matching the plans' conv_op) when spatial."""
        if not cls.spatial_dropout:
            return "torch.nn.Dropout"
        conv_op = str(configuration_manager.network_arch_init_kwargs["conv_op"])
        dim = 3 if conv_op.endswith("3d") else 2 if conv_op.endswith("2d") else 1
        return f"torch.nn.Dropout{dim}d" if dim > 1 else "torch.nn.Dropout1d"

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        kwargs["dropout_op"] = cls.dropout_op_name(configuration_manager)
        kwargs["dropout_op_kwargs"] = {"p": cls.dropout_p, "inplace": False}
        requires_import = tuple(configuration_manager.network_arch_init_kwargs_req_import)
        if "dropout_op" not in requires_import:
            requires_import += ("dropout_op",)
        return get_network_from_plans(configuration_manager.network_arch_class_name, kwargs, requires_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)


class nnUNetTrainerDropoutSpatial(nnUNetTrainerDropout):
    """Paper 004's MC-dropout U-Net on nnU-Net's planned network: spatial (channel) dropout, `torch.nn.Dropout2d` /
    `Dropout3d` (p = `dropout_p`), after every convolution of encoder and decoder (paper 004 section 2: "spatial
    dropout ... after each convolutional layer"). Variants carry the rate: `nnUNetTrainerDropoutSpatial_p02`."""

    spatial_dropout = True
