"""KiTS23 evaluation of one 512x512x256 case (three regions: Dice + Surface Dice) against the official route.

Target (issue 16): the same values as neheller/kits23's `compute_metrics_for_label` per region (region masks
over the whole volume, Dice, DeepMind surface-distance's `compute_surface_distances` +
`compute_surface_dice_at_tolerance`), at least 5x faster. Ours: `kits23_case_metrics` (one crop to the
foreground box, neighbour codes from shifted slices, the exact tolerance ball instead of the EDT; see
nnunet_kaz/evaluation/surface_dice.py). Both sides are single-threaded NumPy/SciPy code; the benchmark pins
OMP_NUM_THREADS=1 (set before NumPy loads when run through benchmarks/run.py on its own) and checks it.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_metrics import best_time  # noqa: E402  (best of n wall times)

SHAPE = (256, 512, 512)             # (z, y, x)
SPACING = (1.0, 0.78, 0.78)         # mm, array axis order (KiTS23 cases: 0.5-5 mm slices, ~0.78 mm in-plane)
REPEATS_OURS, REPEATS_OFFICIAL = 3, 1


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
    from nnunet_kaz.evaluation.kits23_metrics import kits23_case_metrics

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    gt = label_map(0)
    pred = label_map(0, shift_mm=(1.0, -0.8, 0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # surface-distance uses scipy's deprecated ndimage.filters names
        t_off, ref = best_time(lambda: official(pred, gt), REPEATS_OFFICIAL)
    t_ours, ours = best_time(lambda: kits23_case_metrics(pred, gt, SPACING), REPEATS_OURS)
    t_edt, via_edt = best_time(lambda: kits23_case_metrics(pred, gt, SPACING, method="edt"), 1)
    diff = max(abs(a[k] - b[k]) for a, b in zip(ours + via_edt, ref + ref) for k in ("dice", "surface_dice"))
    if diff > 1e-6:
        raise AssertionError(f"ours {ours} differs from the official {ref} by {diff:.2e}")
    fg = {name: (int(np.isin(gt, labels).sum()), int(np.isin(pred, labels).sum()))
          for name, labels in (("kidney_and_mass", (1, 2, 3)), ("mass", (2, 3)), ("tumor", (2,)))}
    lines = ["## KiTS23 Dice + Surface Dice of one 512x512x256 case, three regions, vs the official route "
             "(bench_kits23_metrics)", "",
             f"Label maps {SHAPE} (z, y, x), spacing {SPACING} mm: two kidneys, a tumour, a cyst; the "
             "prediction is the same draw shifted by (1.0, -0.8, 0.8) mm. Official = neheller/kits23's per-region "
             "masks, Dice and DeepMind surface-distance 0.1 (`compute_surface_distances` + `compute_surface_dice_at_tolerance`), best of "
             f"{REPEATS_OFFICIAL}; ours = `kits23_case_metrics`, best of {REPEATS_OURS}. OMP_NUM_THREADS={threads} "
             "(both sides single-threaded NumPy/SciPy).", "",
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
