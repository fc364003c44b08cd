"""MC-dropout trainers for nnU-Net's default networks: dropout after every convolution (paper 004)."""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_kaz.trainers.checked_resume import CheckedResumeMixin


class nnUNetTrainerDropout(CheckedResumeMixin, nnUNetTrainer):
    """nnU-Net's planned network (PlainConvUNet or residual encoder U-Net) with `torch.nn.Dropout(dropout_p)`
    after every convolution of encoder and decoder, where dynamic-network-architectures places its
    `dropout_op` (conv -> dropout -> norm -> nonlin).

    Element-wise dropout, as Gal & Ghahramani's MC dropout and paper 004's U-Nets use; the rate is a class
    attribute so inference, which calls `build_network_architecture` on the trainer class, rebuilds exactly
    the trained network. Variants carry the rate in their name: `nnUNetTrainerDropout_p01` is p = 0.1.
    """

    dropout_p: float = 0.2

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        kwargs["dropout_op"] = "torch.nn.Dropout"
        kwargs["dropout_op_kwargs"] = {"p": cls.dropout_p, "inplace": False}
        requires_import = tuple(configuration_manager.network_arch_init_kwargs_req_import)
        if "dropout_op" not in requires_import:
            requires_import += ("dropout_op",)
        return get_network_from_plans(configuration_manager.network_arch_class_name, kwargs, requires_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)
