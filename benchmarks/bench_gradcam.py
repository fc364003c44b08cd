"""All-layer Seg-Grad-CAM in one forward + one backward vs pytorch-grad-cam's one call per layer."""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_kaz.explain import explain_case, list_blocks
from nnunet_kaz.networks import XBoundNet

SIZE = (256, 256)  # one KAZ slice (paper 000 resizes every slice to 256 x 256)
FEATURES = [32, 64, 128, 256, 256]
REPEATS = 3


def network(cls) -> nn.Module:
    n = len(FEATURES)
    torch.manual_seed(0)
    return cls(input_channels=1, n_stages=n, features_per_stage=FEATURES, conv_op=nn.Conv2d,
               kernel_sizes=[[3, 3]] * n, strides=[[1, 1]] + [[2, 2]] * (n - 1), num_classes=2,
               n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
               norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
               nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()


def ours_once(net: nn.Module, x: torch.Tensor, mask: np.ndarray) -> tuple[float, dict]:
    t0 = time.perf_counter()
    maps = explain_case(net, x[0], "all", target_mask=mask, target_class=1)
    return time.perf_counter() - t0, maps


def pytorch_grad_cam_once(net: nn.Module, x: torch.Tensor, mask: np.ndarray) -> tuple[float, dict]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    maps = {}
    t0 = time.perf_counter()
    for name in list_blocks(net):
        with GradCAM(net, [net.get_submodule(name)]) as cam:
            maps[name] = cam(x, [SemanticSegmentationTarget(1, mask)])[0]
    return time.perf_counter() - t0, maps


def compare(net: nn.Module) -> str:
    torch.manual_seed(1)
    x = torch.randn(1, 1, *SIZE)
    with torch.no_grad():
        mask = (net(x).argmax(1)[0] == 1).numpy().astype(np.float32)
    ours_t, ref_t = [], []
    for _ in range(REPEATS):  # alternate the two routes so that load changes hit both alike
        t, ours = ours_once(net, x, mask)
        ours_t.append(t)
        t, ref = pytorch_grad_cam_once(net, x, mask)
        ref_t.append(t)
    # pytorch-grad-cam min-max scales each map with its own scale_cam_image (and resizes with OpenCV): ours
    # (already at the input size) go through the same function
    from pytorch_grad_cam.utils.image import scale_cam_image

    diff = max(float(np.abs(scale_cam_image(m[None])[0] - ref[k]).max()) for k, m in ours.items())
    t0, t1 = statistics.median(ref_t), statistics.median(ours_t)
    return f"| {type(net).__name__} | {len(ours)} | {t0:.2f} s | {t1:.2f} s | **{t0 / t1:.1f}x** | {diff:.3f} |"


def run() -> str:
    from importlib.metadata import version

    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: stable figures on a shared machine (both routes alike)
    try:
        for cls in (XBoundNet, PlainConvUNet):
            rows.append(compare(network(cls)))
    finally:
        torch.set_num_threads(threads)
    return "\n".join([
        "## Layer-wise Grad-CAM: one backward pass for all blocks vs pytorch-grad-cam per layer (bench_gradcam)",
        "",
        f"One 2D case of {SIZE[0]}x{SIZE[1]}, features {FEATURES}, target = class-1 logits summed over the predicted "
        f"class-1 region, every block of `list_blocks`. Ours: `explain_case(..., 'all')` (one forward, one "
        f"backward). pytorch-grad-cam {version('grad-cam')} (`GradCAM` + `SemanticSegmentationTarget`): one call "
        f"per layer, which is how it yields separate per-layer maps. Median of {REPEATS} alternating runs each, CPU float32, one "
        f"thread. Max difference = largest absolute difference between the two maps over all blocks, ours scaled "
        f"with pytorch-grad-cam's own `scale_cam_image` (same definition; pytorch-grad-cam scales the coarse "
        f"layers before resizing them with OpenCV, ours are resized with torch first).",
        "",
        "| network | blocks | pytorch-grad-cam, per layer | ours, all layers | speed-up | max difference |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ])


if __name__ == "__main__":
    print(run())
