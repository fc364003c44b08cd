"""Layer-wise Seg-Grad-CAM: known answers, every block of XBoundNet++ / PlainConvUNet in 2D and 3D, one backward
pass per target, agreement with pytorch-grad-cam, sliding-window stitching, grid PNG, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from PIL import Image
from torch import nn
from torch.nn import functional as F

from nnunet_kaz.errors import KazError
from nnunet_kaz.explain import (
    LayerGradCAM,
    explain_case,
    list_blocks,
    save_gradcam_grid,
    save_maps_npz,
    sliding_window_gradcam,
)
from nnunet_kaz.networks import XBoundNet


class Toy(nn.Module):
    """conv1: 2x2 stride-2 mean (channel 0) and minus mean (channel 1); nearest upsampling; 1x1 head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 2, stride=2, bias=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.conv1.weight[0] = 0.25
            self.conv1.weight[1] = -0.25
            self.head.weight[:, :, 0, 0] = torch.tensor([[0.0, 1.0], [2.0, 1.0]])

    def forward(self, x):
        return self.head(self.up(self.conv1(x)))


def test_known_answer_on_hand_set_convolutions():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8) + 0.1
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :3] = True  # 24 voxels
    (maps1, maps0), _ = LayerGradCAM(Toy(), ["conv1", "head"])(x, [(1, mask), (0, mask)])
    m = x[0, 0].reshape(4, 2, 4, 2).mean(dim=(1, 3))  # the 2x2 means, > 0
    # class 1 logit = 2 * A0 + A1 = m (upsampled); d/dA_k sums the mask over each 2x2 block, mean over 16 positions
    low = 24 / 16 * (2 * m - m)
    expected = F.interpolate(low[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(maps1["conv1"][0], expected, atol=1e-6)
    # at the logits: weights (0, 24/64), map = 24/64 * logit_1
    assert torch.allclose(maps1["head"][0], 24 / 64 * m.repeat_interleave(2, 0).repeat_interleave(2, 1), atol=1e-6)
    # class 0 logit = A1 = -m: the ReLU removes everything
    assert torch.count_nonzero(maps0["conv1"]) == 0 and torch.count_nonzero(maps0["head"]) == 0


def small_net(cls, dim: int, ds: bool = False):
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    strides = [[1] * dim, [2] * dim, [2] * dim]
    torch.manual_seed(0)
    return cls(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv, kernel_sizes=3,
               strides=strides, num_classes=2, n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
               norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
               deep_supervision=ds).eval()


@pytest.mark.parametrize("cls", [XBoundNet, PlainConvUNet])
@pytest.mark.parametrize("dim,shape,patch", [(2, (24, 20), None), (3, (10, 20, 12), (8, 16, 8))])
def test_every_block_nonnegative_right_shape(cls, dim, shape, patch):
    net = small_net(cls, dim, ds=True)
    image = torch.randn(1, *shape)
    maps = explain_case(net, image, "all", target_class=1, patch_size=patch)
    assert list(maps) == list_blocks(net) and len(maps) == (9 if cls is XBoundNet else 6)
    for name, m in maps.items():
        assert m.shape == shape and m.dtype == np.float32, name
        assert np.all(np.isfinite(m)) and m.min() >= 0, name
    assert sum(float(m.max()) > 0 for m in maps.values()) >= len(maps) // 2
    assert net.decoder.deep_supervision and not net.training  # restored


def test_one_forward_and_one_backward_per_target(monkeypatch):
    net = small_net(XBoundNet, 2)
    calls = {"grad": 0, "forward": 0}
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    net.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    results, _ = LayerGradCAM(net, "all")(torch.randn(1, 1, 16, 16), [(1, None), (0, None)])
    assert calls == {"grad": 2, "forward": 1}
    assert len(results) == 2 and len(results[0]) == len(list_blocks(net))


@pytest.mark.parametrize("cls", [XBoundNet, PlainConvUNet])
def test_matches_pytorch_grad_cam_per_layer(cls):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    net = small_net(cls, 2)
    torch.manual_seed(4)
    x = torch.randn(1, 1, 32, 40)
    mask = (net(x).argmax(1)[0] == 1).numpy().astype(np.float32)
    assert 0 < mask.sum() < mask.size
    maps = explain_case(net, x[0], "all", target_mask=mask)
    full_res = ["encoder.stages.0", f"decoder.stages.{len(net.decoder.stages) - 1}"]
    for name in full_res:  # at the input size pytorch-grad-cam does not resize: only its min-max scaling applies
        with GradCAM(net, [net.get_submodule(name)]) as gc:
            ref = gc(x, [SemanticSegmentationTarget(1, mask)])[0]
        assert ref.shape == maps[name].shape == (32, 40)
        ours = scale_cam_image(maps[name][None])[0]  # pytorch-grad-cam's own normalisation
        assert np.abs(ours - ref).max() < 1e-4, name
        assert ref.max() > 0.99 and np.count_nonzero(ref) > 10, name  # a real map, not two zero arrays


def test_sliding_window_single_tile_equals_direct_pass():
    net = small_net(XBoundNet, 2)
    image = torch.randn(1, 1, 16, 16)
    direct = explain_case(net, image[0], "all")
    tiled = sliding_window_gradcam(net, image, list_blocks(net), [(1, None)], patch_size=(16, 16))[0]
    for name in direct:
        np.testing.assert_allclose(tiled[name], direct[name], rtol=1e-5, atol=1e-6)


def test_sliding_window_pads_small_images_and_honours_masks():
    net = small_net(XBoundNet, 2)
    image = torch.randn(1, 1, 12, 40)  # smaller than the patch along x, three tiles along y
    mask = np.zeros((12, 40), dtype=bool)
    tiled = sliding_window_gradcam(net, image, ["encoder.stages.0"], [(1, mask)], patch_size=(16, 16))[0]
    assert tiled["encoder.stages.0"].shape == (12, 40)
    assert not tiled["encoder.stages.0"].any()  # empty target mask: zero maps


def test_grid_png_and_npz(tmp_path):
    net = small_net(XBoundNet, 3)
    image = torch.randn(1, 8, 16, 16)
    mask = np.zeros((8, 16, 16), dtype=bool)
    mask[5, 4:10, 4:10] = True
    maps = explain_case(net, image, ["encoder.stages.0", "bridge"], target_mask=mask)
    png = tmp_path / "grid.png"
    save_gradcam_grid(image.numpy(), maps, png, mask=mask, title="case")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 3 * 100  # three panels side by side at 3 inches, 100 dpi
    save_maps_npz(maps, tmp_path / "maps.npz")
    with np.load(tmp_path / "maps.npz") as z:
        assert set(z.files) == set(maps) and np.array_equal(z["bridge"], maps["bridge"])
    assert not list(tmp_path.glob(".*part*"))


def test_bad_layer_name_lists_the_valid_ones():
    net = small_net(PlainConvUNet, 2)
    with pytest.raises(KazError) as e:
        explain_case(net, torch.randn(1, 16, 16), ["encoder.stages.9", "decoder.stages.0"])
    msg = str(e.value)
    assert "encoder.stages.9" in msg and "decoder.seg_layers.1" in msg and "decoder.stages.0," in msg


def test_3d_network_given_2d_image():
    with pytest.raises(KazError, match="3D"):
        explain_case(small_net(XBoundNet, 3), torch.randn(1, 16, 16))
    with pytest.raises(KazError, match="out of range"):
        explain_case(small_net(XBoundNet, 2), torch.randn(1, 16, 16), target_class=5)
    with pytest.raises(KazError, match="does not match"):
        explain_case(small_net(XBoundNet, 2), torch.randn(1, 16, 16), target_mask=np.ones((8, 8)))
