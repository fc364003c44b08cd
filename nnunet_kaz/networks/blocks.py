"""XBoundNet++ building blocks (paper 000 section 2.1), one class for 1D/2D/3D through `conv_op`.

Blocks follow dynamic-network-architectures' conventions: `conv_op` is `nn.Conv2d` or `nn.Conv3d`, `norm_op` /
`nonlin` are classes instantiated with their kwargs (None = identity), kernel sizes and strides are per-axis lists
(scalars are broadcast with `maybe_convert_scalar_to_list`), convolutions use "same" padding so a block changes the
spatial size only by its stride, and every block reports `compute_conv_feature_map_size(input_size)`: the number of
output elements of its convolutions (and gating products) for one sample, the proxy nnU-Net's planner uses to
estimate VRAM.
"""
from __future__ import annotations

from typing import Sequence, Type

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_kaz.networks.topology import as_per_axis


def make_norm(norm_op: Type[nn.Module] | None, channels: int, norm_op_kwargs: dict | None) -> nn.Module:
    """`norm_op(channels, **kwargs)`, or identity when no normalisation is planned."""
    return norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()


def make_nonlin(nonlin: Type[nn.Module] | None, nonlin_kwargs: dict | None) -> nn.Module:
    """`nonlin(**kwargs)`, or identity when no nonlinearity is planned."""
    return nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()


