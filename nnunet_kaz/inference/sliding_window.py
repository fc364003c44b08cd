"""Sliding-window inference that returns B stochastic samples at once, following nnU-Net's
(`nnUNetPredictor._internal_predict_sliding_window_return_logits`): the same tiles, the same Gaussian
weighting (sigma 1/8 of the tile, scaled to 10), the same mirroring (logits averaged over all flips), and the
same float16 accumulation, so one deterministic sample equals `nnUNetv2_predict`'s logits.

Written by hand because nnU-Net's loop predicts one sample per pass: here each tile is read once, the part of
the network in front of the first dropout runs once (`forward_prefix`, when the network offers it, as
XBoundNet++ does) and only the rest runs on a batch of B samples (`forward_suffix`).
"""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Sequence

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_map


def dropout_modules(network: nn.Module) -> list[nn.Module]:
    return [m for m in network.modules() if isinstance(m, _DropoutNd) and m.p > 0]


def set_mc_dropout(network: nn.Module, active: bool) -> None:
    """Eval mode everywhere (normalisation uses its running statistics); dropout modules in train mode if
    `active`, so each forward pass draws new masks (MC dropout, Gal & Ghahramani)."""
    network.eval()
    for m in dropout_modules(network):
        m.train(active)


def tile_slicers(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple]:
    """nnU-Net's own tiling (shared code, so tiles match `nnUNetv2_predict` exactly)."""
    shim = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch_size)),
                           tile_step_size=step, verbose=False)
    return nnUNetPredictor._internal_get_sliding_window_slicers(shim, tuple(image_size))


def _mirror_combinations(mirror_axes: Sequence[int] | None, ndim: int) -> list[tuple[int, ...]]:
    if not mirror_axes:
        return [()]
    axes = [a + 2 for a in mirror_axes]
    assert max(axes) < ndim, "mirror axes do not match the image dimension"
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


@torch.inference_mode()
def predict_tile_samples(network: nn.Module, tile: torch.Tensor, n_samples: int,
                         mirror_axes: Sequence[int] | None) -> torch.Tensor:
    """Logits of `n_samples` forward passes on one tile (1, C_in, *patch): (B, C, *patch), each sample averaged
    over the mirror flips as nnU-Net does."""
    split = hasattr(network, "forward_prefix") and hasattr(network, "forward_suffix")
    combos = _mirror_combinations(mirror_axes, tile.ndim)
    total = None
    for axes in combos:
        x = torch.flip(tile, axes) if axes else tile
        if split:
            cache = network.forward_prefix(x)
            out = network.forward_suffix(tree_map(lambda t: t.repeat(n_samples, *[1] * (t.ndim - 1))
                                                  if isinstance(t, torch.Tensor) else t, cache))
        else:
            out = network(x.repeat(n_samples, *[1] * (x.ndim - 1)))
        if isinstance(out, (list, tuple)):  # deep supervision left on: keep the full-resolution output
            out = out[0]
        out = torch.flip(out, axes) if axes else out
        total = out if total is None else total + out
    return total / len(combos) if len(combos) > 1 else total


@torch.inference_mode()
def predict_samples(network: nn.Module, data: torch.Tensor, patch_size: Sequence[int], n_outputs: int,
                    n_samples: int, tile_step_size: float = 0.5, mirror_axes: Sequence[int] | None = None,
                    device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Sliding-window logits of `n_samples` samples for a preprocessed image (C_in, *spatial): (B, C, *spatial).

    Accumulation is float16 on the results device, exactly as nnU-Net, which is what makes a single
    deterministic sample reproduce `nnUNetv2_predict`.
    """
    data, revert = pad_nd_image(data, list(patch_size), "constant", {"value": 0}, True, None)
    slicers = tile_slicers(data.shape[1:], patch_size, tile_step_size)
    logits = torch.zeros((n_samples, n_outputs, *data.shape[1:]), dtype=torch.half, device=device)
    weights = torch.zeros(data.shape[1:], dtype=torch.half, device=device)
    gaussian = compute_gaussian(tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10, device=device)
    autocast = torch.autocast(device.type) if device.type == "cuda" else nullcontext()
    with autocast:
        for sl in slicers:
            tile = data[sl][None].to(device)
            out = predict_tile_samples(network, tile, n_samples, mirror_axes)
            out *= gaussian
            logits[(slice(None), *sl)] += out
            weights[sl[1:]] += gaussian
    torch.div(logits, weights, out=logits)
    if torch.isinf(logits).any():
        raise RuntimeError("inf in the accumulated logits (float16 overflow); nnU-Net has the same limit")
    return logits[(slice(None), slice(None), *revert[1:])]

