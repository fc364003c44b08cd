"""XBoundNet++: shapes, gradients, dropout, prefix/suffix split, and construction from nnU-Net plans."""
from __future__ import annotations

import pydoc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_kaz.networks import ASPP, XBoundNet

STRIDES_2D = [[1, 1], [2, 2], [2, 2], [2, 2]]
STRIDES_3D = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]


def net_kwargs(dim: int, strides, features=(8, 16, 32, 32), **kw) -> dict:
    """Plans-like kwargs as nnU-Net's planner writes them, with classes instead of strings."""
    n = len(strides)
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    base = dict(input_channels=1, n_stages=n, features_per_stage=list(features[:n]), conv_op=conv,
                kernel_sizes=[[3] * dim] * n, strides=strides, num_classes=3, n_conv_per_stage=[2] * n,
                n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    base.update(kw)
    return base


def nnunet_ds_scales(strides) -> list:
    """nnU-Net's own deep-supervision scales for these pooling strides."""
    fake = SimpleNamespace(enable_deep_supervision=True,
                           configuration_manager=SimpleNamespace(pool_op_kernel_sizes=strides))
    return nnUNetTrainer._get_deep_supervision_scales(fake)


@pytest.mark.parametrize("dim,strides,patch", [(2, STRIDES_2D, (32, 48)), (3, STRIDES_3D, (8, 16, 16)),
                                               (3, [[1, 1, 1], [2, 2, 2]], (8, 8, 8))])
def test_output_shapes_with_and_without_deep_supervision(dim, strides, patch):
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(dim, strides, deep_supervision=True)).eval()
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        outs = net(x)
        scales = nnunet_ds_scales(strides)
        assert isinstance(outs, list) and len(outs) == len(scales) == len(strides) - 1
        for out, scale in zip(outs, scales):
            assert out.shape == (2, 3, *[round(p * s) for p, s in zip(patch, scale)])
        net.decoder.deep_supervision = False  # what nnU-Net's trainer does for validation / inference
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, *patch)
    assert torch.allclose(single, outs[0], atol=1e-6)


def test_anisotropic_kernels_and_strides_3d():
    net = XBoundNet(**net_kwargs(3, STRIDES_3D, kernel_sizes=[[1, 3, 3], [3, 3, 3], [1, 3, 3]]))
    out = net.eval()(torch.randn(1, 1, 4, 16, 8))
    assert out.shape == (1, 3, 4, 16, 8)
    assert net.bridge.branches[3].dilation == (18, 18, 18) and net.bridge.branches[3].padding == (0, 18, 18)


@pytest.mark.parametrize("dim,strides", [(2, STRIDES_2D), (3, STRIDES_3D)])
def test_every_parameter_gets_a_gradient(dim, strides):
    # conv_bias=False: a bias right before instance norm has an exactly zero gradient by construction;
    # >= 64 channels: SE hidden layers of >= 4 ReLU units (one unit can be dead for every sample)
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(dim, strides, features=(8, 64, 64, 64), conv_bias=False,
                                 deep_supervision=True)).train()
    outs = net(torch.randn(2, 1, *([16] * dim)))
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    for block in net.named_blocks():  # every listed block takes part in the graph
        assert any(p.grad.abs().sum() > 0 for p in net.get_submodule(block).parameters()), block


def test_dropout_eval_deterministic_train_stochastic():
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(2, STRIDES_2D))
    x = torch.randn(1, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.equal(a, b)
    net.train()
    with torch.no_grad():
        c, d = net(x), net(x)
    assert not torch.allclose(c, d)
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 3 and all(m.p == 0.2 for m in dropouts)  # 2 deepest encoder stages + bridge
    assert set(net.encoder.dropouts) == {"2", "3"} and isinstance(net.bridge.dropout, nn.Dropout)


def test_dropout_p_zero_removes_dropout_modules():
    net = XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_p=0.0)).train()
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # instance norm keeps train mode deterministic


def test_plans_dropout_op_is_used_with_its_kwargs():
    net = XBoundNet(**net_kwargs(3, STRIDES_3D, dropout_op=nn.Dropout3d, dropout_op_kwargs={"p": 0.3},
                                 n_dropout_stages=1))
    drops = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert len(drops) == 2 and all(type(m) is nn.Dropout3d and m.p == 0.3 for m in drops)
    assert net.dropout_stages == [2]


@pytest.mark.parametrize("n_dropout_stages,dropout_p", [(2, 0.2), (0, 0.2), (2, 0.0)])
def test_prefix_suffix_split(n_dropout_stages, dropout_p):
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(2, STRIDES_2D, n_dropout_stages=n_dropout_stages, dropout_p=dropout_p,
                                 deep_supervision=True)).train()
    x = torch.randn(1, 1, 32, 32)
    ran_in_prefix = []
    hooks = [m.register_forward_hook(lambda mod, i, o: ran_in_prefix.append(mod)) for m in net.modules()]
    with torch.no_grad():
        cache = net.forward_prefix(x)
        for h in hooks:
            h.remove()
        assert not any(isinstance(m, nn.Dropout) for m in ran_in_prefix)
        # deterministic prefix, stochastic suffix (when there is dropout), cache reusable
        again = net.forward_prefix(x)
        assert all(torch.equal(a, b) for a, b in zip(cache.features, again.features))
        s1, s2 = net.forward_suffix(cache), net.forward_suffix(cache)
        assert any(not torch.allclose(a, b) for a, b in zip(s1, s2)) == (dropout_p > 0)
        torch.manual_seed(1)
        full = net(x)
        torch.manual_seed(1)
        split = net.forward_suffix(net.forward_prefix(x))
    assert all(torch.equal(a, b) for a, b in zip(full, split))
    if dropout_p > 0 and n_dropout_stages > 0:
        assert len(cache.features) == net.dropout_stages[0] + 1 and cache.bridge is None
    else:  # the whole encoder and the bridge's features are deterministic
        assert len(cache.features) == 4 and cache.bridge is not None
        assert net.encoder.stages[3] in ran_in_prefix and net.bridge.branches[0] in ran_in_prefix


