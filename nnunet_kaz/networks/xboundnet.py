"""XBoundNet++ (paper 000 section 2.1) as an nnU-Net network: built from the same plans keys as PlainConvUNet."""
from __future__ import annotations

import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import (
    convert_conv_op_to_dim,
    get_matching_convtransp,
    maybe_convert_scalar_to_list,
)
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_kaz.networks.blocks import ASPP, AttentionGate, ResidualBlock, Stem, _numel, make_nonlin, make_norm
from nnunet_kaz.networks.topology import PAPER_DILATIONS

IntOrSeq = Union[int, Sequence[int]]

# plans keys of nnU-Net's PlainConvUNet / ResidualEncoderUNet that describe their block counts and layouts;
# XBoundNet++ accepts them (so its plans and stock plans build it) and warns once naming those it was given
IGNORED_PLANS_KEYS = ("n_conv_per_stage", "n_conv_per_stage_decoder", "n_blocks_per_stage", "nonlin_first",
                      "block", "bottleneck_channels", "stem_channels")
DROPOUT_PLACEMENTS = ("authors", "deepest")


class PrefixCache(NamedTuple):
    """Output of `XBoundNet.forward_prefix`: everything computed before the first dropout module.

    `features[s]`: output of encoder stage s (the last one before its dropout, if it has one). `bridge`: the ASPP
    bridge's output before its dropout, None when an encoder dropout comes first. `decoder[j]`: output of decoder
    level j (deepest first; the last one before its dropout), None when the decoder is not reached.
    """

    features: List[torch.Tensor]
    bridge: Optional[torch.Tensor]
    decoder: Optional[List[torch.Tensor]] = None


def resolve_dropout_placement(placement: Union[str, Dict], n_stages: int) -> Dict:
    """{"encoder": [stages], "bridge": bool, "decoder": [levels]} for a named placement or an explicit dict.

    - "authors" (default; the authors' code, AUTHORS_CODE.md): after every encoder stage below full resolution
      that feeds a skip (stages 1 .. n-2: 1/2 and 1/4 in the four-level network), after the bridge, and after every
      decoder level below full resolution (levels 0 .. n-3: 1/4 and 1/2). Not after the stem / full-resolution level
      or the full-resolution decoder level.
    - "deepest": after the two deepest encoder stages (n-2, n-1) and the bridge (this package's earlier default).
    - a dict with any of "encoder" (stage indices 0 .. n-1), "bridge" (bool), "decoder" (level indices 0 .. n-2,
      0 = deepest, as `decoder.stages`).
    """
    if isinstance(placement, str):
        if placement == "authors":
            return {"encoder": list(range(1, n_stages - 1)), "bridge": True, "decoder": list(range(n_stages - 2))}
        if placement == "deepest":
            return {"encoder": list(range(max(0, n_stages - 2), n_stages)), "bridge": True, "decoder": []}
        raise ValueError(f"dropout_placement must be one of {DROPOUT_PLACEMENTS} or a dict, got {placement!r}")
    unknown = set(placement) - {"encoder", "bridge", "decoder"}
    if unknown:
        raise ValueError(f"dropout_placement has unknown keys {sorted(unknown)} (encoder, bridge, decoder)")
    out = {"encoder": sorted(int(s) for s in placement.get("encoder", [])), "bridge": bool(placement.get("bridge")),
           "decoder": sorted(int(j) for j in placement.get("decoder", []))}
    for key, limit in (("encoder", n_stages), ("decoder", n_stages - 1)):
        bad = [i for i in out[key] if not 0 <= i < limit]
        if bad:
            raise ValueError(f"dropout_placement[{key!r}] = {bad} out of range 0..{limit - 1}")
    return out


