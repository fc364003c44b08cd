"""MHEX+ heads (paper 003 sections 3.2-3.4) attached to the decoder stages of XBoundNet++ or nnU-Net's U-Nets."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd


class MHEXHead(nn.Module):
    """One MHEX+ module (paper 003 section 3.2), all convolutions 1x1 and without biases:

        Y = ReLU(Conv1(X)),   Y_att = sigmoid(Y) * Y   (attention gate),   deep prediction = Conv2(Y)

    Conv1 keeps the channel count C of the decoder stage, Conv2 maps to the K classes. `forward` returns
    (deep prediction, Y_att). `equivalent_kernel` / `cam` give paper 003 section 3.3's class activation maps.
    """

    def __init__(self, conv_op: type[_ConvNd], channels: int, num_classes: int):
        super().__init__()
        self.conv1 = conv_op(channels, channels, 1, 1, 0, bias=False)
        self.relu = nn.ReLU()
        self.gate = nn.Sigmoid()
        self.conv2 = conv_op(channels, num_classes, 1, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.relu(self.conv1(x))
        return self.conv2(y), self.gate(y) * y

    def equivalent_kernel(self) -> torch.Tensor:
        """W_equiv[c] = sum_j W_Conv2[c, j] * W_Conv1[j] (paper 003 section 3.3): a (K, C) matrix, the two 1x1
        convolutions composed into one (the ReLU in between is left out, as in the paper)."""
        w1 = self.conv1.weight.reshape(self.conv1.out_channels, self.conv1.in_channels)
        w2 = self.conv2.weight.reshape(self.conv2.out_channels, self.conv2.in_channels)
        return w2 @ w1

    def cam(self, activations: torch.Tensor) -> torch.Tensor:
        """CAM_c = sum_j W_equiv[c, j] * A[j] (paper 003 section 3.3) for activations A (B, C, *spatial):
        (B, K, *spatial), one class activation map per class in one pass (signed, not rectified)."""
        return torch.einsum("kc,bc...->bk...", self.equivalent_kernel(), activations)


_SEG_PREFIX = "network.decoder.seg_layers."


class _DiscardedSegLayer(nn.Module):
    """Stands in for a wrapped decoder's segmentation layer under MHEX+ heads: no parameters, an empty output
    (zero channels) that the wrapped decoder collects and MHEXPlus ignores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


class MHEXPlus(nn.Module):
    """A U-Net with one MHEX+ head per decoder stage (paper 003 section 3.4; EU-Nets).

    Works with any network whose `decoder` has `stages` and `seg_layers` aligned per level, deepest first
    (XBoundNet++, dynamic-network-architectures' PlainConvUNet and ResidualEncoderUNet). Forward hooks on
    `decoder.stages[j]` run head j on the stage's output X_j; with `feed_back=True` (default) the decoder continues
    with X_j + Y_att_j (the residual integration of section 3.4), so the attention gate shapes the decoder.

    The heads take over the role of the segmentation layers: `forward` returns the heads' deep predictions with the
    wrapped network's output contract, a list highest resolution first when `decoder.deep_supervision` is on (nnU-Net
    switches it through `network.decoder.deep_supervision`, which reaches the wrapped decoder), else the
    full-resolution prediction. The wrapped network's own `seg_layers` are replaced by parameter-free
    `_DiscardedSegLayer`s (their outputs were never used): every parameter then gets a gradient, which nnU-Net's
    DistributedDataParallel (no `find_unused_parameters`) requires; checkpoints that still hold
    `network.decoder.seg_layers.*` load (those keys are dropped).
    After each forward, `stage_inputs[j]` holds X_j (for CAMs and collaboration gradients).
    """

    def __init__(self, network: nn.Module, num_classes: Optional[int] = None, feed_back: bool = True):
        super().__init__()
        decoder = getattr(network, "decoder", None)
        if decoder is None or not hasattr(decoder, "stages") or not hasattr(decoder, "seg_layers"):
            raise ValueError(f"{type(network).__name__} has no decoder.stages / decoder.seg_layers to attach "
                             "MHEX+ heads to")
        self.network = network
        self.feed_back = feed_back
        seg = list(decoder.seg_layers)
        num_classes = num_classes or seg[0].out_channels
        self.heads = nn.ModuleList(MHEXHead(type(s), s.in_channels, num_classes) for s in seg)
        self.heads.apply(self.initialize)
        decoder.seg_layers = nn.ModuleList(_DiscardedSegLayer() for _ in seg)
        self.stage_inputs: List[Optional[torch.Tensor]] = [None] * len(seg)
        self._predictions: List[Optional[torch.Tensor]] = [None] * len(seg)
        for j, stage in enumerate(decoder.stages):
            stage.register_forward_hook(self._make_hook(j))

    def _make_hook(self, j: int):
        def hook(module, inputs, output):
            prediction, attended = self.heads[j](output)
            self.stage_inputs[j], self._predictions[j] = output, prediction
            return output + attended if self.feed_back else None
        return hook

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, ignoring the wrapped decoder's former segmentation layers (checkpoints from before they
        were removed)."""
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_SEG_PREFIX)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def decoder(self) -> nn.Module:
        return self.network.decoder

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        self._predictions = [None] * len(self.heads)
        self.network(x)
        if self.decoder.deep_supervision:
            return self._predictions[::-1]
        return self._predictions[-1]

    def equivalent_cams(self) -> List[torch.Tensor]:
        """Per decoder stage (deepest first), CAM_c of the last forward's stage inputs: (B, K, *stage spatial)."""
        if any(a is None for a in self.stage_inputs):
            raise RuntimeError("run a forward pass first")
        return [head.cam(a) for head, a in zip(self.heads, self.stage_inputs)]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """The wrapped network's estimate plus each head's Conv1, gate and prediction outputs."""
        total = np.int64(self.network.compute_conv_feature_map_size(input_size))
        n = len(self.heads)
        strides = np.cumprod(np.vstack(self.network.encoder.strides), axis=0)  # resolution of encoder stage s
        for j, head in enumerate(self.heads):
            size = [int(i // s) for i, s in zip(input_size, strides[n - 1 - j])]
            c, k = head.conv1.out_channels, head.conv2.out_channels
            total += np.prod([2 * c + k, *size], dtype=np.int64)
        return total

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He initialisation (negative slope 1e-2), as nnU-Net's networks."""
        InitWeights_He(1e-2)(module)