def plans_arch_kwargs(dim: int) -> dict:
    """arch_kwargs exactly as nnU-Net 2.8's ExperimentPlanner writes them (strings for classes)."""
    n = 3
    return {
        "n_stages": n, "features_per_stage": [8, 16, 32], "kernel_sizes": [[3] * dim] * n,
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "strides": [[1] * dim] + [[2] * dim] * (n - 1),
        "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


@pytest.mark.parametrize("dim", [2, 3])
def test_built_by_get_network_from_plans(dim):
    name = XBoundNet.__module__ + "." + XBoundNet.__name__  # what nnU-Net's planner writes for UNet_class
    assert name == "nnunet_kaz.networks.XBoundNet" and pydoc.locate(name) is XBoundNet
    req = ("conv_op", "norm_op", "dropout_op", "nonlin")
    net = get_network_from_plans(name, plans_arch_kwargs(dim), req, 2, 4, allow_init=True, deep_supervision=True)
    assert isinstance(net, XBoundNet) and net.decoder.deep_supervision
    assert isinstance(net.encoder.stages[0].norm1, getattr(nn, f"InstanceNorm{dim}d"))
    outs = net(torch.randn(1, 2, *([16] * dim)))
    assert [o.shape[1] for o in outs] == [4, 4] and outs[0].shape[2:] == (16,) * dim
    # He init: weights with std sqrt(2 / ((1 + 0.01^2) fan_in)), zero bias
    w = net.encoder.stages[1].conv1.weight
    expected = np.sqrt(2 / ((1 + 1e-4) * w[0].numel()))
    assert abs(w.std().item() - expected) / expected < 0.1
    assert torch.count_nonzero(net.encoder.stages[1].conv1.bias) == 0
    # a network trained with deep supervision loads into one built without it
    plain = get_network_from_plans(name, plans_arch_kwargs(dim), req, 2, 4, deep_supervision=False)
    plain.load_state_dict(net.state_dict())


def test_planner_vram_estimate_uses_xboundnet():
    req = ("conv_op", "norm_op", "dropout_op", "nonlin")
    kw = plans_arch_kwargs(2)
    est = ExperimentPlanner.static_estimate_VRAM_usage((64, 64), 1, 2, "nnunet_kaz.networks.XBoundNet", kw, req)
    plain = ExperimentPlanner.static_estimate_VRAM_usage(
        (64, 64), 1, 2, "dynamic_network_architectures.architectures.unet.PlainConvUNet", kw, req)
    assert est > plain > 0  # more feature maps: SE, ASPP branches, gates, shortcuts
    bigger = ExperimentPlanner.static_estimate_VRAM_usage((128, 64), 1, 2, "nnunet_kaz.networks.XBoundNet", kw, req)
    assert bigger == 2 * est


def test_feature_map_size_counts_every_output():
    """Hand count for a 2-stage 2D net on an 8x8 input (features 4, 8; 2 classes; no deep supervision)."""
    net = XBoundNet(1, 2, [4, 8], nn.Conv2d, 3, [[1, 1], [2, 2]], 2)
    stem = 3 * 4 * 64                      # conv1, conv2, 1x1 shortcut at 8x8
    stage1 = 3 * 8 * 16                    # conv1, conv2, shortcut at 4x4
    bridge = 4 * 8 * 16                    # four dilated branches
    dec = 4 * 64 + (2 * 2 * 64 + 64 + 4 * 64) + 3 * 4 * 64 + 2 * 64  # transpconv, gate, block, head
    assert net.compute_conv_feature_map_size((8, 8)) == stem + stage1 + bridge + dec
    with pytest.raises(ValueError, match="spatial size"):
        net.compute_conv_feature_map_size((1, 8, 8))


def test_matches_plainconvunet_interface():
    """Same plans kwargs build both networks, and both expose decoder.deep_supervision and initialize."""
    kw = net_kwargs(2, STRIDES_2D, deep_supervision=True)
    ours, theirs = XBoundNet(**kw), PlainConvUNet(**kw)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert [o.shape for o in ours.eval()(x)] == [o.shape for o in theirs.eval()(x)]
    assert callable(XBoundNet.initialize) and hasattr(ours.decoder, "deep_supervision")


def test_aspp_sums_branches():
    aspp = ASPP(nn.Conv2d, 2, 3, dilations=(1, 2))
    x = torch.randn(1, 2, 8, 8)
    expected = aspp.branches[0](x) + aspp.branches[1](x)
    assert torch.allclose(aspp(x), expected)  # no norm / nonlin given: identities


def test_bad_arguments():
    with pytest.raises(ValueError, match="strides must have n_stages=4"):
        XBoundNet(**net_kwargs(2, STRIDES_2D[:3], n_stages=4, features_per_stage=[8] * 4,
                               kernel_sizes=[[3, 3]] * 4))
    with pytest.raises(ValueError, match="n_stages >= 2"):
        XBoundNet(**net_kwargs(2, STRIDES_2D[:1]))
    with pytest.raises(ValueError, match="dropout_p"):
        XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_p=1.0))
