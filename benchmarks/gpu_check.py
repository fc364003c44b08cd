"""What only a GPU can confirm (issue 23.8), checked on the user's own CUDA GPU: `benchmarks/gpu_check.sh` runs
this after `make install` and prints one PASS / FAIL / SKIPPED line per check (README, "Checking a GPU").

Set-up (~5 minutes on one GPU, with the real nnU-Net commands): a tiny KAZ 2D phantom and a tiny KiTS-like 3D
phantom are planned and preprocessed, and four short members are trained with `nnUNetv2_train -device cuda`
(MC dropout and MHEX+ on 2D, XBoundNet++ for Grad-CAM, MC dropout on 3D); a 256^3 phantom volume is predicted.
The checks (each function takes the device and its helpers as parameters, so tests/test_gpu_check.py drives them
on the CPU; on a machine without CUDA `main` prints SKIPPED for each):

- `check_devices`: the member's probabilities on the GPU and on the CPU agree within float16 tolerance (TOL_F16):
  the GPU runs the network under autocast (float16), the CPU in float32, both stitch the logits in float16.
- `check_mc_batch`: 8 MC samples predicted in batches of 1 and of 8 agree (the same per-sample dropout masks;
  batched cuDNN kernels round differently: TOL_F16).
- `check_placement`: the accumulators on the GPU and in CPU memory give the same numbers (one precision rule:
  TOL_PLACEMENT, float32 rounding of the GPU's and the CPU's exp and sums).
- `check_explain`, `check_mhex`: Grad-CAM (`explain`) and MHEX+ CAMs (`mhex`) on the GPU equal the CPU's within
  TOL_MAPS of each map's scale (TF32 / cuDNN rounding of the gradients).
- `check_memory`: peak device memory of one member (no MC) against stock nnU-Net's predictor on the same
  preprocessed 256^3 volume (ours must not hold more), and the device bytes per voxel of 4 MC samples in one
  batch (peaks on the volume and on its first half, over the voxel difference) against `device_bytes`, the
  documented arithmetic (within 0.5 byte per voxel).
- `check_forced_oom`: with the device capped below what the accumulators need (a per-process memory cap,
  `torch.cuda.set_per_process_memory_fraction`) the case completes through the retry (one warning, MC batch 1,
  accumulators in CPU memory) and equals a run placed in CPU memory from the start.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOL_F16 = 1e-2         # |p_gpu - p_cpu|: a float16 network's logits (relative error ~2^-11 per operation, ~1e-3
                       # after a few layers of |logit| <= 10: ~1e-2) move a probability by <= 0.25 x that
TOL_PLACEMENT = 1e-5   # float32 exp / sums on two devices, from the same float16 logits
TOL_MAPS = 1e-2        # of each map's largest value
VOLUME = (256, 256, 256)
CHECKS = ("devices", "mc_batch", "placement", "explain", "mhex", "memory", "forced_oom")
KAZ_ID, KAZ = 979, "Dataset979_GpuCheckKaz"
KITS_ID, KITS = 978, "Dataset978_GpuCheckKits"
DROPOUT, XBOUND, MHEX = "nnUNetTrainerDropout_p02_debug", "XBoundNetTrainer_debug", "nnUNetTrainerMHEX_debug"


@dataclass
class Line:
    check: str
    status: str   # PASS, FAIL or SKIPPED
    detail: str

    def __str__(self) -> str:
        return f"{self.status:7s} {self.check}: {self.detail}"


@dataclass
class Setup:
    """Trained members (results folders) and inputs."""
    dropout2d: Path
    xbound2d: Path
    mhex2d: Path
    images2d: Path
    dropout3d: Path
    volume3d: Path       # a folder holding VOL_0000.nii.gz
    work: Path


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _first(folder: Path) -> str:
    return str(sorted(Path(folder).glob("*_0000.*"))[0])


def _predict(member: Path, image: str, device: str, mc: int = 0, **kw) -> dict:
    """One case through the predictor (sampling and export, nothing written): its maps."""
    from nnunet_kaz.inference import UncertaintyPredictor, parse_member

    predictor = UncertaintyPredictor([parse_member(f"{member}:0")], mc=mc, device=device, verbose=False, seed=7,
                                     mirror=False, **kw)
    data, props = predictor.preprocess([image])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = predictor.sample_or_retry(data, "VOL")
    out = predictor.finalize(stats, props)
    out["warnings"] = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    out["mc_batch"], out["placement"] = predictor.case_mc_batch, predictor.case_device.type
    return out


def check_devices(setup: Setup, device: str, reference: str = "cpu") -> Line:
    image = _first(setup.images2d)
    a, b = _predict(setup.dropout2d, image, device), _predict(setup.dropout2d, image, reference)
    diff = _max_abs(a["probabilities"], b["probabilities"])
    return Line("CUDA vs CPU probabilities", "PASS" if diff <= TOL_F16 else "FAIL",
                f"max |p_{device} - p_{reference}| = {diff:.1e} (tolerance {TOL_F16:g}, float16 on the GPU)")


def check_mc_batch(setup: Setup, device: str) -> Line:
    image = _first(setup.images2d)
    one, eight = (_predict(setup.dropout2d, image, device, mc=8, mc_batch=b) for b in (1, 8))
    diffs = {k: _max_abs(one[k], eight[k]) for k in ("probabilities", "variance", "mutual_information")}
    differ = float(one["variance"].max())
    ok = max(diffs.values()) <= TOL_F16 and differ > 1e-4 and eight["mc_batch"] == 8
    return Line("--mc-batch 1 vs 8", "PASS" if ok else "FAIL",
                ", ".join(f"max |{k}| diff {v:.1e}" for k, v in diffs.items())
                + f" (tolerance {TOL_F16:g}; batch of 8 ran: {eight['mc_batch'] == 8}; samples differ: "
                  f"largest variance {differ:.1e})")


def check_placement(setup: Setup, device: str) -> Line:
    image = _first(setup.images2d)
    on = _predict(setup.dropout2d, image, device, mc=4, mc_batch=1)
    off = _predict(setup.dropout2d, image, device, mc=4, mc_batch=1, device_memory=1)  # forced into CPU memory
    diffs = {k: _max_abs(on[k], off[k]) for k in ("probabilities", "variance", "entropy", "mutual_information")}
    ok = max(diffs.values()) <= TOL_PLACEMENT and on["placement"] == device and off["placement"] == "cpu"
    return Line("accumulators on the device vs in CPU memory", "PASS" if ok else "FAIL",
                f"placements {on['placement']} / {off['placement']}; largest difference "
                f"{max(diffs.values()):.1e} (tolerance {TOL_PLACEMENT:g}: one precision rule)")


def _maps(folder: Path, pattern: str) -> dict[str, np.ndarray]:
    with np.load(next(Path(folder).glob(pattern))) as f:
        return {k: f[k] for k in f.files}


def _compare_maps(a: dict, b: dict) -> float:
    return max(_max_abs(a[k], b[k]) / max(float(np.abs(b[k]).max()), 1e-6) for k in b)


def _check_maps(setup: Setup, device: str, reference: str, command: str, run, member: Path, pattern: str,
                what: str) -> Line:
    """`run(images, member spec, out folder, device=...)` on both devices; its npz maps compared."""
    out = {}
    for d in (device, reference):
        folder = setup.work / f"{command}_{d}"
        shutil.rmtree(folder, ignore_errors=True)
        run([Path(_first(setup.images2d))], f"{member}:0", folder, device=d)
        out[d] = _maps(folder, pattern)
    rel = _compare_maps(out[device], out[reference])
    return Line(f"{command} ({what}) on the device", "PASS" if rel <= TOL_MAPS else "FAIL",
                f"{len(out[device])} maps; largest difference {rel:.1e} of a map's scale (tolerance {TOL_MAPS:g})")


def check_explain(setup: Setup, device: str, reference: str = "cpu") -> Line:
    from nnunet_kaz.explain.cli_run import explain_images

    return _check_maps(setup, device, reference, "explain", explain_images, setup.xbound2d, "*_gradcam.npz",
                       "Grad-CAM")


def check_mhex(setup: Setup, device: str, reference: str = "cpu") -> Line:
    from nnunet_kaz.explain.mhex_cli import mhex_images

    return _check_maps(setup, device, reference, "mhex", mhex_images, setup.mhex2d, "*_mhex.npz", "MHEX+ CAMs")


@contextmanager
def cuda_peak():
    """Peak bytes torch's CUDA allocator holds inside the block, above what it held before: box['peak']."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    box = {}
    yield box
    torch.cuda.synchronize()
    box["peak"] = torch.cuda.max_memory_allocated() - base


