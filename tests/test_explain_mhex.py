"""MHEX+ heads (paper 003): equivalent-kernel CAM, attachment to XBoundNet++ / PlainConvUNet, collaboration
gradients, deep-ensemble maps and the agreement metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_kaz.errors import KazError
from nnunet_kaz.explain import (
    collaboration_uncertainty,
    ensemble_entropy,
    ensemble_variance,
    mhex_cams,
    uncertainty_agreement,
)
from nnunet_kaz.networks import MHEXHead, MHEXPlus, XBoundNet


@pytest.mark.parametrize("conv,shape", [(nn.Conv2d, (2, 6, 9, 7)), (nn.Conv3d, (1, 6, 4, 5, 3))])
def test_equivalent_kernel_cam_equals_the_two_convolutions(conv, shape):
    torch.manual_seed(0)
    head = MHEXHead(conv, 6, 3)
    for p in head.parameters():
        nn.init.normal_(p)
    a = torch.randn(shape)
    explicit = head.conv2(head.conv1(a))  # the two 1x1 convolutions run one after the other
    assert torch.allclose(head.cam(a), explicit, atol=1e-5)
    w1, w2 = head.conv1.weight.flatten(1), head.conv2.weight.flatten(1)
    by_sum = torch.stack([sum(w2[c, j] * w1[j] for j in range(6)) for c in range(3)])
    assert torch.allclose(head.equivalent_kernel(), by_sum, atol=1e-6)
    assert all(m.bias is None for m in (head.conv1, head.conv2))
    pred, att = head(a)
    y = torch.relu(head.conv1(a))
    assert torch.allclose(pred, head.conv2(y)) and torch.allclose(att, torch.sigmoid(y) * y)


def unet(cls, dim: int):
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    torch.manual_seed(0)
    return cls(input_channels=1, n_stages=4, features_per_stage=[4, 8, 16, 16], conv_op=conv, kernel_sizes=3,
               strides=[1, 2, 2, 2], num_classes=2, n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
               norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
               deep_supervision=True)


@pytest.mark.parametrize("cls", [XBoundNet, PlainConvUNet])
@pytest.mark.parametrize("dim", [2, 3])
def test_mhex_plus_keeps_the_output_contract(cls, dim):
    model = MHEXPlus(unet(cls, dim))
    x = torch.randn(2, 1, *([16] * dim))
    outs = model(x)
    assert [o.shape[2:] for o in outs] == [(16,) * dim, (8,) * dim, (4,) * dim] and outs[0].shape[:2] == (2, 2)
    (sum(o.sum() for o in outs)).backward()
    for name, p in model.heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.decoder.deep_supervision = False  # nnU-Net's switch reaches the wrapped decoder
    model.eval()
    with torch.no_grad():
        single = model(x)
    assert single.shape == (2, 2, *([16] * dim))
    assert model.compute_conv_feature_map_size([16] * dim) > model.network.compute_conv_feature_map_size([16] * dim)
    cams = mhex_cams(model, x[:1])
    assert len(cams) == 3 and all(c.shape == (2, *([16] * dim)) for c in cams)
    # the full-resolution stage's CAM is the prediction without the ReLU between the convolutions
    head, a = model.heads[-1], model.stage_inputs[-1]
    assert np.allclose(cams[-1], head.conv2(head.conv1(a))[0].detach().numpy(), atol=1e-5)


def test_feed_back_changes_the_decoder_path():
    torch.manual_seed(0)
    net = unet(XBoundNet, 2).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        plain = net(x)[0]
        fed = MHEXPlus(net, feed_back=True)
        net_out_with = fed.network(x)[0]
    assert not torch.allclose(plain, net_out_with)  # X_j + Y_att_j flows on through the decoder
    with pytest.raises(ValueError, match="decoder"):
        MHEXPlus(nn.Sequential(nn.Conv2d(1, 2, 1)))


def test_collaboration_uncertainty_shapes_range_and_definition():
    model = MHEXPlus(unet(XBoundNet, 2))
    x = torch.randn(1, 1, 16, 16)
    res = collaboration_uncertainty(model, x)
    assert len(res["pairs"]) == 2 and res["U"].shape == (16, 16)
    assert np.all(np.abs(res["U"]) <= 2 + 1e-5)
    np.testing.assert_allclose(res["U"], res["pairs"][0] + res["pairs"][1], atol=1e-6)
    assert model.training and model.decoder.deep_supervision  # restored
    # the deepest pair by hand: gradients of both heads' summed CE with respect to head 0's input
    model.eval()
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    res_t = collaboration_uncertainty(model, x, target=target)
    preds = model(x)[::-1]
    feat = model.stage_inputs[0]
    g0 = torch.autograd.grad(nn.functional.cross_entropy(preds[0], target[:, ::4, ::4], reduction="sum"), feat,
                             retain_graph=True)[0]
    g1 = torch.autograd.grad(nn.functional.cross_entropy(preds[1], target[:, ::2, ::2], reduction="sum"), feat)[0]
    cos = nn.functional.cosine_similarity(g0, g1, dim=1, eps=1e-30)
    up = nn.functional.interpolate(cos[:, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(res_t["pairs"][0], up.detach().numpy(), atol=1e-4)


def test_ensemble_maps_and_agreement():
    probs = np.array([[[0.2, 0.9]], [[0.4, 0.9]]])  # 2 members, 1 channel shown as class 0, 2 voxels
    members = np.concatenate([probs, 1 - probs], axis=1)  # (2, 2, 2): classes 0 and 1
    np.testing.assert_allclose(ensemble_variance(members, cls=0), [0.01, 0.0])
    mean0 = np.array([0.3, 0.9])
    np.testing.assert_allclose(ensemble_entropy(members),
                               -(mean0 * np.log(mean0) + (1 - mean0) * np.log(1 - mean0)))
    a = np.zeros((10, 10))
    a[2:6, 2:6] = 1.0
    b = np.zeros((10, 10))
    b[4:8, 2:6] = 1.0
    agree = uncertainty_agreement(a, b)
    assert agree["iou"] == pytest.approx(8 / 24) and agree["dice"] == pytest.approx(16 / 32)
    same = uncertainty_agreement(a, a)
    assert same["iou"] == same["dice"] == 1.0 and same["pearson"] == pytest.approx(1.0)
    assert np.isnan(uncertainty_agreement(a, np.ones_like(a))["pearson"])
    with pytest.raises(KazError, match="shape"):
        uncertainty_agreement(a, a[:5])
