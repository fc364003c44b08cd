"""Ablation (issue 12): PlainConvUNet vs XBoundNet++ on nnU-Net's stock 7-stage plan vs XBoundNet++ as published
(XBoundNetPlanner: four levels, bridge 32x32), on a kaz2d phantom of 256x256 slices.

The plans come from the real planners run on the phantom (nnU-Net's ExperimentPlanner, XBoundNetPlanner). Each
network is trained with the same short schedule in one process (same data, seed, loss, optimiser), then
validated: Dice against the annotation, and the ROI AUROC of the MC-dropout entropy for finding the pixels where
the annotation and the true zone disagree. A smoke-level comparison, not a paper result.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

N_TRAIN_PATIENTS, N_VAL_PATIENTS, SLICES = 4, 1, 4
ITERATIONS, BATCH, LR, MC_SAMPLES, ROI_MARGIN = 20, 2, 1e-3, 5, 10
SEED = 0


def _plans(root: Path) -> tuple[dict, dict]:
    """nnUNetPlans and nnUNetXBoundNetPlans (2d) of a 256x256 kaz2d phantom, from the real planners."""
    from nnunet_kaz.datasets import make_kaz2d_dataset

    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"), nnUNet_n_proc_DA="1")
    make_kaz2d_dataset(root / "raw" / "Dataset979_Kaz256", n_patients=2, seed=SEED, image_size=(256, 256),
                       slices_per_patient=2, n_test_patients=0)
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "nnUNetv2_extract_fingerprint"), "-d", "979", "-np", "1"], env=env, check=True,
                   capture_output=True)
    subprocess.run([str(bin_dir / "nnUNetv2_plan_experiment"), "-d", "979"], env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-c", "from nnunet_kaz.planners.xboundnet_planner import XBoundNetPlanner\n"
                    "from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset\n"
                    "plan_experiment_dataset(979, XBoundNetPlanner)"], env=env, check=True, capture_output=True)
    folder = root / "pre" / "Dataset979_Kaz256"
    load = lambda name: json.loads((folder / f"{name}.json").read_text())["configurations"]["2d"]  # noqa: E731
    return load("nnUNetPlans"), load("nnUNetXBoundNetPlans")


def _networks(stock: dict, published: dict) -> dict:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    def build(cfg, cls, **extra):
        arch = cfg["architecture"]
        kw = {**arch["arch_kwargs"], **extra}
        req = [k for k in arch["_kw_requires_import"] if k in kw]
        torch.manual_seed(SEED)
        return get_network_from_plans(cls, kw, req, 1, 2, allow_init=True, deep_supervision=False)

    plain = build(stock, stock["architecture"]["network_class_name"], dropout_op="torch.nn.Dropout",
                  dropout_op_kwargs={"p": 0.2, "inplace": False})
    xb_keys = {k: v for k, v in stock["architecture"]["arch_kwargs"].items()
               if k not in ("n_conv_per_stage", "n_conv_per_stage_decoder")}
    stock_xb = dict(stock, architecture=dict(stock["architecture"], arch_kwargs=xb_keys))
    return {"PlainConvUNet + Dropout(0.2) after every conv (nnUNetPlans)": (plain, stock),
            "XBoundNet++ on nnUNetPlans, planned depth": (build(stock_xb, "nnunet_kaz.networks.XBoundNet"), stock),
            "XBoundNet++ as published (nnUNetXBoundNetPlans)": (build(published, "nnunet_kaz.networks.XBoundNet"),
                                                                published)}


def _data():
    from nnunet_kaz.datasets.phantom_kaz2d import kaz2d_patient

    slices = [s for i in range(N_TRAIN_PATIENTS + N_VAL_PATIENTS)
              for s in kaz2d_patient(SEED, i, (256, 256), SLICES)]

    def stack(group):
        x = np.stack([(s.image - s.image.mean()) / (s.image.std() + 1e-8) for s in group])[:, None]
        return (torch.from_numpy(x.astype(np.float32)), torch.from_numpy(np.stack([s.label for s in group])),
                np.stack([s.truth for s in group]))

    n = N_TRAIN_PATIENTS * SLICES
    return stack(slices[:n]), stack(slices[n:])


def _train(nets: list, x, y) -> list[list[float]]:
    """ITERATIONS steps of Adam on alpha LogDice + (1 - alpha) CE (paper 000 eq. 1) for every network, on the same
    batches; the networks' steps alternate so that load changes on a shared machine hit all alike. Step wall times
    per network."""
    from nnunet_kaz.trainers.losses import build_logdice_ce_loss

    loss_fn = build_logdice_ce_loss(False, False, 0.7)
    opts = [torch.optim.Adam(net.parameters(), lr=LR) for net in nets]
    rng = np.random.default_rng(SEED)
    times = [[] for _ in nets]
    for _ in range(ITERATIONS):
        idx = torch.from_numpy(rng.choice(len(x), BATCH, replace=False))
        for net, opt, t in zip(nets, opts, times):
            net.train()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx][:, None].long())
            loss.backward()
            opt.step()
            t.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def _validate(net, x, y, truth) -> tuple[float, float]:
    """Mean Dice of the deterministic prediction vs the annotation; ROI AUROC of the normalized binary entropy of
    the MC-dropout mean (paper 000 eq. 2) for annotation != true zone (ROI: both dilated by ROI_MARGIN px)."""
    from nnunet_kaz.uncertainty.measures import binary_entropy

    net.eval()
    pred = torch.cat([net(x[i:i + 1]).argmax(1) for i in range(len(x))]).numpy()
    lab = y.numpy()
    dice = [2 * np.sum(p & t) / max(1, p.sum() + t.sum()) for p, t in zip(pred.astype(bool), lab.astype(bool))]
    for m in net.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.train()
    torch.manual_seed(SEED)
    scores, targets = [], []
    for i in range(len(x)):
        p = torch.stack([torch.softmax(net(x[i:i + 1]), 1)[0, 1] for _ in range(MC_SAMPLES)]).mean(0).numpy()
        roi = ndimage.binary_dilation((lab[i] > 0) | (truth[i] > 0), iterations=ROI_MARGIN)
        scores.append(binary_entropy(p)[roi])
        targets.append((lab[i] != truth[i])[roi])
    net.eval()
    return float(np.mean(dice)), float(roc_auc_score(np.concatenate(targets), np.concatenate(scores)))


def run() -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before, t_start = os.getloadavg()[0], time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stock, published = _plans(Path(tmp))
        (xt, yt, _), (xv, yv, tv) = _data()
        rows = []
        nets = _networks(stock, published)
        times = _train([net for net, _ in nets.values()], xt, yt)
        for (name, (net, cfg)), step_times in zip(nets.items(), times):
            arch = cfg["architecture"]["arch_kwargs"]
            bridge = "x".join(str(256 // int(np.prod([s[0] for s in arch["strides"]]))) for _ in range(2))
            params = sum(p.numel() for p in net.parameters())
            fmap = int(net.compute_conv_feature_map_size((256, 256)))
            dice, auroc = _validate(net, xv, yv, tv)
            rows.append(f"| {name} | {arch['n_stages']} ({bridge}) | {params / 1e6:.2f} M | {fmap / 1e6:.1f} M | "
                        f"{statistics.median(step_times):.2f} s | {dice:.3f} | {auroc:.3f} |")
    finally:
        torch.set_num_threads(threads)
    load_after, minutes = os.getloadavg()[0], (time.perf_counter() - t_start) / 60
    n_disagree = int(np.sum(yv.numpy() != tv))
    return "\n".join([
        "## XBoundNet++ ablation: PlainConvUNet vs XBoundNet++ on the stock 7-stage plan vs as published "
        "(bench_ablation)",
        "",
        f"Smoke-level comparison, not a paper result: kaz2d phantom, 256x256 slices, {N_TRAIN_PATIENTS} training "
        f"patients x {SLICES} slices, {N_VAL_PATIENTS} validation patient{'s' if N_VAL_PATIENTS > 1 else ''} x "
        f"{SLICES} slices (seed {SEED}). Plans "
        "from nnU-Net's ExperimentPlanner (nnUNetPlans 2d) and XBoundNetPlanner (nnUNetXBoundNetPlans 2d) run on "
        f"the phantom. The same schedule for every network: {ITERATIONS} iterations of batch "
        f"{BATCH}, Adam lr {LR:g}, 0.7 LogDice + 0.3 CE, no augmentation, no deep supervision, one CPU thread. "
        "Parameters and feature-map size (nnU-Net's `compute_conv_feature_map_size`, one 256x256 sample) at the "
        "planned widths; step time = median forward + backward + step (the networks' steps alternate). Dice = "
        "mean over validation slices of the "
        f"deterministic prediction against the annotation. AUROC = normalized entropy of the mean of "
        f"{MC_SAMPLES} MC-dropout samples (dropout modules in train mode, norms in eval) for finding the "
        f"pixels where the annotation and the true zone disagree ({n_disagree} pixels), pooled over the "
        f"validation slices inside a ROI of annotation or true zone dilated by {ROI_MARGIN} px. PlainConvUNet "
        "carries nnUNetTrainerDropout_p02's element-wise dropout after every convolution so that it has MC samples. "
        f"The whole run took {minutes:.1f} min; the machine's 1-minute load average was {load_before:.1f} at the "
        f"start and {load_after:.1f} at the end (other jobs shared the cores), so step times are comparable "
        "within this table only.",
        "",
        "| network | stages (bridge) | parameters | feature map | step (batch 2) | val Dice | ROI AUROC |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])


if __name__ == "__main__":
    print(run())
