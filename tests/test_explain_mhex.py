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


def numpy_two_convolutions(w1: np.ndarray, w2: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Conv2(Conv1(A)) of two 1x1 convolutions without the ReLU, pixel by pixel in float64: at every pixel the
    C-vector A[:, pixel] goes through W1 (C x C) and then W2 (K x C). a: (C, *spatial) -> (K, *spatial)."""
    c = a.shape[0]
    flat = a.reshape(c, -1).astype(np.float64)
    out = np.empty((w2.shape[0], flat.shape[1]))
    for i in range(flat.shape[1]):
        out[:, i] = w2 @ (w1 @ flat[:, i])
    return out.reshape(w2.shape[0], *a.shape[1:])


@pytest.mark.parametrize("cls", [XBoundNet, PlainConvUNet])
@pytest.mark.parametrize("dim,shape", [(2, (16, 24)), (3, (8, 16, 24))])
def test_stage_cams_equal_an_explicit_two_convolution_run_on_random_weights(cls, dim, shape):
    """Independent of MHEXHead.cam / equivalent_kernel / stage_inputs: the decoder stages' outputs are captured by
    our own hook (run before the heads' hook, so it sees X_j before the feed-back), the heads' weights are
    redrawn at random, and each CAM is the pixel-wise W2 (W1 x) in numpy, upsampled with torch's interpolate."""
    model = MHEXPlus(unet(cls, dim)).eval()
    torch.manual_seed(1)
    for p in model.heads.parameters():
        nn.init.normal_(p)
    captured = {}
    for j, stage in enumerate(model.decoder.stages):
        stage.register_forward_hook(lambda m, i, o, j=j: captured.__setitem__(j, o.detach().clone()), prepend=True)
    x = torch.randn(1, 1, *shape)
    cams = mhex_cams(model, x)
    assert len(cams) == len(model.heads) == len(captured)
    mode = "bilinear" if dim == 2 else "trilinear"
    for j, (head, cam) in enumerate(zip(model.heads, cams)):
        w1 = head.conv1.weight.detach().double().flatten(1).numpy()
        w2 = head.conv2.weight.detach().double().flatten(1).numpy()
        low = numpy_two_convolutions(w1, w2, captured[j][0].double().numpy())
        ref = nn.functional.interpolate(torch.from_numpy(low)[None], size=shape, mode=mode, align_corners=False)[0]
        assert cam.shape == (2, *shape)
        scale = np.abs(ref.numpy()).max()
        np.testing.assert_allclose(cam, ref.numpy(), atol=1e-5 * scale, err_msg=f"stage {j}")
    # the ReLU between the convolutions is left out of the CAM (paper 003 section 3.3): with it the map differs
    head, a = model.heads[-1], captured[len(model.heads) - 1][0].double().numpy()
    w1, w2 = (head.conv1.weight.detach().double().flatten(1).numpy(),
              head.conv2.weight.detach().double().flatten(1).numpy())
    with_relu = np.einsum("kc,c...->k...", w2, np.maximum(np.einsum("dc,c...->d...", w1, a), 0))
    assert np.abs(with_relu - cams[-1]).max() > 1e-2 * np.abs(with_relu).max()


def finite_difference_gradient(model: MHEXPlus, x: torch.Tensor, target: torch.Tensor, stage: int, head: int,
                               h: float = 1e-6) -> torch.Tensor:
    """d (sum over pixels of head `head`'s cross-entropy) / d X_stage by central differences in float64: X_stage,
    the output of decoder stage `stage`, is perturbed one entry at a time by a hook placed before the heads'."""
    delta = {}

    def perturb(module, inputs, output):
        if "at" in delta:
            output = output.clone()
            output.view(-1)[delta["at"]] += delta["by"]
            return output
        return None

    handle = model.decoder.stages[stage].register_forward_hook(perturb, prepend=True)

    def loss() -> float:
        with torch.no_grad():
            p = model(x)[::-1][head]
        t = nn.functional.interpolate(target[:, None].double(), size=p.shape[2:], mode="nearest")[:, 0].long()
        return float(nn.functional.cross_entropy(p, t, reduction="sum"))

    try:
        with torch.no_grad():
            model(x)
        n = model.stage_inputs[stage].numel()
        shape = model.stage_inputs[stage].shape
        grad = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            delta.update(at=i, by=h)
            up = loss()
            delta.update(by=-h)
            grad[i] = (up - loss()) / (2 * h)
    finally:
        handle.remove()
    return grad.reshape(shape)


def test_collaboration_gradient_equals_finite_differences():
    """Paper 003 section 3.5's per-pixel cosine of adjacent heads' gradients, with the gradients taken by central
    finite differences on the stage features (no autograd) in float64, on random head weights and a random
    target, for both adjacent pairs of a 4-stage XBoundNet++ on a non-square input."""
    torch.manual_seed(3)
    net = unet(XBoundNet, 2)
    model = MHEXPlus(net).double().eval()
    for p in model.heads.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    target = torch.randint(0, 2, (1, 16, 8))
    res = collaboration_uncertainty(model, x, target=target, eps=1e-30)
    assert len(res["pairs"]) == 2
    for pair in range(2):
        g_low = finite_difference_gradient(model, x, target, stage=pair, head=pair)
        g_high = finite_difference_gradient(model, x, target, stage=pair, head=pair + 1)
        assert g_high.abs().max() > 0  # the deeper stage's features reach the next head through the decoder
        cos = (g_low * g_high).sum(1) / (g_low.norm(dim=1) * g_high.norm(dim=1))
        ref = nn.functional.interpolate(cos[:, None], size=(16, 8), mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(res["pairs"][pair], ref.numpy(), atol=1e-4, err_msg=f"pair {pair}")
    np.testing.assert_allclose(res["U"], res["pairs"][0] + res["pairs"][1], atol=1e-6)


def test_feed_back_changes_the_decoder_path():
    import copy

    torch.manual_seed(0)
    net = unet(XBoundNet, 2).eval()
    x = torch.randn(1, 1, 16, 16)
    fed = MHEXPlus(copy.deepcopy(net), feed_back=True).eval()
    plain = MHEXPlus(copy.deepcopy(net), feed_back=False).eval()
    plain.heads.load_state_dict(fed.heads.state_dict())
    with torch.no_grad():
        a, b = fed(x), plain(x)  # deep predictions, highest resolution first
    assert torch.allclose(a[-1], b[-1])  # the deepest head's input is the same: nothing was fed back before it
    assert not torch.allclose(a[0], b[0])  # X_j + Y_att_j flows on through the decoder to the full resolution
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