def same_padding(kernel_size: Sequence[int], dilation: int = 1) -> list[int]:
    """Padding that keeps the spatial size of a stride-1 convolution (odd kernels)."""
    return [dilation * (k - 1) // 2 for k in kernel_size]


def _numel(channels: int, size: Sequence[int]) -> np.int64:
    return np.prod([channels, *size], dtype=np.int64)


class SqueezeExcitation(nn.Module):
    """Channel attention of Hu et al. (2018), as used by paper 000's encoder: global average pool over all spatial
    axes, 1x1 conv to `max(1, C // reduction)` channels, ReLU, 1x1 conv back to C, sigmoid, rescale the input.

    Written here rather than taken from dynamic-network-architectures because its `SqueezeExcite` pools over axes
    (2, 3) only, which is wrong for 3D feature maps.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = conv_op(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = conv_op(hidden, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class ConvNormAct(nn.Module):
    """conv -> norm -> nonlin ("same" padding), the authors' `conv_block` (Conv2D-BN-ReLU)."""

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1, conv_bias: bool = True,
                 norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None):
        super().__init__()
        kernel_size = maybe_convert_scalar_to_list(conv_op, kernel_size)
        self.stride = list(maybe_convert_scalar_to_list(conv_op, stride))
        self.output_channels = output_channels
        self.conv = conv_op(input_channels, output_channels, kernel_size, self.stride, same_padding(kernel_size),
                            bias=conv_bias)
        self.norm = make_norm(norm_op, output_channels, norm_op_kwargs)
        self.act = make_nonlin(nonlin, nonlin_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """The residual squeeze-and-excitation block of paper 000's authors' code (`residual_se_block`, AUTHORS_CODE.md;
    the paper names ResNet + SE without details):

        out = SE( act(norm(conv2( act(norm(conv1_stride(x))) ))) ) + shortcut(x)

    SE on the residual branch after its activation (SE-ResNet placement; the post-ReLU channel means depend on
    the input, also under instance norm), `shortcut` a 1x1 convolution of the block input (strided like conv1) without
    normalisation, and no activation after the sum, as the authors' Keras code. The authors downsample by
    max-pooling before a block; here conv1 carries the planned stride (nnU-Net's convention, see the README's
    fidelity table). `se_reduction=None` drops the SE.
    """

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int], conv_bias: bool = True,
                 norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 se_reduction: int | None = 16):
        super().__init__()
        self.stride = list(maybe_convert_scalar_to_list(conv_op, stride))
        self.input_channels, self.output_channels = input_channels, output_channels
        self.conv1 = ConvNormAct(conv_op, input_channels, output_channels, kernel_size, self.stride, conv_bias,
                                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
        self.conv2 = ConvNormAct(conv_op, output_channels, output_channels, kernel_size, 1, conv_bias,
                                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
        self.se = SqueezeExcitation(conv_op, output_channels, se_reduction) if se_reduction else None
        self.shortcut = conv_op(input_channels, output_channels, 1, self.stride, 0, bias=conv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        return out + self.shortcut(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """conv1, conv2, shortcut outputs (and the SE-rescaled branch)."""
        size = [i // s for i, s in zip(input_size, self.stride)]
        return _numel(self.output_channels, size) * (4 if self.se is not None else 3)


class Stem(nn.Module):
    """Stage 0 of XBoundNet++ as the authors' code builds it: the stem, two conv-norm-act at full resolution (not
    a skip), followed by the first residual SE level at the same resolution (its output is the full-resolution
    skip). `stem[0].conv` is the only weight that depends on the input channels."""

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int], conv_bias: bool = True,
                 norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 se_reduction: int | None = 16):
        super().__init__()
        self.stride = list(maybe_convert_scalar_to_list(conv_op, stride))
        self.output_channels = output_channels
        self.stem = nn.Sequential(
            ConvNormAct(conv_op, input_channels, output_channels, kernel_size, self.stride, conv_bias, norm_op,
                        norm_op_kwargs, nonlin, nonlin_kwargs),
            ConvNormAct(conv_op, output_channels, output_channels, kernel_size, 1, conv_bias, norm_op,
                        norm_op_kwargs, nonlin, nonlin_kwargs))
        self.level = ResidualBlock(conv_op, output_channels, output_channels, kernel_size, 1, conv_bias, norm_op,
                                   norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.level(self.stem(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        size = [i // s for i, s in zip(input_size, self.stride)]
        return 2 * _numel(self.output_channels, size) + self.level.compute_conv_feature_map_size(size)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling bridge (paper 000 section 2.1, after Chen et al. 2017): parallel convolutions
    of the same kernel with dilations (1, 6, 12, 18), SUMMED (not concatenated), then norm and activation; the
    spatial size and channel count are kept. A dilation is an int or one int per spatial axis (the planner reduces
    dilations along axes too short for them, `nnunet_kaz.networks.topology`). An optional dropout module (MC
    dropout) is applied last and kept as `self.dropout` so the streaming predictor can split the forward pass right
    before it (`features` / `dropout`).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: int | Sequence[int],
                 dilations: Sequence = (1, 6, 12, 18), conv_bias: bool = True,
                 norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 dropout: nn.Module | None = None):
        super().__init__()
        if not dilations:
            raise ValueError("ASPP needs at least one dilation")
        kernel_size = list(maybe_convert_scalar_to_list(conv_op, kernel_size))
        self.channels, self.kernel_size = channels, kernel_size
        self.dilations = as_per_axis(dilations, len(kernel_size))
        self.branches = nn.ModuleList(
            conv_op(channels, channels, kernel_size, 1, [d * (k - 1) // 2 for d, k in zip(dil, kernel_size)],
                    dilation=dil, bias=conv_bias)
            for dil in self.dilations)
        self.norm = make_norm(norm_op, channels, norm_op_kwargs)
        self.act = make_nonlin(nonlin, nonlin_kwargs)
        if dropout is not None:
            self.dropout = dropout

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything except the dropout: act(norm(sum_d conv_d(x)))."""
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return self.act(self.norm(out))

    def forward(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """`dropout=False`: the features alone, through the module's call (so forward hooks, e.g. Grad-CAM's, see
        the bridge's output as they see every other block's, before its dropout)."""
        out = self.features(x)
        return self.dropout(out) if dropout and hasattr(self, "dropout") else out

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        return _numel(self.channels, input_size) * len(self.branches)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018) on every skip connection (paper 000 section 2.1: "1x1
    convolutions and ReLU-sigmoid activation"), as the authors' `attention_gate`:

        alpha = sigmoid( psi( ReLU( W_x x + W_g g ) ) ),   output = alpha * x

    W_x, W_g: 1x1 convs (with bias) to `inter_channels`, by default the skip's channel count as in the authors'
    code (Oktay et al. halve it), no normalisation; psi: 1x1 conv to one channel. The gating signal g is the
    decoder's upsampled feature map, already at the skip's resolution. The attention map alpha is the output of
    the `sigmoid` submodule (hook it to inspect the map). `norm_op` adds a norm after W_x and W_g (not the default).
    """

    def __init__(self, conv_op: Type[_ConvNd], gating_channels: int, skip_channels: int,
                 inter_channels: int | None = None, conv_bias: bool = True,
                 norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None):
        super().__init__()
        inter = inter_channels or skip_channels
        self.skip_channels, self.inter_channels = skip_channels, inter
        self.w_g = nn.Sequential(conv_op(gating_channels, inter, 1, 1, 0, bias=conv_bias),
                                 make_norm(norm_op, inter, norm_op_kwargs))
        self.w_x = nn.Sequential(conv_op(skip_channels, inter, 1, 1, 0, bias=conv_bias),
                                 make_norm(norm_op, inter, norm_op_kwargs))
        self.relu = nn.ReLU()
        self.psi = conv_op(inter, 1, 1, 1, 0, bias=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.psi(self.relu(self.w_g(g) + self.w_x(x))))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        # W_g, W_x outputs, psi output, gated skip
        return 2 * _numel(self.inter_channels, input_size) + _numel(1, input_size) + \
            _numel(self.skip_channels, input_size)
