"""KiTS23 evaluation of one 512x512x256 case (three regions: Dice + Surface Dice) against the official route.

Target (issue 16): the same values as neheller/kits23's `compute_metrics_for_label` per region (region masks
over the whole volume, Dice, DeepMind surface-distance's `compute_surface_distances` +
`compute_surface_dice_at_tolerance`), at least 5x faster. Ours: `kits23_case_metrics` (one crop to the
foreground box, neighbour codes from shifted slices, the exact tolerance ball instead of the EDT; see
nnunet_kaz/evaluation/surface_dice.py).

One thread for every route (`pin_one_thread`): the thread variables of OpenMP / BLAS / ITK in the environment
(inherited by any subprocess), the thread pools NumPy and SciPy have already loaded limited to 1 at run time
(threadpoolctl), torch's threads and SimpleITK's global default set to 1; all read back and checked, and every
timed call must use no more CPU time than wall time (a second thread would add CPU time). Every route is timed the
same number of times (best of REPEATS).
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = (256, 512, 512)             # (z, y, x)
SPACING = (1.0, 0.78, 0.78)         # mm, array axis order (KiTS23 cases: 0.5-5 mm slices, ~0.78 mm in-plane)
REPEATS = 3                         # every route: best of the same number of runs
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
CPU_SLACK = 1.05                    # CPU time / wall time of a one-thread call: <= 1, plus timer granularity


def pin_one_thread() -> tuple[dict[str, int], object]:
    """One thread everywhere (module docstring), read back: ({what: threads}, the threadpoolctl limiter to
    restore). Raises if anything reports more than one thread."""
    import SimpleITK as sitk
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    limiter = threadpool_limits(limits=1)
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    counts = {name: int(os.environ[name]) for name in THREAD_VARIABLES}
    counts.update({f"{p['internal_api']} {Path(p['filepath']).name}": p["num_threads"] for p in threadpool_info()})
    counts.update({"torch": torch.get_num_threads(),
                   "SimpleITK": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()})
    more = {k: v for k, v in counts.items() if v != 1}
    if more:
        limiter.restore_original_limits()
        raise AssertionError(f"not pinned to one thread: {more}")
    return counts, limiter


def best_time(fn, repeats: int = REPEATS):
    """(best wall time of `repeats` calls, the last result); raises if a call used more CPU time than wall time
    (CPU_SLACK): it ran in more than one thread."""
    best, out = float("inf"), None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        out = fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if cpu > CPU_SLACK * wall + 0.01:
            raise AssertionError(f"{cpu:.2f} s CPU time in {wall:.2f} s wall time: more than one thread ran")
        best = min(best, wall)
    return best, out


def blob(centre_mm, radii_mm, seed, roughness=0.15):
    """An irregular ellipsoid: radius scaled by smooth noise (sd `roughness`)."""
    rng = np.random.default_rng(seed)
    c = np.asarray(centre_mm) / SPACING
    half = np.ceil(1.5 * np.asarray(radii_mm) / np.asarray(SPACING)).astype(int)
    box = tuple(slice(max(0, int(ci - h)), min(s, int(ci + h))) for ci, h, s in zip(c, half, SHAPE))
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - ci) * s / r
                          for b, ci, s, r in zip(box, c, SPACING, radii_mm)], indexing="ij")
    rho = np.sqrt(sum(g ** 2 for g in grids))
    noise = ndimage.gaussian_filter(rng.standard_normal(rho.shape), 5)
    noise *= roughness / noise.std()
    mask = np.zeros(SHAPE, dtype=bool)
    mask[box] = rho < 1.0 + noise
    return mask


def label_map(seed, shift_mm=(0.0, 0.0, 0.0)):
    """Two kidneys (~110 x 60 x 50 mm), a tumour in the left one, a cyst in the right one."""
    s = np.asarray(shift_mm)
    lab = np.zeros(SHAPE, np.uint8)
    left, right = np.array([128.0, 200.0, 110.0]) + s, np.array([130.0, 205.0, 290.0]) + s
    lab[blob(left, (55, 32, 27), seed)] = 1
    lab[blob(right, (52, 30, 26), seed + 1)] = 1
    lab[blob(right + [10, 5, 12], (9, 9, 9), seed + 2)] = 3
    lab[blob(left + [-15, 8, -14], (18, 17, 16), seed + 3)] = 2
    return lab


def official(pred, gt):
    """neheller/kits23 compute_metrics_for_case, region by region (its code, on arrays)."""
    from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

    from nnunet_kaz.evaluation.kits23_metrics import KITS23_REGIONS, KITS23_TOLERANCES_MM

    rows = []
    for name, labels in KITS23_REGIONS.items():
        mask_pred, mask_gt = np.isin(pred, labels), np.isin(gt, labels)
        if not mask_gt.any() and not mask_pred.any():
            dc = sd = 1.0
        elif not mask_gt.any() or not mask_pred.any():
            dc = sd = 0.0
        else:
            dc = 2 * np.count_nonzero(mask_pred & mask_gt) / (np.count_nonzero(mask_pred) + np.count_nonzero(mask_gt))
            dist = compute_surface_distances(mask_gt, mask_pred, SPACING)
            sd = compute_surface_dice_at_tolerance(dist, KITS23_TOLERANCES_MM[name])
        rows.append({"region": name, "dice": dc, "surface_dice": sd})
    return rows


def run() -> str:
    import SimpleITK as sitk
    import torch

    saved = ({name: os.environ.get(name) for name in THREAD_VARIABLES}, torch.get_num_threads(),
             sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
    counts, limiter = pin_one_thread()
    try:
        return _run(counts)
    finally:
        limiter.restore_original_limits()
        for name, value in saved[0].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(saved[1])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved[2])


def _run(counts: dict[str, int]) -> str:
    from nnunet_kaz.evaluation.kits23_metrics import kits23_case_metrics

    gt = label_map(0)
    pred = label_map(0, shift_mm=(1.0, -0.8, 0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # surface-distance uses scipy's deprecated ndimage.filters names
        t_off, ref = best_time(lambda: official(pred, gt))
    t_ours, ours = best_time(lambda: kits23_case_metrics(pred, gt, SPACING))
    t_edt, via_edt = best_time(lambda: kits23_case_metrics(pred, gt, SPACING, method="edt"))
    diff = max(abs(a[k] - b[k]) for a, b in zip(ours + via_edt, ref + ref) for k in ("dice", "surface_dice"))
    if diff > 1e-6:
        raise AssertionError(f"ours {ours} differs from the official {ref} by {diff:.2e}")
    fg = {name: (int(np.isin(gt, labels).sum()), int(np.isin(pred, labels).sum()))
          for name, labels in (("kidney_and_mass", (1, 2, 3)), ("mass", (2, 3)), ("tumor", (2,)))}
    lines = ["## KiTS23 Dice + Surface Dice of one 512x512x256 case, three regions, vs the official route "
             "(bench_kits23_metrics)", "",
             f"Label maps {SHAPE} (z, y, x), spacing {SPACING} mm: two kidneys, a tumour, a cyst; the "
             "prediction is the same draw shifted by (1.0, -0.8, 0.8) mm. Official = neheller/kits23's per-region "
             "masks, Dice and DeepMind surface-distance 0.1 (`compute_surface_distances` + "
             f"`compute_surface_dice_at_tolerance`); ours = `kits23_case_metrics`; every route best of {REPEATS}. "
             "One thread, set and read back: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
             f"; no timed call used more CPU time than wall time (x {CPU_SLACK}).", "",
             "| region | GT / pred voxels | Dice | Surface Dice | official - ours |",
             "|---|---|---|---|---|"]
    for o, r in zip(ours, ref):
        d = max(abs(o["dice"] - r["dice"]), abs(o["surface_dice"] - r["surface_dice"]))
        lines.append(f"| {o['region']} | {fg[o['region']][0]:,} / {fg[o['region']][1]:,} | {o['dice']:.6f} | "
                     f"{o['surface_dice']:.6f} | {d:.1e} |")
    lines += ["", "| route | time (s) | ratio |", "|---|---|---|",
              f"| official (surface-distance per region) | {t_off:.2f} | 1.0x |",
              f"| ours, ball dilation (default) | {t_ours:.3f} | {t_off / t_ours:.1f}x |",
              f"| ours with method=\"edt\" (the same crop and codes, scipy's EDT) | {t_edt:.3f} | "
              f"{t_off / t_edt:.1f}x |", "",
              f"Same values: largest difference {diff:.1e} (goal <= 1e-6); goal >= 5x: "
              f"{'met' if t_off / t_ours >= 5 else 'NOT met'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
