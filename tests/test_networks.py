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
    # 128 channels: SE hidden layers of 8 ReLU units (after instance norm + ReLU the pooled SE input is nearly the
    # same vector for every sample, so with 4 units all can be dead at init with probability ~1/16)
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(dim, strides, features=(128, 128, 128, 128), conv_bias=False,
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
    # the authors' placement: encoder levels at 1/2 and 1/4, the bridge, decoder levels at 1/4 and 1/2
    assert len(dropouts) == 5 and all(m.p == 0.2 for m in dropouts)
    assert set(net.encoder.dropouts) == {"1", "2"} and isinstance(net.bridge.dropout, nn.Dropout)
    assert set(net.decoder.dropouts) == {"0", "1"}


def test_dropout_p_zero_removes_dropout_modules():
    net = XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_p=0.0)).train()
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # instance norm keeps train mode deterministic


def test_plans_dropout_op_is_used_with_its_kwargs():
    net = XBoundNet(**net_kwargs(3, STRIDES_3D, dropout_op=nn.Dropout3d, dropout_op_kwargs={"p": 0.3},
                                 dropout_placement={"encoder": [2], "bridge": True}))
    drops = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert len(drops) == 2 and all(type(m) is nn.Dropout3d and m.p == 0.3 for m in drops)
    assert net.dropout_stages == [2]


PLACEMENTS = ["authors", "deepest", {"bridge": True}, {"decoder": [1]}, {"decoder": [2]}, {"encoder": [0]},
              {"encoder": [3], "decoder": [0, 2]}, {}]


def _leaf_order(net: nn.Module, run) -> list:
    """Leaf modules in the order they finish during `run()` (forward hooks), for a fixed placement."""
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in net.modules()
             if not list(m.children())]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return order


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dropout_p", [0.2, 0.0])
def test_prefix_ends_at_the_first_dropout_and_suffix_completes_forward(placement, dropout_p):
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_placement=placement, dropout_p=dropout_p,
                                 deep_supervision=True)).train()
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        full_order = _leaf_order(net, lambda: net(x))
        cache_box = []
        prefix_order = _leaf_order(net, lambda: cache_box.append(net.forward_prefix(x)))
        cache = cache_box[0]
        drops = [i for i, m in enumerate(full_order) if isinstance(m, nn.Dropout)]
        # the prefix runs exactly the modules before the first dropout of a full forward pass (without dropout:
        # everything but the segmentation heads)
        heads = set(net.decoder.seg_layers)
        assert prefix_order == (full_order[:drops[0]] if drops else [m for m in full_order if m not in heads])
        # deterministic prefix, stochastic suffix (when there is dropout), cache reusable
        again = net.forward_prefix(x)
        assert all(torch.equal(a, b) for a, b in zip(cache.features, again.features))
        s1, s2 = net.forward_suffix(cache), net.forward_suffix(cache)
        assert any(not torch.allclose(a, b) for a, b in zip(s1, s2)) == bool(drops)
        torch.manual_seed(1)
        full = net(x)
        torch.manual_seed(1)
        split = net.forward_suffix(net.forward_prefix(x))
    assert len(full) == 3 and all(torch.equal(a, b) for a, b in zip(full, split))
    assert bool(drops) == (dropout_p > 0 and placement not in ({},))


@pytest.mark.parametrize("placement,expected", [
    ("authors", {"encoder.dropouts.1": (32, 32), "encoder.dropouts.2": (16, 16), "bridge.dropout": (8, 8),
                 "decoder.dropouts.0": (16, 16), "decoder.dropouts.1": (32, 32)}),
    ("deepest", {"encoder.dropouts.2": (16, 16), "encoder.dropouts.3": (8, 8), "bridge.dropout": (8, 8)}),
    ({"encoder": [0], "decoder": [2]}, {"encoder.dropouts.0": (64, 64), "decoder.dropouts.2": (64, 64)}),
])
def test_dropout_modules_sit_at_the_configured_stages(placement, expected):
    """Each dropout's input is exactly the output of the stage it is configured after, at that resolution."""
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_placement=placement)).train()
    assert net.dropout_module_names() == list(expected)
    drops = {n: m for n, m in net.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    assert set(drops) == set(expected)
    owners = {f"encoder.dropouts.{s}": f"encoder.stages.{s}" for s in range(4)}
    owners.update({f"decoder.dropouts.{j}": f"decoder.stages.{j}" for j in range(3)})
    owners["bridge.dropout"] = "bridge.act"
    seen_in, seen_out = {}, {}
    hooks = [m.register_forward_pre_hook(lambda mod, i, n=n: seen_in.__setitem__(n, i[0].clone()))
             for n, m in drops.items()]
    hooks += [net.get_submodule(owners[n]).register_forward_hook(
        lambda mod, i, o, n=n: seen_out.__setitem__(n, o.clone())) for n in drops]
    with torch.no_grad():
        net(torch.randn(1, 1, 64, 64))
    for h in hooks:
        h.remove()
    for name, size in expected.items():
        assert tuple(seen_in[name].shape[2:]) == size, name
        assert torch.equal(seen_in[name], seen_out[name]), name


@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p != {}])
def test_mc_samples_differ_at_full_resolution(placement):
    """As the predictor samples: eval mode, only the dropout modules in train mode."""
    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_placement=placement)).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert a.shape == (1, 3, 32, 32) and not torch.allclose(a, b)


