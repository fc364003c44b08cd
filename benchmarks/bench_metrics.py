"""Surface metrics of one CT-sized case pair: nnunet_kaz.evaluation.surface against MONAI 1.x.

Target (issue 6): equal values within 1e-6 under the same definitions, at least 5x faster.
Same definitions: MONAI's `get_mask_edges` (one scipy binary erosion, face connectivity, XOR) is our surface,
its CPU Euclidean path (KD-tree between edge voxel centres scaled by the spacing) gives the same exact
nearest-surface distances as our EDT, `percentile=95` is torch.quantile's linear interpolation (numpy's
default), `directed=False` takes the larger of the two directions and `symmetric=True` pools both for assd.
MONAI returns float32, so "equal" is checked as a relative difference <= 1e-6 (float32 resolution is 6e-8).
Inputs are prepared outside the timings for both sides (boolean masks for us, one-hot float tensors for MONAI).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
from scipy import ndimage

SHAPE = (256, 512, 512)             # (z, y, x): 512 x 512 in-plane, 256 slices
SPACING = (1.5, 0.78, 0.78)         # mm, array axis order
REPEATS = 3


def blob(centre_mm, radius_mm, seed, roughness=0.25):
    """An irregular lesion: a sphere whose radius varies by smooth noise (sd `roughness` x radius)."""
    rng = np.random.default_rng(seed)
    c = np.asarray(centre_mm) / SPACING
    half = np.ceil(1.6 * radius_mm / np.asarray(SPACING)).astype(int)
    box = tuple(slice(int(ci - h), int(ci + h)) for ci, h in zip(c, half))
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - ci) * s for b, ci, s in zip(box, c, SPACING)],
                        indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grids))
    noise = ndimage.gaussian_filter(rng.standard_normal(r.shape), 4)
    noise *= roughness * radius_mm / noise.std()
    mask = np.zeros(SHAPE, dtype=bool)
    mask[box] = r < radius_mm + noise
    return mask


def scenarios():
    centre = np.array([190.0, 200.0, 190.0])
    gt = blob(centre, 20.0, 0)                                      # ~4 cm ablation zone / tumour
    pred = blob(centre + [1.5, 2.0, -1.5], 19.0, 1)                 # a close, imperfect prediction
    yield "lesion", pred, gt
    yield "lesion + false positive 8 cm away", pred | blob(centre + [-60, -50, 20], 5.0, 2), gt


def best_time(fn, repeats=REPEATS):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def monai_three_calls(p, g):
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    kw = dict(include_background=True, spacing=SPACING)
    return {"hd": compute_hausdorff_distance(p, g, **kw).item(),
            "hd95": compute_hausdorff_distance(p, g, percentile=95, **kw).item(),
            "assd": compute_average_surface_distance(p, g, symmetric=True, **kw).item()}


def monai_one_pass(p, g):
    """MONAI's edges and distances computed once, the three metrics derived from them (its fastest route)."""
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    _, (d1, d2), _ = get_edge_surface_distance(p[0, 0], g[0, 0], spacing=SPACING, symmetric=True)
    return {"hd": max(d1.max(), d2.max()).item(),
            "hd95": max(torch.quantile(d1, 0.95), torch.quantile(d2, 0.95)).item(),
            "assd": torch.cat([d1, d2]).mean().item()}


THREADS = 1  # both sides: the machine is shared


def run() -> str:
    import torch

    from nnunet_kaz.evaluation import surface

    # Ours runs its two directions in two Python threads for boxes of >= surface._THREADED_VOXELS voxels; MONAI
    # runs in torch's threads. Both get THREADS: torch.set_num_threads, and our threading switched off.
    if not hasattr(surface, "_THREADED_VOXELS"):
        raise RuntimeError("nnunet_kaz.evaluation.surface._THREADED_VOXELS is gone: fix the thread control here")
    old = torch.get_num_threads(), surface._THREADED_VOXELS
    torch.set_num_threads(THREADS)
    if THREADS == 1:
        surface._THREADED_VOXELS = float("inf")
    try:
        return _run(surface.surface_metrics, torch.get_num_threads(), old[1])
    finally:
        torch.set_num_threads(old[0])
        surface._THREADED_VOXELS = old[1]


def _run(surface_metrics, torch_threads: int, threaded_voxels: int) -> str:
    import torch

    lines = ["## Surface metrics (hd, hd95, assd, mad, msd) of one 512x512x256 case vs MONAI", "",
             f"Array {SHAPE} (z, y, x), spacing {SPACING} mm. Best of {REPEATS} runs. Ours computes all five "
             "metrics in one call; MONAI has no mad/msd, so it computes three. Threads: "
             f"{THREADS} on both sides (torch threads {torch_threads} for MONAI; ours with its two-thread split "
             f"for boxes of >= {threaded_voxels:,} voxels switched off).", "",
             "| case | GT / pred voxels | ours (5 metrics) | MONAI hd+hd95+assd calls | ratio | "
             "MONAI edges+distances once | ratio | max rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    worst = {"three": float("inf"), "once": float("inf")}
    for name, pred, gt in scenarios():
        t_ours, ours = best_time(lambda: surface_metrics(pred, gt, SPACING))
        p = torch.from_numpy(pred)[None, None].float()
        g = torch.from_numpy(gt)[None, None].float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_three, three = best_time(lambda: monai_three_calls(p, g))
            t_once, once = best_time(lambda: monai_one_pass(p, g))
        diff = max(abs(ours[k] - v) / max(abs(v), 1e-12) for m in (three, once) for k, v in m.items())
        if diff > 1e-6:
            raise AssertionError(f"{name}: ours {ours} differs from MONAI {three} by {diff:.2e} (relative)")
        worst["three"] = min(worst["three"], t_three / t_ours)
        worst["once"] = min(worst["once"], t_once / t_ours)
        lines.append(f"| {name} | {int(gt.sum())} / {int(pred.sum())} | {t_ours * 1e3:.0f} ms | "
                     f"{t_three * 1e3:.0f} ms | {t_three / t_ours:.1f}x | {t_once * 1e3:.0f} ms | "
                     f"{t_once / t_ours:.1f}x | {diff:.1e} |")
        lines.append(f"|  | hd {ours['hd']:.3f}, hd95 {ours['hd95']:.3f}, assd {ours['assd']:.3f}, "
                     f"mad {ours['mad']:.3f}, msd {ours['msd']:.3f} mm | | | | | | |")
    def verdict(r: float) -> str:
        return f"{'met' if r >= 5 else 'NOT met'} ({r:.1f}x at the least)"

    lines += ["", f"Target >= 5x faster at equal values (relative difference <= 1e-6): against MONAI's three "
              f"public metric calls {verdict(worst['three'])}; against MONAI's edge and distance internals run "
              f"once for all three metrics {verdict(worst['once'])}.",
              "Why it is faster: the distance transform runs on the union bounding box (+1 voxel) only, and "
              "scipy's feature transform is evaluated at the surface voxels instead of building the dense "
              "float64 distance map (both in one thread here). MONAI converts the whole volume to float "
              "tensors and crops with its transform machinery per call."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
