"""Paper 004's MC dropout sits after the nonlinearity: a dropped feature map is exactly zero where the next
convolution reads it (issue 22 item 3). Counted with forward hooks on nnU-Net's own networks (PlainConvUNet,
ResidualEncoderUNet; 2D and anisotropic 3D), built by the trainers' `build_network_architecture` from plans."""
from __future__ import annotations

import math

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_kaz.trainers.dropout_trainer import nnUNetTrainerDropout, nnUNetTrainerDropoutSpatial

P = 0.5
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def _configuration(network: str, dim: int) -> ConfigurationManager:
    n = 4
    strides = [[1] * dim] + ([[1, 2, 2]] + [[2, 2, 2]] * (n - 2) if dim == 3 else [[2, 2]] * (n - 1))
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n - 1) if dim == 3 else [[3, 3]] * n
    blocks = {"n_blocks_per_stage": [1, 2, 2, 2]} if network == RESENC else {"n_conv_per_stage": [2] * n}
    return ConfigurationManager({"architecture": {
        "network_class_name": network,
        "arch_kwargs": {"n_stages": n, "features_per_stage": [8, 16, 32, 32], "conv_op": f"torch.nn.Conv{dim}d",
                        "kernel_sizes": kernels, "strides": strides, **blocks, "n_conv_per_stage_decoder": [2] * (n - 1),
                        "conv_bias": True, "norm_op": f"torch.nn.InstanceNorm{dim}d",
                        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}})


def _old_placement(cm: ConfigurationManager) -> nn.Module:
    """What the trainers built before issue 22: dynamic-network-architectures' `dropout_op`, which it places
    between each convolution and its InstanceNorm (conv -> dropout -> norm -> nonlinearity)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    kw = dict(cm.network_arch_init_kwargs, dropout_op="torch.nn.Dropout2d" if "2d" in
              cm.network_arch_init_kwargs["conv_op"] else "torch.nn.Dropout3d", dropout_op_kwargs={"p": P})
    return get_network_from_plans(cm.network_arch_class_name, kw, cm.network_arch_init_kwargs_req_import, 1, 3,
                                  allow_init=True, deep_supervision=False)


def _zero_maps(x: torch.Tensor) -> int:
    """(item, channel) feature maps that are exactly zero everywhere."""
    return int((x.flatten(2) == 0).all(-1).sum())


def _run(network: nn.Module, x: torch.Tensor, active: bool = True):
    """One forward pass, the dropout modules in train mode when `active` (MC dropout: the rest in eval mode).
    Returns per convolution, in call order, (zero maps at its input, zero elements at its input, the dropout
    module whose output it reads, or None), and per dropout module (maps it zeroed, elements it zeroed, maps,
    elements)."""
    network.eval()
    for m in network.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train(active)
    produced, dropped, convs, hooks = {}, {}, [], []

    def on_dropout(module, args, out):
        produced[id(out)] = (module, out)  # holding `out` keeps its id from being reused by another tensor
        dropped[module] = (_zero_maps(out) - _zero_maps(args[0]), int((out == 0).sum()) - int((args[0] == 0).sum()),
                           out.shape[0] * out.shape[1], out.numel())

    def on_conv(module, args):
        source = produced.get(id(args[0]), (None, None))
        convs.append((_zero_maps(args[0]), int((args[0] == 0).sum()), source[0] if source[1] is args[0] else None))

    for m in network.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            hooks.append(m.register_forward_hook(on_dropout))
        elif isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_pre_hook(on_conv))
    with torch.no_grad():
        network(x)
    for h in hooks:
        h.remove()
    return convs, dropped


def _trained_norms(network: nn.Module) -> nn.Module:
    """Give every InstanceNorm the non-zero bias (and non-unit weight) training gives it: initialised at 0, the
    bias would map an all-zero map to zero even after the norm, hiding the placement this test is about."""
    g = torch.Generator().manual_seed(3)
    for m in network.modules():
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return network


def _build(base: type, cm: ConfigurationManager) -> nn.Module:
    trainer = type(base.__name__ + "_test", (base,), {"dropout_p": P})
    return _trained_norms(trainer.build_network_architecture(PlansManager({"configurations": {}}), cm, 1, 3, False))


def _within_binomial(k: int, n: int) -> bool:
    """k successes of n Bernoulli(P) draws lie within 5 standard deviations of n P."""
    return abs(k - n * P) < 5 * math.sqrt(n * P * (1 - P))


# (network, dimension, input shape, convolutions after the first that read no dropout's output directly: each
# decoder stage's first (a concatenation of the upsampled map, after which no nonlinearity comes, with the skip),
# and in the ResEnc encoder the 1x1 projection of the shortcut of the strided blocks that widen (after an average
# pooling; 16 -> 32 -> 32 features: two of the three))
CASES = [(PLAIN, 2, (4, 1, 32, 48), 3), (RESENC, 2, (4, 1, 40, 32), 3 + 2), (PLAIN, 3, (2, 1, 8, 24, 16), 3)]


@pytest.mark.parametrize("network, dim, shape, n_not_fed", CASES)
def test_spatial_dropout_zeroes_whole_maps_at_the_next_convolution(network, dim, shape, n_not_fed):
    cm = _configuration(network, dim)
    net = _build(nnUNetTrainerDropoutSpatial, cm)
    torch.manual_seed(0)
    x = torch.randn(shape)
    convs, dropped = _run(net, x)
    fed = [c for c in convs if c[2] is not None]
    # every convolution reads a dropout's output except the first (the image) and those of CASES
    assert len(fed) == len(convs) - 1 - n_not_fed and len(fed) >= 12
    for zero_maps, _, module in fed:
        assert zero_maps == dropped[module][0] > 0  # the maps the dropout zeroed are zero at the convolution
    assert _within_binomial(sum(d[0] for d in dropped.values()), sum(d[2] for d in dropped.values()))
    assert all(zero_maps > 0 for zero_maps, _, module in convs[1:] if module is None)  # carried through
    # dropout off: no map is zero anywhere
    assert all(z == 0 for z, *_ in _run(net, x, active=False)[0])
    # nnU-Net's dropout_op (before the InstanceNorm) drops maps that never reach a convolution as zeros
    old_convs, old_dropped = _run(_trained_norms(_old_placement(cm)), x)
    assert sum(d[0] for d in old_dropped.values()) > 0 and all(z == 0 for z, *_ in old_convs)


def test_element_wise_dropout_sits_at_the_same_places():
    cm = _configuration(PLAIN, 2)
    net, twin = _build(nnUNetTrainerDropout, cm), _build(nnUNetTrainerDropoutSpatial, cm)

    def places(n):
        return [(name, m.p) for name, m in n.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]

    assert places(net) == places(twin) and len(places(net)) >= 13
    assert {type(m) for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)} == {nn.Dropout}
    torch.manual_seed(1)
    convs, dropped = _run(net, torch.randn(3, 1, 32, 32))
    fed = [c for c in convs if c[2] is not None]
    assert len(fed) == len(convs) - 4
    for _, zeros, module in fed:
        assert zeros == dropped[module][1] > 0  # exactly the zeroed activations are zero at the convolution
    assert _within_binomial(sum(d[1] for d in dropped.values()), sum(d[3] for d in dropped.values()))
