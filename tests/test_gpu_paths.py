"""Issue 23: the paths only a GPU runs, driven on the CPU where the CPU can show them: what is caught as out of
memory, the precision rule, no pinned memory, the device bytes per voxel of each placement (counted from what
torch really allocates), the device memory budget shared between processes, and predict's switches for them.
What only a GPU can confirm is in benchmarks/gpu_check.sh."""
from __future__ import annotations

import json
import math
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import nnunet_kaz.inference.predictor as predictor_module
from nnunet_kaz.errors import KazError
from nnunet_kaz.inference import UncertaintyPredictor, parse_member
from nnunet_kaz.inference.members import LoadedModel
from nnunet_kaz.inference.predictor import (OUT_OF_MEMORY, case_placement, device_bytes, is_out_of_memory,
                                            memory_budget)
from nnunet_kaz.inference.sliding_window import LogitOverflowError, network_autocast
from nnunet_kaz.uncertainty import measures
from nnunet_kaz.uncertainty.streaming import StreamingStats
from tests.torch_memory import LiveBytes

DROPOUT = "nnUNetTrainerDropout_p02_debug"


def test_out_of_memory_is_what_nnunet_catches():
    """nnU-Net's predictor retries on any RuntimeError while its network runs on CUDA: cuDNN's workspace errors
    are plain RuntimeErrors. torch's out-of-memory error is one on any device; a float16 overflow of the logits
    is not retried (the retry would overflow alike), nor are other errors, nor RuntimeErrors off CUDA."""
    assert issubclass(OUT_OF_MEMORY, RuntimeError)
    assert is_out_of_memory(OUT_OF_MEMORY("CUDA out of memory"), network_on_cuda=False)
    cudnn = RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")
    assert is_out_of_memory(cudnn, network_on_cuda=True) and not is_out_of_memory(cudnn, network_on_cuda=False)
    assert not is_out_of_memory(LogitOverflowError("inf"), network_on_cuda=True)
    assert not is_out_of_memory(ValueError("shape"), network_on_cuda=True)