@contextmanager
def cuda_cap(n_bytes: int):
    """This process's device memory capped at what torch holds now plus `n_bytes`
    (`torch.cuda.set_per_process_memory_fraction`)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + n_bytes) / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def _stock_logits(member: Path, data, device: str):
    """Stock nnU-Net's sliding window on the preprocessed case (its results on the device, as by default)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    stock = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device(device), verbose=False,
                            perform_everything_on_device=device != "cpu", allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(member), (0,), "checkpoint_final.pth")
    return stock.predict_logits_from_preprocessed_data(data)


def _activations(predictor, data, batch: int, probe) -> int:
    """Peak bytes of the network on one tile for a batch of `batch` samples (weights already on the device)."""
    import torch

    from nnunet_kaz.inference.sliding_window import network_autocast, predict_tile_samples, set_mc_dropout
    from nnunet_kaz.inference.tiling import network_placement

    net = predictor.network(0)
    set_mc_dropout(net, True)
    device, dtype = network_placement(net)
    tile = torch.zeros((1, data.shape[0], *net.patch_size), device=device, dtype=dtype)
    with probe() as box, network_autocast(device):
        predict_tile_samples(net, tile, batch, None)
    return box["peak"]


def check_memory(setup: Setup, device: str, probe=cuda_peak) -> list[Line]:
    import torch

    from nnunet_kaz.inference import UncertaintyPredictor, parse_member
    from nnunet_kaz.inference.predictor import device_bytes
    from nnunet_kaz.inference.tiling import network_placement

    image = _first(setup.volume3d)
    ours = UncertaintyPredictor([parse_member(f"{setup.dropout3d}:0")], device=device, verbose=False, mirror=False)
    data, _ = ours.preprocess([image])
    with probe() as box:
        _stock_logits(setup.dropout3d, data, device)
    stock = box["peak"]
    with probe() as box:
        ours.sample_case(data, "VOL")
    one = box["peak"]
    voxels = int(np.prod(data.shape[1:]))
    lines = [Line(f"peak device memory, 1 member, {'x'.join(map(str, data.shape[1:]))}",
                  "PASS" if one <= stock else "FAIL",
                  f"ours {one / 2**20:.0f} MiB vs stock nnU-Net {stock / 2**20:.0f} MiB ({one / stock:.2f}x; "
                  f"{one / voxels:.1f} vs {stock / voxels:.1f} bytes per voxel)")]
    # device bytes per voxel: the peak of 4 MC samples in one batch on the volume and on its first half (the same
    # plane: the stitching window, the tiles' activations and the slabs' temporaries are the same on both and
    # cancel), over the voxel difference; a 2D member's volume is doubled instead (its slices are tiled one by one)
    mc = UncertaintyPredictor([parse_member(f"{setup.dropout3d}:0")], mc=4, mc_batch=4, device=device, verbose=False,
                              mirror=False)
    small = data[:, : data.shape[1] // 2] if data.shape[1] > 1 else data
    big = data if data.shape[1] > 1 else torch.cat([data, data], 1)
    peaks = []
    for volume in (small, big):
        with probe() as box:
            mc.sample_case(volume.contiguous(), "VOL")
        peaks.append(box["peak"])
    extra = int(np.prod(big.shape[1:])) - int(np.prod(small.shape[1:]))
    measured = (peaks[1] - peaks[0]) / extra
    # the image is copied to the network's device unless it is there already in the network's dtype (the CPU)
    net_device, net_dtype = network_placement(mc.network(0))
    copied = net_device.type != data.device.type or net_dtype != data.dtype
    expected = device_bytes(mc.label_manager.num_segmentation_heads, 1, 0, 4, mc.case_mc_batch, int(data.shape[0]),
                            mc.regions, mc.case_device.type == device, image_itemsize=net_dtype.itemsize if copied else 0)
    ok = abs(measured - expected) <= 0.5  # a small temporary alive at one peak and not the other
    lines.append(Line("device bytes of 4 MC samples as documented", "PASS" if ok else "FAIL",
                      f"{measured:.2f} bytes per voxel measured, {expected} by device_bytes (placement "
                      f"{mc.case_device.type}, MC batch {mc.case_mc_batch}; peak {peaks[1] / 2**20:.0f} MiB on "
                      f"{'x'.join(map(str, big.shape[1:]))})"))
    del data, small, big
    torch.cuda.empty_cache() if device == "cuda" else None
    return lines


def check_forced_oom(setup: Setup, device: str, cap=cuda_cap, probe=cuda_peak) -> Line:
    from nnunet_kaz.inference import UncertaintyPredictor, parse_member
    from nnunet_kaz.inference.predictor import device_bytes

    image = _first(setup.volume3d)
    predictor = UncertaintyPredictor([parse_member(f"{setup.dropout3d}:0")], mc=4, mc_batch=4, device=device,
                                     verbose=False, mirror=False)
    data, _ = predictor.preprocess([image])
    voxels, c = int(np.prod(data.shape[1:])), predictor.label_manager.num_segmentation_heads
    window = predictor.window_voxels(data.shape[1:])
    need = device_bytes(c, voxels, window, 4, 4, int(data.shape[0]), predictor.regions, True)
    fallback = device_bytes(c, voxels, window, 4, 1, int(data.shape[0]), predictor.regions, False)
    activations = _activations(predictor, data, 1, probe)
    room = need - fallback - 2 * activations
    if room <= 0:
        return Line("forced out-of-memory completes through the retry", "FAIL",
                    f"the volume is too small to cap between the placements ({need} vs {fallback} bytes)")
    limit = fallback + 2 * activations + room // 2
    reference = _predict(setup.dropout3d, image, device, mc=4, mc_batch=1, device_memory=1)
    with cap(limit):
        capped = _predict(setup.dropout3d, image, device, mc=4, mc_batch=4)
    diff = max(_max_abs(capped[k], reference[k]) for k in ("probabilities", "variance"))
    ok = len(capped["warnings"]) == 1 and capped["mc_batch"] == 1 and capped["placement"] == "cpu" \
        and diff <= TOL_PLACEMENT
    return Line("forced out-of-memory completes through the retry", "PASS" if ok else "FAIL",
                f"cap {limit / 2**20:.0f} MiB < {need / 2**20:.0f} MiB needed on the device; "
                f"{len(capped['warnings'])} warning(s), retried at MC batch {capped['mc_batch']} with the "
                f"accumulators in {capped['placement']} memory; largest difference from a run placed there from the "
                f"start {diff:.1e}")


def build(work: Path, device: str) -> Setup:
    """Phantoms, nnU-Net planning and four short trainings on `device` (the real commands)."""
    import SimpleITK as sitk

    from bench_predictor import capped_plans, run_cmd
    from nnunet_kaz.datasets import kits3d_case, make_kaz2d_dataset, make_kits3d_dataset
    from nnunet_kaz.paths import trainer_dir

    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(work / name)
    env.update(nnUNet_extTrainer=str(trainer_dir()), nnUNet_compile="f", nnUNet_n_proc_DA="2", nnUNet_def_n_proc="2")
    raw = make_kaz2d_dataset(work / "nnUNet_raw" / KAZ, n_patients=4, seed=0, image_size=(128, 128),
                             slices_per_patient=4, n_test_patients=1, overwrite=True)
    make_kits3d_dataset(work / "nnUNet_raw" / KITS, n_cases=4, seed=3, shape=(48, 96, 96), spacing=(1.0, 1.0, 1.0),
                        overwrite=True)
    for dataset_id, dataset, config in ((KAZ_ID, KAZ, "2d"), (KITS_ID, KITS, "3d_fullres")):
        run_cmd(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", config, "-np", "2"], env)
        capped_plans(work / "nnUNet_preprocessed" / dataset, config, "nnUNetGpuCheckPlans", 16, batch_size=2)
    results = {}
    for dataset_id, dataset, config, trainer in ((KAZ_ID, KAZ, "2d", DROPOUT), (KAZ_ID, KAZ, "2d", XBOUND),
                                                 (KAZ_ID, KAZ, "2d", MHEX), (KITS_ID, KITS, "3d_fullres", DROPOUT)):
        run_cmd(["nnUNetv2_train", str(dataset_id), config, "0", "-tr", trainer, "-p", "nnUNetGpuCheckPlans",
                 "-device", device], env)
        results[(dataset, trainer)] = work / "nnUNet_results" / dataset / f"{trainer}__nnUNetGpuCheckPlans__{config}"
    volume = work / "volume"
    volume.mkdir(exist_ok=True)
    array, _ = kits3d_case(11, 0, VOLUME, (1.0, 1.0, 1.0))
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(volume / "VOL_0000.nii.gz"))
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")})
    return Setup(results[(KAZ, DROPOUT)], results[(KAZ, XBOUND)], results[(KAZ, MHEX)], raw / "imagesTs",
                 results[(KITS, DROPOUT)], volume, work)


def run_checks(setup: Setup, device: str, reference: str = "cpu", probe=cuda_peak, cap=cuda_cap,
               only: tuple[str, ...] = CHECKS) -> list[Line]:
    """Every check in `only` on `device`; one that raises is a FAIL naming the error."""
    lines = []
    jobs = {"devices": lambda: [check_devices(setup, device, reference)],
            "mc_batch": lambda: [check_mc_batch(setup, device)],
            "placement": lambda: [check_placement(setup, device)],
            "explain": lambda: [check_explain(setup, device, reference)],
            "mhex": lambda: [check_mhex(setup, device, reference)],
            "memory": lambda: check_memory(setup, device, probe),
            "forced_oom": lambda: [check_forced_oom(setup, device, cap, probe)]}
    for name in only:
        t = time.perf_counter()
        try:
            found = jobs[name]()
        except Exception as e:  # a check that crashes fails, the others still run
            found = [Line(name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
        for line in found:
            line.detail += f" [{time.perf_counter() - t:.0f} s]"
            print(line, flush=True)
        lines.extend(found)
    return lines


def main(argv: list[str] | None = None, cuda_available: bool | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the GPU paths of nnunet-kaz on this machine's CUDA GPU.")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        for name in CHECKS:
            print(Line(name, "SKIPPED", "no CUDA device (torch.cuda.is_available() is False)"))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet_kaz_gpu_check_"))
    t = time.perf_counter()
    try:
        print(f"setting up in {work} (phantoms, planning, four short trainings on cuda)", flush=True)
        setup = build(work, "cuda")
        print(f"set up in {time.perf_counter() - t:.0f} s", flush=True)
        lines = run_checks(setup, "cuda")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [line for line in lines if line.status == "FAIL"]
    print(f"{len(lines) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - t:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
