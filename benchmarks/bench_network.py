"""XBoundNet++ vs nnU-Net's PlainConvUNet: parameters and training-step time from the same plans kwargs."""
from __future__ import annotations

import statistics
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn
from torch.nn import functional as F

from nnunet_kaz.networks import XBoundNet

CASES = {
    # name: (dim, features, strides, patch, batch)
    "2D": (2, [32, 64, 128, 256, 256], [[1, 1]] + [[2, 2]] * 4, (128, 128), 2),
    "3D": (3, [32, 64, 128, 256], [[1, 1, 1]] + [[2, 2, 2]] * 3, (64, 64, 64), 1),
}
N_WARMUP, N_TIMED = 1, 5


def plans_kwargs(dim: int, features: list[int], strides: list[list[int]]) -> dict:
    """The arch kwargs nnU-Net's default planner writes (classes instead of strings), deep supervision on."""
    n = len(features)
    return dict(input_channels=1, n_stages=n, features_per_stage=features,
                conv_op=nn.Conv2d if dim == 2 else nn.Conv3d, kernel_sizes=[[3] * dim] * n, strides=strides,
                num_classes=2, n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
                norm_op=nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Wall time of forward + deep-supervised CE (weights 1, 1/2, ... as nnU-Net) + backward + SGD step."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    outs = net(x)
    loss = sum(F.cross_entropy(o, F.interpolate(y[:, None].float(), o.shape[2:], mode="nearest")[:, 0].long())
               / 2 ** k for k, o in enumerate(outs))
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def median_step_seconds(nets: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Median step time per network; steps of the networks alternate so that load changes on a shared machine
    hit both alike."""
    opts = {k: torch.optim.SGD(n.parameters(), lr=1e-2, momentum=0.99, nesterov=True) for k, n in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for i in range(N_WARMUP + N_TIMED):
        for k, net in nets.items():
            t = train_step(net.train(), opts[k], x, y)
            if i >= N_WARMUP:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def run() -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: stable figures on a shared machine (both networks alike)
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def xboundnet_defaults(net: XBoundNet) -> str:
    """XBoundNet++'s defaults as this version defines them (signature and the built network), for the report."""
    import inspect

    d = {k: v.default for k, v in inspect.signature(XBoundNet.__init__).parameters.items()
         if v.default is not inspect.Parameter.empty}
    at = net.dropout_at
    where = [f"encoder stages {at['encoder']}"] + (["the bridge"] if at["bridge"] else []) + (
        [f"decoder levels {at['decoder']} (0 = deepest)"] if at["decoder"] else [])
    return (f"ASPP dilations {'/'.join(map(str, d['aspp_dilations']))}, SE reduction {d['se_reduction']}, dropout "
            f"{d['dropout_p']} placed '{d['dropout_placement']}': after {', '.join(where)}")


def _run() -> str:
    torch.manual_seed(0)
    rows, defaults = [], None
    for name, (dim, features, strides, patch, batch) in CASES.items():
        kw = plans_kwargs(dim, features, strides)
        x = torch.randn(batch, 1, *patch)
        y = torch.randint(0, 2, (batch, *patch))
        nets = {cls.__name__: cls(**kw) for cls in (PlainConvUNet, XBoundNet)}
        defaults = defaults or xboundnet_defaults(nets["XBoundNet"])  # the 2D case (stage counts differ in 3D)
        seconds = median_step_seconds(nets, x, y)
        (p0, p1), (t0, t1) = [sum(p.numel() for p in n.parameters()) for n in nets.values()], seconds.values()
        f0, f1 = [int(n.compute_conv_feature_map_size(patch)) for n in nets.values()]
        rows.append(f"| {name} | {batch} x {'x'.join(map(str, patch))} | {features} | {p0 / 1e6:.2f} M | "
                    f"{p1 / 1e6:.2f} M | **{p1 / p0:.2f}** | {t0:.3f} s | {t1:.3f} s | **{t1 / t0:.2f}** | "
                    f"**{f1 / f0:.2f}** |")
    return "\n".join([
        "## XBoundNet++ vs PlainConvUNet (bench_network)",
        "",
        "Same nnU-Net plans kwargs (instance norm, LeakyReLU, stride-2 stages, deep supervision on) for both; "
        f"XBoundNet++ with its defaults ({defaults}, in the 2D case). Training step = forward + deep-supervised CE + backward + SGD, median of {N_TIMED} "
        "after a warm-up, the two networks' steps alternating, CPU float32, one thread. Feature-map ratio = "
        "`compute_conv_feature_map_size` (what nnU-Net's planner uses to fit patch and batch size to VRAM).",
        "",
        "| case | batch x patch | features | PlainConvUNet params | XBoundNet++ params | params ratio | "
        "PlainConvUNet step | XBoundNet++ step | step ratio | feature-map ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])


if __name__ == "__main__":
    print(run())
