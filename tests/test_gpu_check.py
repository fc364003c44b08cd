"""benchmarks/gpu_check.sh (issue 23.8): on a machine without CUDA it prints SKIPPED for every check and exits 0;
its checks, parameterised by device, run here on the CPU against the CPU with members trained by `nnUNetv2_train`
(the device's peak memory counted from torch's allocations, the per-process cap played by a network that runs out
of memory above MC batch 1). What they confirm only a GPU can: see the module docstring of gpu_check.py."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.torch_memory import LiveBytes

pytestmark = pytest.mark.integration
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_script_skips_every_check_without_cuda():
    """CUDA hidden (CUDA_VISIBLE_DEVICES empty): one SKIPPED line per check, exit status 0."""
    gpu_check = _gpu_check()
    proc = subprocess.run([str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(gpu_check.CHECKS) and all(line.startswith("SKIPPED") for line in lines)
    assert [line.split()[1].rstrip(":") for line in lines] == list(gpu_check.CHECKS)


@contextmanager
def cpu_peak():
    with LiveBytes() as counted:
        box = {}
        yield box
    box["peak"] = counted.peak


@contextmanager
def batch_cap(limit: int):
    """The cap on the CPU: inside the block every module runs out of memory on a batch of more than one sample
    (a batch of MC samples exceeds it, one sample does not)."""
    import torch

    from nnunet_kaz.inference.predictor import OUT_OF_MEMORY

    def over_one(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 4 and args[0].shape[0] > 1:
            raise OUT_OF_MEMORY(f"out of memory: capped at {limit} bytes")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(over_one)
    try:
        yield
    finally:
        handle.remove()


def test_the_checks_pass_on_the_cpu_against_the_cpu(tiny_kaz, tmp_path, monkeypatch):
    gpu_check = _gpu_check()
    monkeypatch.setenv("nnUNet_extTrainer", tiny_kaz.env["nnUNet_extTrainer"])
    members = {name: tiny_kaz.train(name) for name in (gpu_check.DROPOUT, gpu_check.XBOUND, gpu_check.MHEX)}
    images = tiny_kaz.raw / "imagesTs"
    big = tmp_path / "volume"
    big.mkdir()
    Image.open(sorted(images.glob("*_0000.png"))[0]).resize((160, 160)).save(big / "VOL_0000.png")
    setup = gpu_check.Setup(members[gpu_check.DROPOUT], members[gpu_check.XBOUND], members[gpu_check.MHEX], images,
                            members[gpu_check.DROPOUT], big, tmp_path)
    lines = gpu_check.run_checks(setup, "cpu", "cpu", probe=cpu_peak, cap=batch_cap)
    by = {line.check: line for line in lines}
    assert len(lines) == len(gpu_check.CHECKS) + 1  # the memory check gives two lines
    failed = [str(line) for line in lines if line.status != "PASS" and not line.check.startswith("peak device")]
    assert not failed, "\n".join(failed)
    # ours vs stock: on the CPU the one sample's mean (4 C bytes per voxel), made in host memory on a GPU, is on
    # the same device as everything else, so only the line's numbers are checked here
    memory = next(line for line in lines if line.check.startswith("peak device"))
    assert "MiB" in memory.detail and memory.status in ("PASS", "FAIL")
    assert "retried at MC batch 1" in by["forced out-of-memory completes through the retry"].detail
