"""XBoundNet++ and its building blocks (paper 000 section 2.1), 2D and 3D through `conv_op`.

Public API: `XBoundNet` (plans name `nnunet_kaz.networks.XBoundNet`), `PrefixCache`, the blocks
`ResidualBlock`, `SqueezeExcitation`, `ASPP`, `AttentionGate`, and the MHEX+ option (paper 003): `MHEXPlus`
wrapping XBoundNet++ or a PlainConvUNet with one `MHEXHead` per decoder stage.
"""
from nnunet_kaz.networks.blocks import ASPP, AttentionGate, ResidualBlock, SqueezeExcitation
from nnunet_kaz.networks.mhex import MHEXHead, MHEXPlus
from nnunet_kaz.networks.xboundnet import PrefixCache, XBoundNet

# nnU-Net's planner writes `UNet_class.__module__ + "." + UNet_class.__name__` into plans files and
# get_network_from_plans resolves it with pydoc.locate: publish the short, stable name.
XBoundNet.__module__ = __name__

__all__ = ["XBoundNet", "PrefixCache", "ResidualBlock", "SqueezeExcitation", "ASPP", "AttentionGate", "MHEXHead",
           "MHEXPlus"]
