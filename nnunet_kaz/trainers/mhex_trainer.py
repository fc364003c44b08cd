"""MHEX+ trainers (paper 003 sections 3.2-3.4): the planned network with one MHEX+ head per decoder stage.

`build_network_architecture` wraps the base trainer's network in `nnunet_kaz.networks.MHEXPlus`. Inference
(`nnUNetv2_predict`, `nnunet-kaz predict`) calls it on the trainer class named in the checkpoint with
`enable_deep_supervision=False`, so it rebuilds exactly the trained network, heads included, and the checkpoint's
`heads.*` weights load into it.

Deep supervision: the heads' deep predictions replace the segmentation layers as the network's outputs
(highest resolution first, one per decoder stage = nnU-Net's deep-supervision scales). nnU-Net switches deep
supervision with `network.decoder.deep_supervision = enabled` (`set_deep_supervision_enabled`, e.g. off for the
final validation); `MHEXPlus.decoder` is the wrapped network's decoder, so that switch works unchanged.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_kaz.networks.mhex import MHEXPlus
from nnunet_kaz.trainers.xboundnet_trainer import XBoundNetTrainer


class MHEXTrainerMixin:
    """Put before an nnU-Net trainer class: its network gets MHEX+ heads (`MHEXPlus`).

    `mhex_feed_back` (class attribute, default True): the decoder continues with X_j + Y_att_j (paper 003
    section 3.4's residual integration); False attaches the heads without changing the decoder path.
    """

    mhex_feed_back: bool = True

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                     num_output_channels, enable_deep_supervision)
        return MHEXPlus(network, num_output_channels, feed_back=cls.mhex_feed_back)


class XBoundNetTrainerMHEX(MHEXTrainerMixin, XBoundNetTrainer):
    """XBoundNet++ with MHEX+ heads (an EU-Net, paper 003), LogDice + CE on the heads' deep predictions."""


class nnUNetTrainerMHEX(MHEXTrainerMixin, nnUNetTrainer):
    """nnU-Net's planned U-Net (PlainConvUNet or residual encoder U-Net) with MHEX+ heads (paper 003)."""
