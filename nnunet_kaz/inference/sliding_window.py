"""Sliding-window inference that returns B stochastic samples at once, following nnU-Net's
(`nnUNetPredictor._internal_predict_sliding_window_return_logits`): the same tiles, the same Gaussian
weighting (sigma 1/8 of the tile, scaled to 10), the same mirroring (logits averaged over all flips), and the
same float16 accumulation (all of it `nnunet_kaz.inference.tiling`), so one deterministic sample equals
`nnUNetv2_predict`'s logits.

Written by hand because nnU-Net's loop predicts one sample per pass: here each tile is read once, the part of
the network in front of the first dropout runs once (`forward_prefix`, when the network offers it, as
XBoundNet++ does) and only the rest runs on a batch of B samples (`forward_suffix`).
"""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from nnunet_kaz.inference.tiling import network_placement, stitch_tiles


def dropout_modules(network: nn.Module) -> list[nn.Module]:
    return [m for m in network.modules() if isinstance(m, _DropoutNd) and m.p > 0]


def set_mc_dropout(network: nn.Module, active: bool) -> None:
    """Eval mode everywhere (normalisation uses its running statistics); dropout modules in train mode if
    `active`, so each forward pass draws new masks (MC dropout, Gal & Ghahramani)."""
    network.eval()
    for m in dropout_modules(network):
        m.train(active)


def repeat_batch(obj, n: int):
    """Every tensor in a (nested) tuple / named tuple / list / dict repeated `n` times along its batch axis."""
    if isinstance(obj, torch.Tensor):
        return obj.repeat(n, *[1] * (obj.ndim - 1))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple such as XBoundNet's PrefixCache
        return type(obj)(*(repeat_batch(v, n) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(repeat_batch(v, n) for v in obj)
    if isinstance(obj, dict):
        return {k: repeat_batch(v, n) for k, v in obj.items()}
    return obj


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
            out = network.forward_suffix(repeat_batch(cache, n_samples))
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
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Sliding-window logits of `n_samples` samples for a preprocessed image (C_in, *spatial): (B, C, *spatial),
    on `device` (default: the network's).

    Tiling, padding, Gaussian and float16 accumulation on the results device are nnU-Net's (`stitch_tiles`),
    which is what makes a single deterministic sample reproduce `nnUNetv2_predict`.
    """
    device = torch.device(device) if device is not None else network_placement(network)[0]
    autocast = torch.autocast(device.type) if device.type == "cuda" else nullcontext()

    def tile_logits(tile: torch.Tensor) -> torch.Tensor:
        with autocast:
            out = predict_tile_samples(network, tile, n_samples, mirror_axes)
        if out.shape[1] != n_outputs:
            raise RuntimeError(f"the network gives {out.shape[1]} outputs, {n_outputs} expected")
        return out

    logits = stitch_tiles(tile_logits, data, patch_size, tile_step_size, network, device, torch.half)
    if torch.isinf(logits).any():
        raise RuntimeError("inf in the accumulated logits (float16 overflow); nnU-Net has the same limit")
    return logits