def test_autocast_follows_the_network_device_only():
    """The precision rule: autocast whenever the network runs on CUDA (float16 where safe, as nnU-Net), nothing on
    the CPU; `predict_samples` asks with the network's device, whatever device the results go to."""
    cuda = network_autocast(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    if cuda is None:  # constructing a CUDA autocast without CUDA only warns; the object is what is checked
        with pytest.warns(UserWarning):
            cuda = network_autocast(torch.device("cuda"))
    assert isinstance(cuda, torch.autocast) and cuda.device == "cuda"
    assert isinstance(network_autocast(torch.device("cpu")), nullcontext)


class _Fake(nn.Module):
    """A 1x1x1 convolution to C outputs with dropout: no activations worth counting, float64 so that moving the
    float32 image to it makes the device copy the real network gets on a GPU."""

    def __init__(self, n_out: int):
        super().__init__()
        self.conv = nn.Conv3d(1, n_out, 1)
        self.drop = nn.Dropout(0.2)
        self.patch_size, self.mirror_axes = [4, 8, 8], None

    def forward(self, x):
        return self.drop(self.conv(x))


@pytest.fixture(scope="module")
def member(tiny_kaz):
    return parse_member(f"{tiny_kaz.train(DROPOUT)}:0")


def _fake_predictor(member, n_models: int, mc: int, mc_batch: int) -> UncertaintyPredictor:
    predictor = UncertaintyPredictor([member], mc=mc, mc_batch=mc_batch, device="cpu", verbose=False)
    torch.manual_seed(0)
    fake = _Fake(predictor.label_manager.num_segmentation_heads).double()
    ref = predictor.models[0]
    predictor.models = [LoadedModel(ref.member, ref.checkpoint, ref.key, fake.state_dict(), fake)] * n_models
    return predictor


@pytest.mark.parametrize("n_models, mc, mc_batch", [(1, 0, 1), (2, 3, 1), (1, 4, 3)])
def test_device_bytes_are_what_torch_allocates(member, monkeypatch, n_models, mc, mc_batch):
    """Issue 23.7: the peak of the bytes torch really holds while `sample_case` runs (every storage an operator
    returned, `LiveBytes`) on two volumes that differ in depth only. Per voxel (the difference over the voxel
    difference, so the stitching window, the tiles' and the slabs' temporaries, the same on both, cancel) it is
    `device_bytes`' per-voxel part for the placement the CPU runs (results on the network's device): the image
    and the accumulators; one sample's mean, made in CPU memory, is here on the same device and adds 4 C. What
    stays (the peak less the per-voxel part) holds at least the stitching window. The image is float32 and the
    network float64, so the device copy of the image is 8 bytes per voxel here (4 on a GPU)."""
    monkeypatch.setattr(StreamingStats, "SLAB_VOXELS", 24 * 32)  # one plane per slab on both volumes
    monkeypatch.setattr(measures, "SLAB_VOXELS", 24 * 32)
    peaks, n = {}, n_models * max(1, mc)
    for depth in (8, 24):
        predictor = _fake_predictor(member, n_models, mc, mc_batch)
        data = torch.rand(1, depth, 24, 32)
        with LiveBytes() as counted:
            stats = predictor.sample_case(data, "case")
        assert stats.n_samples == n and predictor.case_device.type == "cpu"
        peaks[depth] = counted.peak
    voxels = 16 * 24 * 32
    c = predictor.label_manager.num_segmentation_heads
    window = predictor.window_voxels((8, 24, 32))
    assert window == 4 * 24 * 32  # the fake network's patch is 4 deep

    def on_device(v: int) -> int:
        return device_bytes(c, v, window, n, mc_batch, 1, False, True, image_itemsize=8)

    per_voxel = (peaks[24] - peaks[8]) / voxels
    expected = (on_device(2 * voxels) - on_device(voxels)) / voxels + (4 * c if n == 1 else 0)
    # the peak may fall at a moment where a small temporary is alive on one volume and not on the other (seen: the
    # tile's float16 Gaussian, 4 x 8 x 8 x 2 = 512 bytes): 0.1 byte per voxel allows 1,228 bytes of the 12,288
    # voxels' difference, a tenth of the smallest per-voxel term (2 C = 4 bytes) times the voxels
    assert per_voxel == pytest.approx(expected, abs=0.1), (per_voxel, expected)
    assert peaks[8] - per_voxel * 8 * 24 * 32 >= (2 * c * mc_batch + 2) * window


def test_accumulators_are_the_bytes_the_formula_counts():
    """The dense accumulators StreamingStats allocates, counted tensor by tensor: 12 C bytes per voxel for softmax,
    12 C + 4 for regions, 4 C for one sample (`accumulator_bytes_per_voxel`); nothing pinned."""
    from nnunet_kaz.uncertainty.streaming import accumulator_bytes_per_voxel

    shape = (3, 5, 7)
    for regions, samples in ((False, 10), (True, 10), (False, 1)):
        stats = StreamingStats(4, shape, regions, max_samples=samples)
        if samples == 1:
            stats.add(torch.softmax(torch.randn(1, 4, *shape), 1))
        tensors = [t for t in vars(stats).values() if isinstance(t, torch.Tensor)]
        assert not any(t.is_pinned() for t in tensors)
        held = sum(t.numel() * t.element_size() for t in tensors)
        assert held == accumulator_bytes_per_voxel(4, samples, regions) * math.prod(shape)


def test_no_pinned_memory_when_the_accumulators_go_to_cpu_memory(member, monkeypatch):
    """Issue 23.3: a predictor that drives a GPU (device cuda, CUDA reported available) but whose case does not
    fit the device (budget 1 byte) keeps its accumulators in CPU memory that no transfer reads: no operator asks
    for page-locked memory (the networks stay on the CPU here, so the tiles run)."""
    predictor = _fake_predictor(member, 2, 3, 2)
    predictor.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(predictor_module, "memory_budget", lambda *args: 1.0)
    with LiveBytes() as counted:
        stats = predictor.sample_case(torch.rand(1, 8, 24, 32), "case")
    assert stats.n_samples == 6 and (predictor.case_device.type, predictor.case_mc_batch) == ("cpu", 1)
    assert counted.pinned == []


def test_device_memory_budget_is_shared_by_the_processes_on_the_device(monkeypatch):
    """Issue 23.6, free memory faked: 10 GiB free plus 1 GiB cached and unused; the default budget is a quarter
    of that for 4 processes; an explicit budget is the user's, capped by the free memory; the placement of a
    case that fits one process's budget goes to CPU memory when four share the device."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    cuda = torch.device("cuda")
    assert memory_budget(cuda) == 11 * gib
    assert memory_budget(cuda, processes=4) == 11 * gib / 4
    assert memory_budget(cuda, 2 * gib, processes=4) == 2 * gib
    assert memory_budget(cuda, 20 * gib) == 11 * gib
    assert memory_budget(torch.device("cpu")) == float("inf")
    with pytest.raises(KazError, match="device_processes"):
        memory_budget(cuda, processes=0)
    voxels = 60_000_000  # 4 classes, 50 samples: 62 bytes per voxel at batch 1, 3.5 GiB
    assert case_placement(4, voxels, 50, 8, memory_budget(cuda))[0]
    assert not case_placement(4, voxels, 50, 8, memory_budget(cuda, processes=4))[0]


@pytest.mark.integration
def test_predict_switches_skip_the_pairwise_dice_and_share_the_device(tiny_kaz, tmp_path, capsys):
    """`--no-pairwise-dice`: the two pairwise scores are NaN and every other score is as with them;
    `--device-processes` and the switch are recorded in predict_args.json; 0 processes is a one-line error."""
    from nnunet_kaz.cli import main

    folder = tiny_kaz.train(DROPOUT)
    images = tiny_kaz.raw / "imagesTs"
    common = ["predict", "-i", str(images), "-m", f"{folder}:0", "--mc", "3", "-device", "cpu", "-q"]
    assert main([*common, "-o", str(tmp_path / "with")]) == 0
    assert main([*common, "-o", str(tmp_path / "without"), "--no-pairwise-dice", "--device-processes", "2"]) == 0
    with_, without = (pd.read_csv(tmp_path / d / "scores.csv") for d in ("with", "without"))
    assert with_["pairwise_dice"].notna().all() and without[["pairwise_dice", "pairwise_dice_pooled"]].isna().all().all()
    rest = [c for c in with_.columns if c not in ("case", "label", "pairwise_dice", "pairwise_dice_pooled")]
    np.testing.assert_allclose(without[rest].to_numpy(float), with_[rest].to_numpy(float), rtol=1e-12)
    args = json.loads((tmp_path / "without" / "predict_args.json").read_text())
    assert args["pairwise_dice"] is False and args["device_processes"] == 2
    capsys.readouterr()
    assert main([*common, "-o", str(tmp_path / "zero"), "--device-processes", "0"]) == 2
    assert "--device-processes" in capsys.readouterr().err and not (tmp_path / "zero").exists()


def test_declared_floors_are_the_checked_ones_and_an_old_numpy_is_named():
    """pyproject.toml's torch / numpy floors are `versions.MINIMUM` (one list of what the calls need); numpy 1.x
    (no np.bitwise_count) or a missing torch gives one line naming the fix; this environment passes."""
    import re
    from pathlib import Path

    from nnunet_kaz import versions

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name, floor in versions.MINIMUM.items():
        declared = re.search(rf'"{name}>=([0-9.]+)"', text)
        assert declared and versions.parse(declared.group(1)) == floor, name
    assert versions.problems() == []
    old = versions.problems({"numpy": "1.26.4", "torch": "2.14.1+cu130"})
    assert len(old) == 1 and "numpy >= 2.0" in old[0] and "pip install 'numpy>=2.0'" in old[0]
    assert versions.problems({"numpy": "2.0.0rc1", "torch": "2.1.2"}) == []
    assert "torch >= 2.1.2" in versions.problems({"numpy": "2.4.6", "torch": None})[0]
    assert hasattr(np, "bitwise_count")
