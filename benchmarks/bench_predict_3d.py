"""KiTS-sized 3D volumes (issue 15): peak memory and wall time of stock `nnUNetv2_predict --save_probabilities`
against `nnunet-kaz predict` for one member and for members x MC samples, on one kits3d phantom volume.

Setup with the real nnU-Net commands: a kits3d phantom training set -> `nnUNetv2_plan_and_preprocess -c
3d_fullres` -> the plans' features capped (a tiny network, so 2 shared cores predict a 256^3 volume in minutes)
-> `nnUNetv2_train` (the dropout trainer's 2 x 3-iteration debug schedule) fold 0, copied to folds 1-4 (memory and
speed do not depend on the weight values). Every prediction runs in a fresh process measured by a small launcher
(wait4's ru_maxrss of that very process), one torch thread on both sides. Each route also runs on a patch-sized
volume (`SMALL`): bytes per voxel = (peak on the big volume - peak on the small one) / (voxel difference), so the
imports (which differ between the two packages) cancel. `BENCH3D_ROOT=DIR` keeps (and reuses) the setup in DIR.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import capped_plans, child_peak, run_cmd  # noqa: E402  (one launcher for every memory figure)

DATASET_ID, DATASET = 985, "Dataset985_Kits3dBench"
TRAINER, PLANS = "nnUNetTrainerDropout_p02_debug", "nnUNetBench3dPlans"
TRAIN_SHAPE, SPACING = (48, 96, 96), (1.0, 1.0, 1.0)  # training phantoms; isotropic so the test volume is not resampled
VOLUME = (256, 256, 256)    # the test volume (the issue asks for at least 256^3)
KITS = (500, 512, 512)      # a KiTS23 3d_fullres case, for the projection
MAX_FEATURES = 4            # tiny network: the benchmark measures memory, not segmentation quality
SMALL = (48, 96, 96)        # a patch-sized volume of the same phantom: each route's peak without the volume's share
N_MEMBERS, N_MC = 5, 10     # the 5 members x 10 MC samples, measured (~25 min of this run on one thread)
STEP = 1.0                  # tile step of every route (no overlap): the work per sample drops ~8x against 0.5 in 3D,
                            # the memory of the stitched volume does not change
THREADS = 1


def log(msg: str) -> None:
    print(f"[bench_predict_3d {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(root: Path) -> tuple[dict[str, str], Path, Path]:
    """(environment, results folder, folder with the one test volume), built once per root."""
    from nnunet_kaz.datasets import kits3d_case, make_kits3d_dataset
    from nnunet_kaz.paths import trainer_dir

    import SimpleITK as sitk

    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.update(nnUNet_extTrainer=str(trainer_dir()), nnUNet_compile="f", OMP_NUM_THREADS=str(THREADS),
               nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
    results = root / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__3d_fullres"
    images = root / "test"
    small = root / "test_small"
    if not (results / f"fold_{N_MEMBERS - 1}" / "checkpoint_final.pth").exists():
        make_kits3d_dataset(root / "nnUNet_raw" / DATASET, n_cases=5, seed=3, shape=TRAIN_SHAPE, spacing=SPACING,
                            overwrite=True)
        log("nnUNetv2_plan_and_preprocess")
        run_cmd(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"],
                dict(env, nnUNet_n_proc_DA="1"))
        capped_plans(root / "nnUNet_preprocessed" / DATASET, "3d_fullres", PLANS, MAX_FEATURES, batch_size=2)
        log(f"nnUNetv2_train {TRAINER} fold 0")
        run_cmd(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"],
                env)
        for f in range(1, N_MEMBERS):
            (results / f"fold_{f}").mkdir(exist_ok=True)
            shutil.copy(results / "fold_0" / "checkpoint_final.pth", results / f"fold_{f}")
    for folder, shape in ((images, VOLUME), (small, SMALL)):
        if not (folder / "VOL_0000.nii.gz").exists():
            log(f"test volume {shape}")
            folder.mkdir(exist_ok=True)
            image, _ = kits3d_case(11, 0, shape, SPACING)
            img = sitk.GetImageFromArray(image)
            img.SetSpacing(tuple(reversed(SPACING)))
            sitk.WriteImage(img, str(folder / "VOL_0000.nii.gz"))
    return env, results, images


# nnUNetv2_predict sets as many torch threads as the machine has cores on the CPU (predict_entry_point); the stock
# route pins one, as ours, and is otherwise nnU-Net's own entry point, unchanged
STOCK = ("import sys, torch; torch.set_num_threads(1); torch.set_num_threads = lambda n: None; "
         "from nnunetv2.inference.predict_from_raw_data import predict_entry_point; "
         "sys.argv = ['nnUNetv2_predict', *sys.argv[1:]]; predict_entry_point()")
# `nnunet-kaz predict` (the CLI's main) that also appends, per case, the bytes its bit-packed sample masks held
# and what their rows would hold uncompressed, and the seconds of `predict_folder` (reading, preprocessing,
# sampling, export and writing of the case; not the imports and the loading of the members)
OURS = ("import os, sys, time; from nnunet_kaz.uncertainty import streaming as s; own = s.StreamingStats.result\n"
        "def result(self):\n raw = sum(p.packed_nbytes for p in self.pairwise.values())\n r = own(self)\n"
        " open(os.environ['PAIRWISE_LOG'], 'a').write(f'{r.pairwise_nbytes} {raw}\\n')\n"
        " return r\n"
        "s.StreamingStats.result = result\n"
        "from nnunet_kaz.inference import predictor as p; folder = p.UncertaintyPredictor.predict_folder\n"
        "def timed(self, *a, **k):\n t = time.perf_counter(); r = folder(self, *a, **k)\n"
        " open(os.environ['PAIRWISE_LOG'], 'a').write(f'seconds {time.perf_counter() - t}\\n')\n return r\n"
        "p.UncertaintyPredictor.predict_folder = timed\n"
        "write = p.UncertaintyPredictor.write_case\n"
        "def timed_write(self, *a, **k):\n t = time.perf_counter(); r = write(self, *a, **k)\n"
        " open(os.environ['PAIRWISE_LOG'], 'a').write(f'writing {time.perf_counter() - t}\\n')\n return r\n"
        "p.UncertaintyPredictor.write_case = timed_write\n"
        "from nnunet_kaz.cli import main\nsys.exit(main(['predict', *sys.argv[1:]]))")
# The members' forward passes alone: the same predictor, case, tiles, batches and samples (`sample_batches`,
# `predict_samples(stitch=False)`), no stitching, accumulation or export; the image preprocessed before the clock
FORWARD = ("import sys, time, torch; torch.set_num_threads(1)\n"
           "from nnunet_kaz.inference import UncertaintyPredictor, parse_member\n"
           "from nnunet_kaz.inference.sliding_window import predict_samples\n"
           "pr = UncertaintyPredictor([parse_member(sys.argv[1])], mc=int(sys.argv[2]), device='cpu', mirror=False, "
           "tile_step_size=float(sys.argv[4]), verbose=False)\n"
           "data, _ = pr.preprocess([sys.argv[3]]); n = pr.label_manager.num_segmentation_heads\n"
           "t = time.perf_counter()\n"
           "for net, b, mirror, keys, flip in pr.sample_batches('VOL', pr.mc_batch):\n"
           " predict_samples(net, data, net.patch_size, n, b, pr.step, mirror, 'cpu', sample_keys=keys, flip=flip, stitch=False)\n"
           "print(time.perf_counter() - t)")


def forward_alone(env: dict[str, str], spec: str, mc: int, image: Path) -> float:
    import subprocess

    proc = subprocess.run([sys.executable, "-c", FORWARD, spec, str(mc), str(image), str(STEP)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"forward passes alone exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return float(proc.stdout.split()[-1])


def measure(root: Path, env: dict[str, str], results: Path, images: Path) -> dict:
    out = {}
    for size, folder in (("small", root / "test_small"), ("big", images)):
        log(f"stock nnUNetv2_predict --save_probabilities, fold 0 ({size})")
        shutil.rmtree(root / "stock", ignore_errors=True)
        out[f"stock_{size}"] = child_peak([sys.executable, "-c", STOCK, "-i", str(folder), "-o", str(root / "stock"),
                                           "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER,
                                           "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1",
                                           "--save_probabilities", "-step_size", str(STEP), "--disable_tta"], env)
        for name, spec, mc in (("ours_1", f"{results}:0", 0),
                               ("ours_many", f"{results}:{','.join(map(str, range(N_MEMBERS)))}", N_MC)):
            log(f"nnunet-kaz predict, {name} ({size})")
            shutil.rmtree(root / name, ignore_errors=True)
            pairwise_log = root / f"{name}.pairwise"
            pairwise_log.unlink(missing_ok=True)
            out[f"{name}_{size}"] = child_peak([sys.executable, "-c", OURS, "-i", str(folder), "-o", str(root / name),
                                                "-m", spec, "--mc", str(mc), "--device", "cpu", "--step-size",
                                                str(STEP), "--disable-tta"], dict(env, PAIRWISE_LOG=str(pairwise_log)))
            lines = pairwise_log.read_text().splitlines()
            held, raw = [ln for ln in lines if ln[0].isdigit()][-1].split()
            out[f"{name}_pairwise"], out[f"{name}_pairwise_raw"] = int(held), int(raw)
            for key in ("seconds", "writing"):
                out[f"{name}_{size}_{key}"] = float([ln for ln in lines if ln.startswith(key)][-1].split()[1])
    image = images / "VOL_0000.nii.gz"
    log("forward passes alone: 1 member, no MC; 1 member x 10 MC (x 5 for the 5 identical members)")
    out["forward_1"] = forward_alone(env, f"{results}:0", 0, image)
    out["forward_many"] = N_MEMBERS * forward_alone(env, f"{results}:0", N_MC, image)
    with np.load(root / "stock" / "VOL.npz") as f, np.load(root / "ours_1" / "VOL.npz") as g:
        out["max_abs_prob_diff"] = float(np.abs(f["probabilities"] - g["probabilities"]).max())
        out["n_classes"] = int(g["probabilities"].shape[0])
    return out


def run() -> str:
    keep = os.environ.get("BENCH3D_ROOT")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_predict_3d_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        env, results, images = setup(root)
        r = measure(root, env, results, images)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return report(r)


KITS_PATCH_DEPTH = 128  # a typical KiTS23 3d_fullres patch is 128 deep: its stitching window on a KiTS case


def placement_rows(n_classes: int) -> list[str]:
    """Device bytes of each placement, from the code's arithmetic (`device_bytes`, counted against what torch
    allocates by tests/test_gpu_paths.py), next to stock nnU-Net's, per voxel of the volume and of the stitching
    window, and on a 512x512x500 KiTS23 case with a 128-deep patch."""
    from nnunet_kaz.inference.predictor import device_bytes

    c, kits = n_classes, int(np.prod(KITS))
    window = KITS_PATCH_DEPTH * KITS[1] * KITS[2]
    rows = []
    for label, samples, batch, on_device in (
            ("1 member, no MC", 1, 1, True),
            (f"{N_MEMBERS} x {N_MC} samples, --mc-batch 8 (the GPU default)", N_MEMBERS * N_MC, 8, True),
            (f"{N_MEMBERS} x {N_MC} samples, --mc-batch 1", N_MEMBERS * N_MC, 1, True),
            ("accumulators in CPU memory (did not fit, or the retry)", N_MEMBERS * N_MC, 1, False)):
        per_voxel = device_bytes(c, 1, 0, samples, batch, 1, False, on_device)
        per_window = device_bytes(c, 0, 1, samples, batch, 1, False, on_device)
        total = device_bytes(c, kits, window, samples, batch, 1, False, on_device)
        rows.append(f"| ours: {label} | {per_voxel} | {per_window} | {total / 2**30:.1f} |")
    stock = 2 * c + 2 + 4  # nnU-Net's predicted_logits (float16), n_predictions (float16), the image (float32)
    rows.append(f"| stock `nnUNetv2_predict` (whole float16 logits and weights, the image) | {stock} | 0 | "
                f"{stock * kits / 2**30:.1f} |")
    return rows


def report(r: dict) -> str:
    voxels, small = int(np.prod(VOLUME)), int(np.prod(SMALL))
    n_many = N_MEMBERS * N_MC
    n_fg = r["n_classes"] - 1
    labels = {"stock": "stock `nnUNetv2_predict --save_probabilities`, fold 0",
              "ours_1": "`nnunet-kaz predict -m MEMBER:0` (1 member, no MC)",
              "ours_many": f"`nnunet-kaz predict` {N_MEMBERS} members x `--mc {N_MC}`"}
    rows, bpv = [], {}
    for key, label in labels.items():
        (mib, sec), (mib_small, _) = r[f"{key}_big"], r[f"{key}_small"]
        bpv[key] = (mib - mib_small) * 2**20 / (voxels - small)
        kits = (mib_small + bpv[key] * (int(np.prod(KITS)) - small) / 2**20) / 1024
        rows.append(f"| {label} | {mib:.0f} | {mib_small:.0f} | {sec:.0f} | {bpv[key]:.0f} | {kits:.1f} |")
    peak = {k: r[f"{k}_big"][0] for k in labels}

    def verdict(x: float, goal: float) -> str:
        return f"meets the {goal}x goal" if x <= goal else f"misses the {goal}x goal by {x / goal:.2f}x"

    one, many = peak["ours_1"] / peak["stock"], peak["ours_many"] / peak["stock"]
    over = {k: r[f"ours_{k}_big_seconds"] / r[f"forward_{k}"] - 1 for k in ("1", "many")}
    worst = max(over.values())
    return "\n".join([
        "## KiTS-sized 3D volume: peak memory of one prediction, stock vs ours (bench_predict_3d)",
        "",
        f"One kits3d phantom volume of {VOLUME[0]}x{VOLUME[1]}x{VOLUME[2]} = {voxels / 1e6:.1f} M voxels at "
        f"{SPACING[0]:g} mm (the plans' spacing: nothing resampled), {r['n_classes']} classes; a tiny 3D U-Net "
        f"(nnU-Net's planned 3d_fullres network, features capped at {MAX_FEATURES}) trained by `nnUNetv2_train "
        f"{TRAINER}` on five {TRAIN_SHAPE[0]}x{TRAIN_SHAPE[1]}x{TRAIN_SHAPE[2]} phantoms, fold 0 copied to folds "
        f"1-4. Every route: CPU, one torch thread, tile step {STEP:g} (no overlap, to keep the run to minutes: the "
        "memory of the stitched volume does not depend on it), mirroring off, every output written. Peak = max "
        "RSS of a fresh process (wait4's ru_maxrss). Bytes per voxel = (peak on the big volume - peak on a "
        f"{SMALL[0]}x{SMALL[1]}x{SMALL[2]} one) / voxel difference, so each package's imports cancel.",
        "",
        "| route | peak RSS (MiB) | peak, small volume (MiB) | wall (s) | bytes / voxel | projected peak, "
        "512x512x500 (GiB) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"- 1 member: ours / stock peak = **{one:.2f}** ({verdict(one, 1.0)}); bytes per voxel "
        f"{bpv['ours_1'] / bpv['stock']:.2f}x stock's.",
        f"- {N_MEMBERS} members x {N_MC} MC: ours / stock peak = **{many:.2f}** ({verdict(many, 1.5)}); "
        f"/ 1 member = {peak['ours_many'] / peak['ours_1']:.2f}; bytes per voxel "
        f"{bpv['ours_many'] / bpv['stock']:.2f}x stock's.",
        f"- Exact pairwise Dice: the sample masks of {n_many} samples x {n_fg} foreground classes held "
        f"{r['ours_many_pairwise'] / 2**20:.1f} MiB at the end of the case "
        f"({r['ours_many_pairwise'] * 8 / voxels:.2f} bits per voxel, the volume-wide intersection and union bits "
        f"included); their stored rows would hold {r['ours_many_pairwise_raw'] / 2**20:.1f} MiB uncompressed "
        "(only the words where the masks disagree are stored).",
        f"- The stock and our 1-member mean probabilities differ by at most {r['max_abs_prob_diff']:.1e} "
        "(float16 stitching on both sides).",
        "- Stock `nnUNetv2_predict -npp 1 -nps 1` reads and preprocesses in one worker process and exports "
        "(resampling, softmax, the probability file, the segmentation) in another, whose memory is not in the main "
        "process's ru_maxrss: stock's figures are its sliding-window process alone (the logits and the image), "
        "and they vary by a few hundred MiB from run to run of the same command with how the workers' arrays "
        "arrive; ours does everything in one process.",
        "- The projected column is computed, not measured: small-volume peak + measured bytes per voxel x "
        "the extra voxels of a 512x512x500 KiTS23 3d_fullres case (131 M voxels); activations are per tile and "
        "do not grow with the volume.",
        "",
        "Time against the members' forward passes alone (the same predictor, case, tiles, batches and samples, "
        "run by `sample_batches` and `predict_samples(stitch=False)` in a fresh process: no stitching, "
        "accumulation or export; the image preprocessed before the clock starts) and ours' `predict_folder` "
        "(reading, preprocessing, sampling, stitching, accumulating, exporting and writing the case; not the "
        f"imports and the loading of the members). The {N_MEMBERS} members are copies of one: their forward "
        f"passes were timed for one member x {N_MC} samples and multiplied by {N_MEMBERS} (scaled, not measured).",
        "",
        "| route | forward passes alone (s) | ours, predict_folder (s) | of which writing the files (s) | our overhead |",
        "|---|---|---|---|---|",
        *[f"| {label} | {r[f'forward_{k}']:.1f} | {r[f'ours_{k}_big_seconds']:.1f} | "
          f"{r[f'ours_{k}_big_writing']:.1f} | **{100 * over[k]:.0f} %** |"
          for k, label in (("1", "1 member, no MC"), ("many", f"{N_MEMBERS} members x {N_MC} MC"))],
        "",
        f"Goal <= 25 % on 3D: **{'met' if worst <= 0.25 else 'missed'}** (largest {100 * worst:.0f} %). "
        "The overhead is what a case costs besides the networks: reading and preprocessing, the float16 "
        "stitching, the softmax and the accumulators per sample, the pairwise masks, and once per case the "
        "export: every map resampled into the input geometry and written (compressed NIfTI maps, the "
        "probabilities and uncertainty npz files), which a single sample of this tiny network does not "
        "amortise.",
        "",
        "Device memory of each placement, from the code's arithmetic "
        "(`nnunet_kaz.inference.predictor.device_bytes`, which `case_placement` compares with the budget and "
        "tests/test_gpu_paths.py checks against the bytes torch allocates): bytes per voxel of the preprocessed "
        "volume, plus bytes per voxel of the stitching window (the patch's depth across the volume: the stitched "
        "float16 logits of the batch and their weights, handed to the accumulators as their rows are final), for "
        f"this dataset's {r['n_classes']} classes and one input channel, and what they come to on a 512x512x500 "
        f"KiTS23 case with a {KITS_PATCH_DEPTH}-deep patch; network activations are per tile and come on top:",
        "",
        "| placement | bytes / voxel | bytes / window voxel | 512x512x500 (GiB) |",
        "|---|---|---|---|",
        *placement_rows(r["n_classes"]),
    ])


if __name__ == "__main__":
    print(run())
