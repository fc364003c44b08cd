"""Sliding-window inference that returns B stochastic samples at once, following nnU-Net's
(`nnUNetPredictor._internal_predict_sliding_window_return_logits`): the same tiles, the same Gaussian
weighting (sigma 1/8 of the tile, scaled to 10), the same mirroring (logits averaged over all flips), and the
same float16 accumulation (all of it `nnunet_kaz.inference.tiling`), so one deterministic sample equals
`nnUNetv2_predict`'s logits.

Written by hand because nnU-Net's loop predicts one sample per pass: here each tile is read once, the part of
the network in front of the first dropout runs once (`forward_prefix`, when the network offers it, as
XBoundNet++ does) and only the rest runs on a batch of B samples (`forward_suffix`).

Reproducible MC dropout whatever the batch: with `sample_keys` (one integer key per sample, the predictor's
(seed, case, model m, sample k)) every dropout module of the network draws the mask of batch item b from its own
generator, seeded by `derive_seed(*key_b, t)` on tile t (the tile's index in nnU-Net's tile order,
`tiling.sliding_window_slicers`) and used in the order the forward passes call the dropout modules (mirror flips
included). So sample k's masks on tile t depend on (seed, case, m, k, t) only, not on how many samples share its
batch: `--mc-batch 1` and `8` draw identical masks on the same device (`per_sample_dropout`), and their outputs
agree within the float rounding of batched convolutions (README, "Reproducible MC dropout").

Test-time augmentation as samples (`flip`, `predict --tta`): instead of averaging the logits of nnU-Net's mirror
flips inside one sample, `predict_samples(..., flip=axes)` returns the logits of ONE flip: every tile flipped
along `axes`, predicted and flipped back (its exact inverse), then stitched like any sample. `tta_flips` lists the
flips nnU-Net's mirroring would average (the identity first), so the flips can be streamed as samples of their own.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from nnunet_kaz.errors import KazError
from nnunet_kaz.inference.tiling import network_placement, stitch_tiles
from nnunet_kaz.trainers.seeding import derive_seed
from nnunet_kaz.uncertainty.measures import slabs


class LogitOverflowError(RuntimeError):
    """A stitched float16 logit overflowed (as nnU-Net's own check raises it): the same on any retry."""


def network_autocast(network_device: torch.device):
    """The precision rule of every forward pass (README, "On a GPU: placement, precision and memory"): autocast
    (float16 where safe) whenever the network runs on CUDA, as nnU-Net's predictor, wherever the results are
    stitched and accumulated; nothing on the CPU (nnU-Net disables autocast there too: CPU autocast means
    bfloat16)."""
    return torch.autocast("cuda") if torch.device(network_device).type == "cuda" else nullcontext()


def dropout_modules(network: nn.Module) -> list[nn.Module]:
    return [m for m in network.modules() if isinstance(m, _DropoutNd) and m.p > 0]


def set_mc_dropout(network: nn.Module, active: bool) -> None:
    """Eval mode everywhere (normalisation uses its running statistics); dropout modules in train mode if
    `active`, so each forward pass draws new masks (MC dropout, Gal & Ghahramani)."""
    network.eval()
    for m in dropout_modules(network):
        m.train(active)


_FEATURE_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
_ALPHA_DROPOUTS = (nn.AlphaDropout, nn.FeatureAlphaDropout)
_SELU_ALPHA = 1.7580993408473766  # -scale * alpha of SELU, as ATen's alpha dropout (native/Dropout.cpp)


def seeded_dropout(module: _DropoutNd, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """`module`'s dropout of a batch x (B, C, *spatial), item b's mask drawn from `generators[b]`.

    The arithmetic is torch's (ATen native/Dropout.cpp): Bernoulli(1 - p) noise per element (nn.Dropout,
    nn.AlphaDropout) or per channel (nn.Dropout1d/2d/3d, nn.FeatureAlphaDropout); x * noise / (1 - p), or for
    alpha dropout x * a * noise + b with a = 1 / sqrt((alpha^2 p + 1)(1 - p)), b = alpha a (noise - 1 + p)."""
    if not module.training or module.p == 0:
        return x
    if type(module) not in (nn.Dropout, nn.AlphaDropout, *_FEATURE_DROPOUTS):
        raise KazError(f"per-sample seeded MC dropout does not know {type(module).__name__}; use torch's "
                       "Dropout, Dropout1d/2d/3d, AlphaDropout or FeatureAlphaDropout")
    if x.shape[0] != len(generators):
        raise RuntimeError(f"a batch of {x.shape[0]} reached {type(module).__name__} with {len(generators)} "
                           "sample generators")
    p = float(module.p)
    if p == 1:
        return x.mul_(0) if module.inplace else x * 0
    per_item = (x.shape[1],) + (1,) * (x.ndim - 2) if isinstance(module, _FEATURE_DROPOUTS) else x.shape[1:]
    noise = torch.empty((x.shape[0], *per_item), device=x.device, dtype=x.dtype)
    for b, generator in enumerate(generators):
        noise[b].bernoulli_(1 - p, generator=generator)
    if isinstance(module, _ALPHA_DROPOUTS):
        a = 1.0 / math.sqrt((_SELU_ALPHA ** 2 * p + 1) * (1 - p))
        shift = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
        noise.mul_(a)
        return (x.mul_(noise) if module.inplace else x * noise).add_(shift)
    noise.div_(1 - p)
    return x.mul_(noise) if module.inplace else x * noise


class SampleStreams:
    """The per-sample mask generators of the batch being predicted: `for_tile(t)` seeds one generator per
    sample key, `derive_seed(*key, t)`, on `device`."""

    def __init__(self, keys: Sequence[Sequence[int]], device: torch.device):
        self.keys, self.device = [tuple(int(v) for v in k) for k in keys], torch.device(device)
        self.generators: list[torch.Generator] = []

    def for_tile(self, t: int) -> None:
        self.generators = [torch.Generator(device=self.device).manual_seed(derive_seed(*key, t))
                           for key in self.keys]


@contextmanager
def per_sample_dropout(network: nn.Module, streams: SampleStreams):
    """Within the block every dropout module of `network` (p > 0) draws item b's mask from
    `streams.generators[b]` (`seeded_dropout`) instead of torch's global generator; restored after."""
    modules = dropout_modules(network)
    saved = [m.__dict__.get("forward") for m in modules]
    for m in modules:
        m.forward = lambda x, _m=m: seeded_dropout(_m, x, streams.generators)
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            del m.forward
            if f is not None:
                m.forward = f


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


def tta_flips(mirror_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """The flips (spatial axes) nnU-Net's test-time mirroring averages, in its order: the identity, then every
    non-empty combination of `mirror_axes` (2D: 4 flips, 3D: 8)."""
    axes = list(mirror_axes or ())
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def _mirror_combinations(mirror_axes: Sequence[int] | None, ndim: int) -> list[tuple[int, ...]]:
    if not mirror_axes:
        return [()]
    assert max(mirror_axes) + 2 < ndim, "mirror axes do not match the image dimension"
    return [tuple(a + 2 for a in c) for c in tta_flips(mirror_axes)]


@torch.inference_mode()
def predict_tile_samples(network: nn.Module, tile: torch.Tensor, n_samples: int,
                         mirror_axes: Sequence[int] | None, flip: Sequence[int] | None = None) -> torch.Tensor:
    """Logits of `n_samples` forward passes on one tile (1, C_in, *patch): (B, C, *patch), each sample averaged
    over the mirror flips as nnU-Net does; with `flip` (spatial axes) only that flip, undone on the output."""
    split = hasattr(network, "forward_prefix") and hasattr(network, "forward_suffix")
    if flip is not None:
        if mirror_axes:
            raise ValueError("a single flip (flip) excludes averaging over the mirror flips (mirror_axes)")
        combos = [tuple(a + 2 for a in flip)]
    else:
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
                    device: torch.device | str | None = None,
                    sample_keys: Sequence[Sequence[int]] | None = None,
                    flip: Sequence[int] | None = None, stitch: bool = True,
                    emit: Callable[[slice, torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """Sliding-window logits of `n_samples` samples for a preprocessed image (C_in, *spatial): (B, C, *spatial),
    on `device` (default: the network's).

    Tiling, padding, Gaussian and float16 accumulation on the results device are nnU-Net's (`stitch_tiles`),
    which is what makes a single deterministic sample reproduce `nnUNetv2_predict`. `sample_keys` (one integer
    tuple per sample): sample b's dropout masks on tile t come from a generator seeded by (*key_b, t) on the
    network's device (module docstring), so they do not depend on `n_samples`; None: torch's global generator.
    `flip` (spatial axes, () the identity): the logits of that one test-time flip (module docstring).
    `stitch=False`: the same forward passes on the same tiles, their outputs dropped (None): the networks' share
    of a prediction, for the benchmarks. `emit`: the stitched logits are handed over slab by slab of the first
    spatial axis as they become final, `emit(slice, (B, C, rows, *rest) float16 view)`, and never held whole
    (`stitch_tiles`); None is returned.
    """
    network_device = network_placement(network)[0]
    device = torch.device(device) if device is not None else network_device
    # autocast follows the network's device, not the results device: a case whose accumulators went to CPU
    # memory (or the retry after an out-of-memory error) runs the network in the same precision (issue 23.1)
    autocast = network_autocast(network_device)
    if sample_keys is not None and len(sample_keys) != n_samples:
        raise ValueError(f"{len(sample_keys)} sample keys (sample_keys) for {n_samples} samples (n_samples)")
    streams = SampleStreams(sample_keys, network_device) if sample_keys is not None else None
    tiles = itertools.count()

    def tile_logits(tile: torch.Tensor) -> torch.Tensor:
        if streams is not None:
            streams.for_tile(next(tiles))
        with autocast:
            out = predict_tile_samples(network, tile, n_samples, mirror_axes, flip)
        if out.shape[1] != n_outputs:
            raise RuntimeError(f"the network gives {out.shape[1]} outputs, {n_outputs} expected")
        return out

    def checked(rows: slice, part: torch.Tensor) -> None:
        # slab by slab: torch.isinf of a float16 volume makes an abs copy and a bool map (6 bytes / voxel / class)
        if any(torch.isinf(part[:, :, sl]).any() for sl in slabs(part.shape[2:])):
            raise LogitOverflowError("inf in the accumulated logits (float16 overflow); nnU-Net has the same limit")
        if emit is not None:
            emit(rows, part)

    with per_sample_dropout(network, streams) if streams is not None else nullcontext():
        logits = stitch_tiles(tile_logits, data, patch_size, tile_step_size, network, device, torch.half,
                              stitch=stitch, emit=checked if emit is not None else None)
    if logits is not None:  # returned whole: checked whole
        checked(slice(None), logits)
    return logits