class XBoundNetEncoder(nn.Module):
    """Stem stage (stage 0: the authors' stem + first residual SE level) and residual squeeze-excitation blocks
    (stages 1..n-1), each downsampling by its planned stride.

    Holds the plan's metadata like dynamic-network-architectures' `PlainConvEncoder` (`conv_op`, `output_channels`,
    `strides`, `kernel_sizes`, norm / nonlin settings) so that decoders and heads can be built from it.
    `dropouts[str(s)]` is the dropout applied to stage s's output (where the placement puts one).
    """

    def __init__(self, input_channels: int, features: Sequence[int], conv_op: Type[_ConvNd],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], conv_bias: bool,
                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction: int,
                 dropout_factory, dropout_stages: Sequence[int]):
        super().__init__()
        stages = [Stem(conv_op, input_channels, features[0], kernel_sizes[0], strides[0], conv_bias, norm_op,
                       norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction)]
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
    """Per decoder level j (deepest first), as the authors' decoder: transposed-conv upsampling by the encoder
    stride followed by norm and activation (`upconv_block`), an attention gate on the skip gated by the upsampled
    features, concatenation [upsampled, gated skip], a residual squeeze-excitation block, the level's dropout
    (`dropouts[str(j)]`, where the placement puts one), and a 1x1 segmentation head.

    `deep_supervision` works as in dynamic-network-architectures' `UNetDecoder`: when True, `forward` returns a list
    of logits, highest resolution first (one per decoder level, n_stages - 1 in total, matching nnU-Net's
    `_get_deep_supervision_scales`); when False, only the full-resolution logits. All heads always exist, so
    weights load either way. A head sees its level's output after the level's dropout.
    """

    def __init__(self, encoder: XBoundNetEncoder, num_classes: int, deep_supervision: bool,
                 se_reduction: int, dropout_factory, dropout_levels: Sequence[int]):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        transpconv_op = get_matching_convtransp(conv_op=encoder.conv_op)
        ch, n = encoder.output_channels, len(encoder.output_channels)
        transpconvs, gates, stages, seg_layers = [], [], [], []
        for j in range(n - 1):
            below, skip = ch[n - 1 - j], ch[n - 2 - j]
            stride = encoder.strides[n - 1 - j]
            transpconvs.append(nn.Sequential(transpconv_op(below, skip, stride, stride, bias=encoder.conv_bias),
                                             make_norm(encoder.norm_op, skip, encoder.norm_op_kwargs),
                                             make_nonlin(encoder.nonlin, encoder.nonlin_kwargs)))
            gates.append(AttentionGate(encoder.conv_op, skip, skip, conv_bias=encoder.conv_bias))
            stages.append(ResidualBlock(encoder.conv_op, 2 * skip, skip, encoder.kernel_sizes[n - 2 - j], 1,
                                        encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.nonlin,
                                        encoder.nonlin_kwargs, se_reduction=se_reduction))
            seg_layers.append(encoder.conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.gates = nn.ModuleList(gates)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)
        self.dropouts = nn.ModuleDict({str(j): dropout_factory() for j in dropout_levels})

    def level(self, j: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decoder level j without its dropout: upsample x, gate the skip, concatenate, residual SE block."""
        up = self.transpconvs[j](x)
        return self.stages[j](torch.cat((up, self.gates[j](up, skip)), 1))

    def maybe_dropout(self, j: int, x: torch.Tensor) -> torch.Tensor:
        key = str(j)
        return self.dropouts[key](x) if key in self.dropouts else x

    def heads(self, outputs: Sequence[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Logits from the levels' outputs (after dropout): all of them highest resolution first, or the last."""
        if self.deep_supervision:
            return [self.seg_layers[j](x) for j, x in enumerate(outputs)][::-1]
        return self.seg_layers[len(outputs) - 1](outputs[-1])

    def forward(self, skips: Sequence[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """`skips`: encoder stage outputs 0..n-2 followed by the bridge output (lowest resolution last)."""
        x, outputs = skips[-1], []
        for j in range(len(self.stages)):
            x = self.maybe_dropout(j, self.level(j, x, skips[-(j + 2)]))
            outputs.append(x)
        return self.heads(outputs)


class XBoundNet(AbstractDynamicNetworkArchitectures):
    """XBoundNet++ (paper 000 section 2.1, Fig. 2; details from the authors' code where the paper is silent): a
    residual squeeze-excitation U-Net with an ASPP bridge, attention-gated skips and MC dropout, for 2D and 3D alike
    (`conv_op` = `nn.Conv2d` / `nn.Conv3d`).

    Built from nnU-Net plans keys exactly like `PlainConvUNet`, so a plans file may name
    `nnunet_kaz.networks.XBoundNet` and `get_network_from_plans` builds it; string class names are resolved there.
    The paper's four-level network (bridge at 1/8, 32x32 for 256x256) is what `XBoundNetPlanner` plans
    (`nnunet_kaz.networks.topology`); this class builds whatever depth the plans give.

    Structure (module names are what Grad-CAM lists, see `named_blocks`):
    - `encoder.stages[0]`: the stem (two conv-norm-act, `stem`) and the first residual SE level (`level`) at the
      resolution of `strides[0]` (normally full); its output is the full-resolution skip;
    - `encoder.stages[s]`, s >= 1: residual SE block (SE on the branch, reduction `se_reduction`, 1x1-conv
      shortcut, no activation after the sum), stride `strides[s]`, `features_per_stage[s]` channels;
    - `bridge`: ASPP at the deepest stage, convolutions with `aspp_dilations` summed, then norm + act;
    - `decoder.transpconvs[j]` (transposed conv + norm + act), `decoder.gates[j]` (attention gate, inner width =
      skip channels, no norm), `decoder.stages[j]` (residual SE block on [upsampled, gated skip]),
      `decoder.seg_layers[j]` (1x1 head), j = 0 deepest.

    Dropout (MC dropout, paper 000 section 2.3), rate `dropout_p` (default 0.2), placed by `dropout_placement`
    (`resolve_dropout_placement`): by default as the authors' code, after the encoder levels at 1/2 and 1/4, the
    bridge (1/8) and the decoder levels at 1/4 and 1/2; "deepest" is the earlier placement (two deepest encoder
    stages + bridge); a dict places it by stage. Element-wise `nn.Dropout` (one Bernoulli variable per activation,
    as the authors' Keras `Dropout`). When the plans give a `dropout_op` (e.g. `torch.nn.Dropout3d` for channel
    dropout) that class is used at the same places with `dropout_op_kwargs` (p defaults to `dropout_p`).
    `dropout_p=0` (or p=0 in the kwargs) removes every dropout module. MC sampling calls `.train()` on the dropout
    modules alone (normalisation keeps its running statistics, unlike the authors' `training=True`).

    Plans keys that describe PlainConvUNet / ResidualEncoderUNet block counts (`IGNORED_PLANS_KEYS`) are accepted
    and ignored with one warning naming them: every stage here is one residual block of two convolutions.

    Deep supervision: as `PlainConvUNet`; `decoder.deep_supervision` switches between a list of n_stages - 1 logits
    (highest resolution first) and one tensor.

    Streaming MC dropout: `forward_prefix(x)` computes everything before the first dropout module (deterministic,
    computed once per input) and `forward_suffix(cache)` the rest; `forward(x) == forward_suffix(forward_prefix(x))`
    for every placement.
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: IntOrSeq, conv_op: Type[_ConvNd],
                 kernel_sizes: Union[int, Sequence[IntOrSeq]], strides: Union[int, Sequence[IntOrSeq]],
                 num_classes: int, n_conv_per_stage: Optional[IntOrSeq] = None,
                 n_conv_per_stage_decoder: Optional[IntOrSeq] = None, conv_bias: bool = True,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 dropout_op: Optional[Type[nn.Module]] = None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = None, nonlin_kwargs: Optional[dict] = None,
                 deep_supervision: bool = False, aspp_dilations: Sequence = PAPER_DILATIONS,
                 dropout_p: float = 0.2, dropout_placement: Union[str, Dict] = "authors", se_reduction: int = 16,
                 n_blocks_per_stage: Optional[IntOrSeq] = None, nonlin_first: bool = False, block=None,
                 bottleneck_channels=None, stem_channels=None):
        super().__init__()
        given = dict(n_conv_per_stage=n_conv_per_stage, n_conv_per_stage_decoder=n_conv_per_stage_decoder,
                     n_blocks_per_stage=n_blocks_per_stage, nonlin_first=nonlin_first or None, block=block,
                     bottleneck_channels=bottleneck_channels, stem_channels=stem_channels)
        ignored = [k for k in IGNORED_PLANS_KEYS if given[k] is not None]
        if ignored:
            warnings.warn(f"XBoundNet++ ignores the plans keys {', '.join(ignored)} (they describe nnU-Net's "
                          "U-Nets; every XBoundNet++ stage is one residual SE block)", stacklevel=2)
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
        placement = resolve_dropout_placement(dropout_placement, n_stages)
        if self._make_dropout() is None:
            placement = {"encoder": [], "bridge": False, "decoder": []}
        self.dropout_at = placement
        self.dropout_stages = list(placement["encoder"])  # encoder stages followed by dropout

        # dynamic-network-architectures' AbstractDynamicNetworkArchitectures keys (fine-tuning helpers,
        # checked by its test_submodules_loadable)
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0.stem"
        self.keys_to_in_proj = ("encoder.stages.0.stem.0.conv",)

        self.encoder = XBoundNetEncoder(input_channels, features, conv_op, kernel_sizes, strides, conv_bias, norm_op,
                                        norm_op_kwargs, nonlin, nonlin_kwargs, se_reduction, self._make_dropout,
                                        placement["encoder"])
        self.bridge = ASPP(conv_op, features[-1], kernel_sizes[-1], aspp_dilations, conv_bias, norm_op,
                           norm_op_kwargs, nonlin, nonlin_kwargs,
                           dropout=self._make_dropout() if placement["bridge"] else None)
        self.decoder = XBoundNetDecoder(self.encoder, num_classes, deep_supervision, se_reduction,
                                        self._make_dropout, placement["decoder"])
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
        """The deterministic part of the forward pass, up to (not including) the first dropout module in forward
        order: encoder stages, then the bridge's features, then decoder levels."""
        features = []
        for s, stage in enumerate(self.encoder.stages):
            x = stage(x)
            features.append(x)
            if str(s) in self.encoder.dropouts:
                return PrefixCache(features, None, None)
        bridge = self.bridge(x, dropout=False)
        if hasattr(self.bridge, "dropout"):
            return PrefixCache(features, bridge, None)
        x, outputs, n = bridge, [], len(features)
        for j in range(len(self.decoder.stages)):
            x = self.decoder.level(j, x, features[n - 2 - j])
            outputs.append(x)
            if str(j) in self.decoder.dropouts:
                break
        return PrefixCache(features, bridge, outputs)

    def forward_suffix(self, cache: PrefixCache) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The rest of the forward pass from a `forward_prefix` cache (reusable: the cache is not modified)."""
        features, n = list(cache.features), len(self.encoder.stages)
        outputs: List[torch.Tensor] = []
        if cache.bridge is None:
            features[-1] = self.encoder.maybe_dropout(len(features) - 1, features[-1])
            for s in range(len(features), n):
                features.append(self.encoder.maybe_dropout(s, self.encoder.stages[s](features[-1])))
            x = self.bridge(features[-1], dropout=False)
            x = self.bridge.dropout(x) if hasattr(self.bridge, "dropout") else x
        elif cache.decoder is None:
            x = self.bridge.dropout(cache.bridge) if hasattr(self.bridge, "dropout") else cache.bridge
        else:  # only the last cached level can have a dropout
            outputs = [self.decoder.maybe_dropout(j, o) for j, o in enumerate(cache.decoder)]
            x = outputs[-1]
        for j in range(len(outputs), len(self.decoder.stages)):
            x = self.decoder.maybe_dropout(j, self.decoder.level(j, x, features[n - 2 - j]))
            outputs.append(x)
        return self.decoder.heads(outputs)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        return self.forward_suffix(self.forward_prefix(x))

    def dropout_module_names(self) -> List[str]:
        """Module names of every dropout, in forward order."""
        names = [f"encoder.dropouts.{s}" for s in self.dropout_at["encoder"]]
        names += ["bridge.dropout"] if hasattr(self.bridge, "dropout") else []
        return names + [f"decoder.dropouts.{j}" for j in self.dropout_at["decoder"]]

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
