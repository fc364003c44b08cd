"""XBoundNet++ (paper 000 section 2.1) as an nnU-Net network: built from the same plans keys as PlainConvUNet."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import (
    convert_conv_op_to_dim,
    get_matching_convtransp,
    maybe_convert_scalar_to_list,
)
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_kaz.networks.blocks import ASPP, AttentionGate, ResidualBlock, _numel

IntOrSeq = Union[int, Sequence[int]]


class PrefixCache(NamedTuple):
    """Output of `XBoundNet.forward_prefix`: everything computed before the first dropout module.

    `features[s]` is the output of encoder stage s (before that stage's dropout, if it has one); `bridge` is the
    ASPP bridge's output before its dropout when no encoder stage has dropout, else None (not reached yet).
    """

    features: List[torch.Tensor]
    bridge: Optional[torch.Tensor]


class XBoundNetEncoder(nn.Module):
    """Stem (stage 0) and residual squeeze-excitation blocks (stages 1..n-1), each downsampling by its planned stride.

    Holds the plan's metadata like dynamic-network-architectures' `PlainConvEncoder` (`conv_op`, `output_channels`,
    `strides`, `kernel_sizes`, norm / nonlin / dropout settings) so that decoders and heads can be built from it.
    `dropouts[str(s)]` is the dropout applied to stage s's output (only the deepest stages have one).
    """

    def __init__(self, input_channels: int, features: Sequence[int], conv_op: Type[_ConvNd],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], conv_bias: bool,
                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction: int,
                 dropout_factory, dropout_stages: Sequence[int]):
        super().__init__()
        stages = [ResidualBlock(conv_op, input_channels, features[0], kernel_sizes[0], strides[0], conv_bias,
                                norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction=None,
                                force_projection=True)]
        for s in range(1, len(features)):
            stages.append(ResidualBlock(conv_op, features[s - 1], features[s], kernel_sizes[s], strides[s], conv_bias,
                                        norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction=se_reduction))
        self.stages = nn.ModuleList(stages)
        self.dropouts = nn.ModuleDict({str(s): dropout_factory() for s in dropout_stages})
        self.output_channels = list(features)
        self.strides = [list(s) for s in strides]
        self.kernel_sizes = [list(k) for k in kernel_sizes]
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs

    def maybe_dropout(self, s: int, x: torch.Tensor) -> torch.Tensor:
        key = str(s)
        return self.dropouts[key](x) if key in self.dropouts else x


class XBoundNetDecoder(nn.Module):
    """Per decoder stage (deepest first): transposed conv upsampling by the encoder stride, an attention gate on the
    skip (gated by the upsampled features), concatenation, a residual block, and a 1x1 segmentation head.

    `deep_supervision` works as in dynamic-network-architectures' `UNetDecoder`: when True, `forward` returns a list
    of logits, highest resolution first (one per decoder stage, n_stages - 1 in total, matching nnU-Net's
    `_get_deep_supervision_scales`); when False, only the full-resolution logits. All heads always exist, so
    weights load either way.
    """

    def __init__(self, encoder: XBoundNetEncoder, num_classes: int, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        transpconv_op = get_matching_convtransp(conv_op=encoder.conv_op)
        ch, n = encoder.output_channels, len(encoder.output_channels)
        transpconvs, gates, stages, seg_layers = [], [], [], []
        for j in range(n - 1):
            below, skip = ch[n - 1 - j], ch[n - 2 - j]
            stride = encoder.strides[n - 1 - j]
            transpconvs.append(transpconv_op(below, skip, stride, stride, bias=encoder.conv_bias))
            gates.append(AttentionGate(encoder.conv_op, skip, skip, conv_bias=encoder.conv_bias,
                                       norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs))
            stages.append(ResidualBlock(encoder.conv_op, 2 * skip, skip, encoder.kernel_sizes[n - 2 - j], 1,
                                        encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.nonlin,
                                        encoder.nonlin_kwargs, se_reduction=None))
            seg_layers.append(encoder.conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.gates = nn.ModuleList(gates)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: Sequence[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """`skips`: encoder stage outputs 0..n-2 followed by the bridge output (lowest resolution last)."""
        x = skips[-1]
        seg_outputs = []
        for j in range(len(self.stages)):
            up = self.transpconvs[j](x)
            skip = skips[-(j + 2)]
            x = self.stages[j](torch.cat((up, self.gates[j](up, skip)), 1))
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[j](x))
            elif j == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[-1](x))
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]


class XBoundNet(nn.Module):
    """XBoundNet++ (paper 000 section 2.1, Fig. 2): a residual squeeze-excitation U-Net with an ASPP bridge,
    attention-gated skips and MC dropout, for 2D and 3D alike (`conv_op` = `nn.Conv2d` / `nn.Conv3d`).

    Built from nnU-Net plans keys exactly like `PlainConvUNet`, so a plans file may name
    `nnunet_kaz.networks.XBoundNet` and `get_network_from_plans` builds it; string class names are resolved there.

    Structure (module names are what Grad-CAM lists, see `named_blocks`):
    - `encoder.stages[0]`, the stem: conv-norm-act-conv + 1x1 conv shortcut, stride `strides[0]`;
    - `encoder.stages[s]`, s >= 1: residual block with squeeze-excitation (reduction `se_reduction`), stride
      `strides[s]`, `features_per_stage[s]` channels;
    - `bridge`: ASPP at the deepest stage, convolutions with `aspp_dilations` summed, then norm + act;
    - `decoder.transpconvs[j]`, `decoder.gates[j]`, `decoder.stages[j]`, `decoder.seg_layers[j]` (j = 0 deepest):
      transposed-conv upsampling by the stride, additive attention gate on the skip, concat, residual block, 1x1 head.

    Dropout (MC dropout, paper 000 section 2.3): after the deepest `n_dropout_stages` encoder stages and after the
    bridge, rate `dropout_p` (default 0.2 as the authors' implementation). Element-wise `nn.Dropout` (one Bernoulli
    variable per activation, Gal & Ghahramani 2016 and paper 004; the same choice as `nnUNetTrainerDropout`). When the
    plans give a `dropout_op` (e.g. `torch.nn.Dropout3d` for channel dropout) that class is used at the same places
    with `dropout_op_kwargs` (p defaults to `dropout_p`). `dropout_p=0` (or p=0 in the kwargs) removes every dropout
    module. Dropout is active only in train mode; MC sampling calls `.train()` on the dropout modules alone.

    Plans keys that describe PlainConvUNet / ResidualEncoderUNet block counts (`n_conv_per_stage`,
    `n_conv_per_stage_decoder`, `n_blocks_per_stage`) and `nonlin_first` are accepted and ignored: every stage here
    is one residual block of two convolutions, as in the paper.

    Deep supervision: as `PlainConvUNet`; `decoder.deep_supervision` switches between a list of n_stages - 1 logits
    (highest resolution first) and one tensor.

    Streaming MC dropout: `forward_prefix(x)` computes everything before the first dropout module (deterministic,
    computed once per input) and `forward_suffix(cache)` the rest; `forward(x) == forward_suffix(forward_prefix(x))`.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: IntOrSeq, conv_op: Type[_ConvNd],
                 kernel_sizes: Union[int, Sequence[IntOrSeq]], strides: Union[int, Sequence[IntOrSeq]],
                 num_classes: int, n_conv_per_stage: Optional[IntOrSeq] = None,
                 n_conv_per_stage_decoder: Optional[IntOrSeq] = None, conv_bias: bool = True,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False, aspp_dilations: Sequence[int] = (1, 6, 12, 18),
                 dropout_p: float = 0.2, n_dropout_stages: int = 2, se_reduction: int = 16,
                 n_blocks_per_stage: Optional[IntOrSeq] = None, nonlin_first: bool = False):
        super().__init__()
        if n_stages < 2:
            raise ValueError(f"XBoundNet needs n_stages >= 2 (one encoder and one decoder level), got {n_stages}")
        features = [features_per_stage] * n_stages if isinstance(features_per_stage, int) else list(features_per_stage)
        kernel_sizes = [kernel_sizes] * n_stages if isinstance(kernel_sizes, int) else list(kernel_sizes)
        strides = [strides] * n_stages if isinstance(strides, int) else list(strides)
        for name, value in (("features_per_stage", features), ("kernel_sizes", kernel_sizes), ("strides", strides)):
            if len(value) != n_stages:
                raise ValueError(f"{name} must have n_stages={n_stages} entries, got {len(value)}: {value}")
        kernel_sizes = [list(maybe_convert_scalar_to_list(conv_op, k)) for k in kernel_sizes]
        strides = [list(maybe_convert_scalar_to_list(conv_op, s)) for s in strides]
        if not 0 <= dropout_p < 1:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

        self.conv_op = conv_op
        self.dropout_p = float(dropout_p)
        self._dropout_op, self._dropout_op_kwargs = dropout_op, dict(dropout_op_kwargs or {})
        has_dropout = self._make_dropout() is not None
        first = max(0, n_stages - int(n_dropout_stages))
        self.dropout_stages = list(range(first, n_stages)) if has_dropout else []

        # names used by dynamic-network-architectures' AbstractDynamicNetworkArchitectures (fine-tuning helpers)
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        self.keys_to_in_proj = ("encoder.stages.0.conv1", "encoder.stages.0.shortcut.0")

        self.encoder = XBoundNetEncoder(input_channels, features, conv_op, kernel_sizes, strides, conv_bias, norm_op,
                                        norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction, self._make_dropout,
                                        self.dropout_stages)
        self.bridge = ASPP(conv_op, features[-1], kernel_sizes[-1], aspp_dilations, conv_bias, norm_op,
                           norm_op_kwargs, nonlin, nonlin_kwargs, dropout=self._make_dropout())
        self.decoder = XBoundNetDecoder(self.encoder, num_classes, deep_supervision)
        self.apply(self.initialize)

    def _make_dropout(self) -> Optional[nn.Module]:
        if self.dropout_p == 0:
            return None
        if self._dropout_op is None:
            return nn.Dropout(p=self.dropout_p)
        kwargs = {"p": self.dropout_p, **self._dropout_op_kwargs}
        return None if kwargs["p"] == 0 else self._dropout_op(**kwargs)

    @property
    def stem(self) -> nn.Module:
        return self.encoder.stages[0]

    def forward_prefix(self, x: torch.Tensor) -> PrefixCache:
        """The deterministic part of the forward pass: encoder stages up to and including the first one followed by
        dropout (without that dropout), or the whole encoder and the bridge's features when only the bridge has
        dropout (or there is none)."""
        stop = self.dropout_stages[0] if self.dropout_stages else len(self.encoder.stages) - 1
        features = []
        for s in range(stop + 1):
            x = self.encoder.stages[s](x)
            features.append(x)
        bridge = None if self.dropout_stages else self.bridge.features(x)
        return PrefixCache(features, bridge)

    def forward_suffix(self, cache: PrefixCache) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The rest of the forward pass from a `forward_prefix` cache (reusable: the cache is not modified)."""
        features = list(cache.features)
        if cache.bridge is None:
            features[-1] = self.encoder.maybe_dropout(len(features) - 1, features[-1])
            for s in range(len(features), len(self.encoder.stages)):
                features.append(self.encoder.maybe_dropout(s, self.encoder.stages[s](features[-1])))
            bottom = self.bridge(features[-1])
        else:
            bottom = self.bridge.dropout(cache.bridge) if hasattr(self.bridge, "dropout") else cache.bridge
        return self.decoder([*features[:-1], bottom])

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        return self.forward_suffix(self.forward_prefix(x))

    def named_blocks(self) -> List[str]:
        """Names (for `get_submodule`) of every convolutional block in forward order: encoder stages (stem first),
        bridge, then per decoder level its attention gate and residual block, and the full-resolution head."""
        names = [f"encoder.stages.{s}" for s in range(len(self.encoder.stages))] + ["bridge"]
        for j in range(len(self.decoder.stages)):
            names += [f"decoder.gates.{j}", f"decoder.stages.{j}"]
        return names + [f"decoder.seg_layers.{len(self.decoder.seg_layers) - 1}"]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Number of convolution (and gating) output elements for one sample of spatial size `input_size`, the proxy
        nnU-Net's planner compares against its VRAM reference (as `PlainConvUNet.compute_conv_feature_map_size`)."""
        if len(input_size) != convert_conv_op_to_dim(self.conv_op):
            raise ValueError(f"give the spatial size only, (x, y[, z]); got {tuple(input_size)}")
        out, sizes, size = np.int64(0), [], list(input_size)
        for stage, stride in zip(self.encoder.stages, self.encoder.strides):
            out += stage.compute_conv_feature_map_size(size)
            size = [i // j for i, j in zip(size, stride)]
            sizes.append(size)  # sizes[s]: spatial size of encoder stage s's output
        out += self.bridge.compute_conv_feature_map_size(sizes[-1])
        n = len(sizes)
        for j in range(len(self.decoder.stages)):
            size, ch = sizes[n - 2 - j], self.encoder.output_channels[n - 2 - j]
            out += _numel(ch, size)  # transposed conv
            out += self.decoder.gates[j].compute_conv_feature_map_size(size)
            out += self.decoder.stages[j].compute_conv_feature_map_size(size)
            if self.decoder.deep_supervision or j == len(self.decoder.stages) - 1:
                out += _numel(self.decoder.num_classes, size)
        return out

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He initialisation (negative slope 1e-2) of convolutions, as nnU-Net's networks."""
        InitWeights_He(1e-2)(module)