def test_bad_dropout_placement():
    with pytest.raises(ValueError, match="dropout_placement must be one of"):
        XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_placement="everywhere"))
    with pytest.raises(ValueError, match=r"dropout_placement\['decoder'\] = \[3\] out of range 0..2"):
        XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_placement={"decoder": [3]}))


@pytest.mark.parametrize("dim,strides", [(2, STRIDES_2D), (3, STRIDES_3D)])
def test_dynamic_network_architectures_contract(dim, strides):
    from dynamic_network_architectures.architectures.abstract_arch import (
        AbstractDynamicNetworkArchitectures, test_submodules_loadable)

    net = XBoundNet(**net_kwargs(dim, strides, input_channels=5))
    assert isinstance(net, AbstractDynamicNetworkArchitectures)
    test_submodules_loadable(net)  # the library's own check: keys resolve, in-projection weights agree in shape
    # the in-projection keys are every weight that sees the input channels
    in_proj = {n for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == 5}
    assert in_proj == set(net.keys_to_in_proj)


def test_ignored_plans_keys_give_one_warning_naming_them():
    with pytest.warns(UserWarning) as record:
        XBoundNet(**net_kwargs(2, STRIDES_2D, n_blocks_per_stage=[1, 1, 1, 1]))
    msgs = [str(w.message) for w in record if "ignores the plans keys" in str(w.message)]
    assert len(msgs) == 1
    assert "n_conv_per_stage, n_conv_per_stage_decoder, n_blocks_per_stage" in msgs[0]
    import warnings

    kw = net_kwargs(2, STRIDES_2D)
    for key in ("n_conv_per_stage", "n_conv_per_stage_decoder"):
        kw.pop(key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        XBoundNet(**kw)  # nothing ignored, nothing said


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
    assert isinstance(net.encoder.stages[0].stem[0].norm, getattr(nn, f"InstanceNorm{dim}d"))
    outs = net(torch.randn(1, 2, *([16] * dim)))
    assert [o.shape[1] for o in outs] == [4, 4] and outs[0].shape[2:] == (16,) * dim
    # He init: weights with std sqrt(2 / ((1 + 0.01^2) fan_in)), zero bias
    w = net.encoder.stages[1].conv1.conv.weight
    expected = np.sqrt(2 / ((1 + 1e-4) * w[0].numel()))
    assert abs(w.std().item() - expected) / expected < 0.1
    assert torch.count_nonzero(net.encoder.stages[1].conv1.conv.bias) == 0
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
    stem = 2 * 4 * 64 + 4 * 4 * 64        # stem convs; first SE level: conv1, conv2, shortcut, SE product at 8x8
    stage1 = 4 * 8 * 16                    # conv1, conv2, shortcut, SE product at 4x4
    bridge = 4 * 8 * 16                    # four dilated branches
    gate = 2 * 4 * 64 + 64 + 4 * 64        # W_g, W_x (inner width = skip channels 4), psi, gated skip
    dec = 4 * 64 + gate + 4 * 4 * 64 + 2 * 64  # transpconv, gate, residual SE block, head
    assert net.compute_conv_feature_map_size((8, 8)) == stem + stage1 + bridge + dec
    with pytest.raises(ValueError, match="spatial size"):
        net.compute_conv_feature_map_size((1, 8, 8))


def test_matches_plainconvunet_interface():
    """Same plans kwargs build both networks with the same outputs; deep supervision switched off as nnU-Net's
    trainer does it (`decoder.deep_supervision = False`) gives one full-resolution tensor on both."""
    kw = net_kwargs(2, STRIDES_2D, deep_supervision=True)
    ours, theirs = XBoundNet(**kw).eval(), PlainConvUNet(**kw).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert [o.shape for o in ours(x)] == [o.shape for o in theirs(x)]
        for net in (ours, theirs):
            net.decoder.deep_supervision = False
        single = [net(x) for net in (ours, theirs)]
    assert all(isinstance(o, torch.Tensor) and o.shape == (1, 3, 32, 32) for o in single)


@pytest.mark.parametrize("dim,strides", [(2, STRIDES_2D), (3, STRIDES_3D)])
def test_initialize_is_nnunets_he_init_on_every_convolution(dim, strides):
    """`XBoundNet.initialize` (what nnU-Net's get_network_from_plans applies) against two references:
    - nnU-Net's own initializer, InitWeights_He(1e-2), applied to a copy from the same seed: the same weights;
    - He et al.'s formula on every convolution and transposed convolution: weights N(0, gain^2 / fan_in), gain^2 =
      2 / (1 + 0.01^2), fan_in = weight.shape[1] * kernel voxels (torch's fan-in convention, also for transposed
      convolutions), biases 0. Per module the sample std of w / sqrt(gain^2 / fan_in) over its n weights is 1 within
      6 standard errors (the std of a sample std of n normal values is 1 / sqrt(2 n)); torch's default init (std
      1 / sqrt(3 fan_in), 0.41 of He's, and non-zero biases) fails this for every module with 50 weights or more."""
    from copy import deepcopy

    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    torch.manual_seed(0)
    net = XBoundNet(**net_kwargs(dim, strides, deep_supervision=True))
    copy, before = deepcopy(net), deepcopy(net.state_dict())
    torch.manual_seed(1)
    net.apply(XBoundNet.initialize)
    torch.manual_seed(1)
    copy.apply(InitWeights_He(1e-2))
    after = net.state_dict()
    for key, value in copy.state_dict().items():
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it drew new weights
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert len(convs) > 20
    gain2 = 2 / (1 + 0.01 ** 2)
    for name, m in convs:
        w = m.weight.detach().double()
        fan_in = w.shape[1] * int(np.prod(w.shape[2:]))
        z = w / np.sqrt(gain2 / fan_in)
        assert abs(z.std().item() - 1) < 6 / np.sqrt(2 * w.numel()), (name, z.std().item())
        assert m.bias is None or torch.count_nonzero(m.bias) == 0, name


def test_aspp_sums_branches():
    aspp = ASPP(nn.Conv2d, 2, 3, dilations=(1, 2))
    x = torch.randn(1, 2, 8, 8)
    expected = aspp.branches[0](x) + aspp.branches[1](x)
    assert torch.allclose(aspp(x), expected)  # no norm / nonlin given: identities


def test_aspp_per_axis_dilations_match_a_hand_built_conv():
    aspp = ASPP(nn.Conv3d, 2, [1, 3, 3], dilations=(1, [1, 6, 6], [1, 3, 12]))
    assert [b.dilation for b in aspp.branches] == [(1, 1, 1), (1, 6, 6), (1, 3, 12)]
    assert aspp.branches[2].padding == (0, 3, 12)
    x = torch.randn(1, 2, 3, 14, 15)
    ref = nn.functional.conv3d(x, aspp.branches[2].weight, aspp.branches[2].bias, padding=(0, 3, 12),
                               dilation=(1, 3, 12))
    assert torch.allclose(aspp.branches[2](x), ref) and aspp(x).shape == x.shape


def test_residual_se_block_is_the_authors_form():
    """out = SE(act(norm(conv2(act(norm(conv1 x)))))) + 1x1 conv(x), no activation after the sum."""
    from nnunet_kaz.networks import ResidualBlock

    torch.manual_seed(0)
    block = ResidualBlock(nn.Conv2d, 3, 32, 3, 2, True, nn.BatchNorm2d, None, nn.ReLU, None, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    f = nn.functional
    h = f.relu(block.conv1.norm(f.conv2d(x, block.conv1.conv.weight, block.conv1.conv.bias, 2, 1)))
    h = f.relu(block.conv2.norm(f.conv2d(h, block.conv2.conv.weight, block.conv2.conv.bias, 1, 1)))
    s = h.mean(dim=(2, 3), keepdim=True)
    s = torch.sigmoid(block.se.fc2(f.relu(block.se.fc1(s))))
    ref = h * s + f.conv2d(x, block.shortcut.weight, block.shortcut.bias, 2)
    with torch.no_grad():
        out = block(x)
    assert torch.allclose(out, ref, atol=1e-6) and (out < 0).any()  # negative values: no ReLU after the sum


def test_bad_arguments():
    with pytest.raises(ValueError, match="strides must have n_stages=4"):
        XBoundNet(**net_kwargs(2, STRIDES_2D[:3], n_stages=4, features_per_stage=[8] * 4,
                               kernel_sizes=[[3, 3]] * 4))
    with pytest.raises(ValueError, match="n_stages >= 2"):
        XBoundNet(**net_kwargs(2, STRIDES_2D[:1]))
    with pytest.raises(ValueError, match="dropout_p"):
        XBoundNet(**net_kwargs(2, STRIDES_2D, dropout_p=1.0))
