"""Where XBoundNet++'s ASPP bridge sits: the depth rule shared by `XBoundNetPlanner` and `XBoundNetTrainer`.

Paper 000 (section 2.1) has a four-level network whose ASPP bridge (dilations 1, 6, 12, 18) runs at 1/8 of a
256x256 input, 32x32. With zero padding a 3x3 branch of dilation d on a map of edge e reaches an off-centre tap
(offset +-d) for some output position only when d <= e - 1; when d >= e along every axis with kernel > 1, the
branch multiplies its centre tap only, i.e. it is a 1x1 convolution (nnU-Net's 7-stage plan of a 256x256 patch
leaves a 4x4 bridge, where 6, 12 and 18 all degenerate).

Depth rule (one rule for 2D and 3D, any patch size): pool an axis only while the map after pooling keeps at least
`max(dilations) + 1` voxels along it (19 for the paper's dilations); this is nnU-Net's own topology rule
(`get_pool_and_conv_props`) with `min_feature_map_size = max(dilations) + 1` instead of 4. For 256x256 it gives
strides 1, 2, 2, 2 and a 32x32 bridge (paper 000), for 512x512 a 32x32 bridge after 16x, for 128x128 32x32 after
4x, for 192x192 24x24 after 8x; the bridge edge of every pooled axis lies in [max_d + 1, 2 max_d + 1]. Axes that
are shorter than that in the patch itself (thin 3D slabs, tiny images) are never pooled; along them the
dilations are reduced to fit: `fit_dilations` caps each branch's dilation on such an axis at edge - 1 (and 1 where
the kernel is 1), and the planner writes the per-axis dilations into the plans (`aspp_dilations`). XBoundNet++
needs one downsampling at least; when even that leaves an axis below max_d + 1 the same reduction applies.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

PAPER_DILATIONS = (1, 6, 12, 18)


def as_per_axis(dilations: Sequence, ndim: int) -> List[Tuple[int, ...]]:
    """Dilations as one tuple per branch with one entry per spatial axis (scalars broadcast)."""
    out = []
    for d in dilations:
        t = tuple(int(v) for v in d) if isinstance(d, (list, tuple)) else (int(d),) * ndim
        if len(t) != ndim or min(t) < 1:
            raise ValueError(f"ASPP dilation {d!r} must be an int >= 1 or {ndim} of them")
        out.append(t)
    return out


def max_dilation(dilations: Sequence) -> int:
    return int(max(np.max(d) for d in dilations))


def stage_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> List[List[int]]:
    """Spatial size of every encoder stage's output (stage s after strides 0..s)."""
    sizes, size = [], list(patch_size)
    for st in strides:
        size = [int(i // j) for i, j in zip(size, st)]
        sizes.append(size)
    return sizes


def check_patch_fits(patch_size: Sequence[int], strides: Sequence[Sequence[int]], where: str) -> None:
    """ValueError naming `where` when the patch is smaller than the total downsampling along an axis, or not
    divisible by it (nnU-Net's planner keeps patches divisible; a hand-edited plan may not)."""
    total = np.prod(np.array(strides, dtype=np.int64), axis=0)
    patch = np.array(patch_size, dtype=np.int64)
    if len(patch) != len(total) or np.any(patch < total) or np.any(patch % total):
        raise ValueError(f"{where}: patch size {list(map(int, patch))} does not fit the total downsampling "
                         f"{list(map(int, total))} of its {len(strides)} stages (strides {strides}); every patch "
                         f"axis must be a multiple of it")


def fitting_depth(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                  dilations: Sequence = PAPER_DILATIONS) -> int:
    """Number of leading stages to keep so that no pooled axis of the bridge drops below max_d + 1 voxels
    (the module's depth rule); at least 2 (one encoder and one decoder level)."""
    min_edge = max_dilation(dilations) + 1
    size, n = list(patch_size), 1
    for st in strides[1:]:
        new = [int(i // j) for i, j in zip(size, st)]
        if any(j > 1 and e < min_edge for e, j in zip(new, st)):
            break
        size, n = new, n + 1
    return max(n, min(2, len(strides)))


def fit_dilations(bridge_size: Sequence[int], kernel_size: Sequence[int],
                  dilations: Sequence = PAPER_DILATIONS) -> List[Tuple[int, ...]]:
    """Per-axis dilations that keep every branch's off-centre taps on the map: d_a = min(d_a, e_a - 1) (1 where
    the kernel is 1 or e_a = 1). Equal to `dilations` when the bridge is large enough."""
    per_axis = as_per_axis(dilations, len(bridge_size))
    return [tuple(max(1, min(d, e - 1)) if k > 1 else 1 for d, e, k in zip(t, bridge_size, kernel_size))
            for t in per_axis]


def degenerate_branches(bridge_size: Sequence[int], kernel_size: Sequence[int],
                        dilations: Sequence) -> List[int]:
    """Indices of the ASPP branches that only ever multiply their centre tap on a bridge of `bridge_size`
    (zero padding): along every axis with kernel > 1 the dilation is >= the edge, so no off-centre tap falls
    inside the map for any output voxel."""
    out = []
    for b, t in enumerate(as_per_axis(dilations, len(bridge_size))):
        axes = [(d, e) for d, e, k in zip(t, bridge_size, kernel_size) if k > 1]
        if axes and all(d >= e for d, e in axes):
            out.append(b)
    return out


def describe_degenerate(bridge_size: Sequence[int], kernel_size: Sequence[int], dilations: Sequence) -> str:
    """'' or one sentence naming every degenerate branch (module name and dilation) and the bridge size."""
    bad = degenerate_branches(bridge_size, kernel_size, dilations)
    if not bad:
        return ""
    per_axis = as_per_axis(dilations, len(bridge_size))
    names = ", ".join(f"bridge.branches.{b} (dilation {per_axis[b] if len(set(per_axis[b])) > 1 else per_axis[b][0]})"
                      for b in bad)
    return (f"ASPP branches {names} only ever use their centre tap on the "
            f"{'x'.join(map(str, bridge_size))} bridge (each is a 1x1 convolution there)")
