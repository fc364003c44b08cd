"""Every path that runs a network on tiles follows the network's device and dtype (issue 18.1, 18.5), checked on the
CPU: the members' networks are made float64 (`load_models` wrapped, one place for predict, explain, mhex and refine)
while the preprocessed images stay float32, so a tile or tensor that misses its `.to(...)` raises
("Input type (float) and bias type (double) should be the same"), as a CPU tile given to a CUDA network would.
Real members trained by `nnUNetv2_train`; each path's float64 output is compared with its float32 output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import nnunet_kaz.inference.predictor as predictor_module
from nnunet_kaz.inference import UncertaintyPredictor, parse_member

pytestmark = pytest.mark.integration
DROPOUT, XBOUND, MHEX = "nnUNetTrainerDropout_p02_debug", "XBoundNetTrainer_debug", "nnUNetTrainerMHEX_debug"


@pytest.fixture(scope="module")
def trained(tiny_kaz):
    return {name: tiny_kaz.train(name) for name in (DROPOUT, XBOUND, MHEX)}


def make_float64(monkeypatch):
    """From here on in the test, every member network is float64 (its float32 weights load into it)."""
    load_models = predictor_module.load_models

    def double(*args, **kwargs):
        models = load_models(*args, **kwargs)
        for m in models:
            m.network.double()
        return models

    monkeypatch.setattr(predictor_module, "load_models", double)


@pytest.fixture
def float64(monkeypatch):
    make_float64(monkeypatch)


def _images(tiny_kaz, tmp_path, n=1):
    """Test images (and their labels) in folders of their own."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    for src in sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[:n]:
        case = src.name.replace("_0000.png", "")
        Image.open(src).save(images / src.name)
        Image.open(tiny_kaz.raw / "labelsTs" / f"{case}.png").save(labels / f"{case}.png")
    return images, labels


def test_a_float64_network_refuses_a_float32_tile(trained, float64):
    """The control: without the move the test's networks raise, so the tests below can fail."""
    predictor = UncertaintyPredictor([parse_member(f"{trained[XBOUND]}:0")], device="cpu", verbose=False)
    net = predictor.network(0)
    assert next(net.parameters()).dtype == torch.float64
    with pytest.raises(RuntimeError):
        net(torch.zeros(1, 1, *net.patch_size))


@pytest.mark.parametrize("trainer, mirror", [(DROPOUT, False), (XBOUND, True)])
def test_predict_mc_path_follows_the_network_dtype(tiny_kaz, trained, tmp_path, monkeypatch, trainer, mirror):
    """MC samples (forward pass on a batch; XBoundNet++'s prefix once per tile and its suffix on the batch, with
    mirroring) with per-sample seeded masks: the float64 run equals the float32 run within float16 accumulation."""
    image = [str(sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0])]
    out = {}
    for dtype in ("float32", "float64"):
        if dtype == "float64":
            make_float64(monkeypatch)
        predictor = UncertaintyPredictor([parse_member(f"{trained[trainer]}:0")], mc=3, mc_batch=2, mirror=mirror,
                                         device="cpu", verbose=False)
        assert next(predictor.network(0).parameters()).dtype == getattr(torch, dtype)
        out[dtype] = predictor.predict_case(image, tmp_path / dtype / "case")
    assert out["float32"]["variance"].max() > 1e-4
    for key in ("probabilities", "variance", "entropy", "mutual_information"):
        np.testing.assert_allclose(out["float64"][key], out["float32"][key], atol=5e-3, err_msg=key)


def test_explain_gradcam_follows_the_network_dtype(tiny_kaz, trained, tmp_path, monkeypatch):
    """`explain` on nnU-Net's sliding window (tiles and their target masks) and in one direct pass."""
    from nnunet_kaz.explain import explain_case
    from nnunet_kaz.explain.cli_run import explain_images
    from nnunet_kaz.explain.refine_cli import last_block
    from nnunet_kaz.inference import load_member

    images, labels = _images(tiny_kaz, tmp_path)
    block = last_block(load_member(f"{trained[XBOUND]}:0", "cpu")[1])
    maps = {}
    for dtype in ("float32", "float64"):
        if dtype == "float64":
            make_float64(monkeypatch)
        explain_images([images], f"{trained[XBOUND]}:0", tmp_path / dtype, layers=[block], target="gt", gt=labels,
                       device="cpu")
        maps[dtype] = np.load(next((tmp_path / dtype).glob("*_gradcam.npz")))[block]
        predictor, net = load_member(f"{trained[XBOUND]}:0", "cpu")
        data, _ = predictor.preprocess([str(next(images.iterdir()))])
        direct = explain_case(net, data[:, 0], [block])[block]  # no tiling: the image itself is moved
        assert np.isfinite(direct).all()
    scale = float(np.abs(maps["float32"]).max())
    assert scale > 0
    np.testing.assert_allclose(maps["float64"], maps["float32"], atol=1e-3 * scale)


def test_mhex_follows_the_network_dtype(tiny_kaz, trained, tmp_path, monkeypatch):
    """`mhex`: CAMs and collaboration gradients per tile, and the ensemble's MC samples (`--mc`)."""
    from nnunet_kaz.explain.mhex_cli import mhex_images

    images, _ = _images(tiny_kaz, tmp_path)
    maps = {}
    for dtype in ("float32", "float64"):
        if dtype == "float64":
            make_float64(monkeypatch)
        mhex_images([images], f"{trained[MHEX]}:0", tmp_path / dtype, ensemble=[f"{trained[DROPOUT]}:0"], mc=2,
                    device="cpu")
        maps[dtype] = dict(np.load(next((tmp_path / dtype).glob("*_mhex.npz"))))
    for name, ref in maps["float32"].items():
        scale = max(float(np.abs(ref).max()), 1e-6)
        np.testing.assert_allclose(maps["float64"][name], ref, atol=1e-3 * scale, err_msg=name)


def test_refine_follows_the_network_dtype(tiny_kaz, trained, tmp_path, float64):
    """`refine fit` and `refine apply`: the predictor's probabilities and the tiled Grad-CAM heatmap."""
    from nnunet_kaz.explain.refine_cli import refine_apply, refine_fit

    images, labels = _images(tiny_kaz, tmp_path, n=2)
    fitted = refine_fit(f"{trained[XBOUND]}:0", images, labels, tmp_path / "refiner.json", iterations=20,
                        device="cpu")
    assert np.isfinite(fitted["fit"]["final_loss"])
    refine_apply(f"{trained[XBOUND]}:0", images, tmp_path / "refiner.json", tmp_path / "refined", gt_dir=labels,
                 device="cpu")
    assert len(list((tmp_path / "refined").glob("*.png"))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_settings_as_nnunet_predictor(trained):
    """On CUDA: cuDNN benchmark on, as nnUNetPredictor.__init__ sets it."""
    torch.backends.cudnn.benchmark = False
    UncertaintyPredictor([parse_member(f"{trained[DROPOUT]}:0")], device="cuda", verbose=False)
    assert torch.backends.cudnn.benchmark


def test_cpu_leaves_cudnn_alone(trained):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        UncertaintyPredictor([parse_member(f"{trained[DROPOUT]}:0")], device="cpu", verbose=False)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before
