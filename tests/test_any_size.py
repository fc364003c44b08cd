"""`nnunet-kaz explain`, `mhex` and `refine fit/apply` on images of any size (issue 14): a 2D image smaller than
the patch (64x72 and 50x70 for a 64x80 patch, as a new user's dataset gives them) and a 3D volume larger than its
patch in every axis, none a multiple of the network's strides. Real members trained by `nnUNetv2_train`.

The 2D maps are checked against an independent reference: the preprocessed image zero-padded by hand (centred,
as nnU-Net pads) to the patch, one direct pass, cropped back."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from tests.conftest import nnunet_env, run, shrink_plans

pytestmark = pytest.mark.integration
PLAIN, MHEX = "XBoundNetTrainer_debug", "nnUNetTrainerMHEX_debug"  # MHEX+ heads on nnU-Net's U-Net (>= 3 stages)
# 3D: refine fits on the predicted component, and the seeded 6-iteration member predicts none on the BIG volume
MHEX_3D = "nnUNetTrainerMHEX_demo"
PATCH_2D = (64, 80)
SIZES_2D = {"A": (64, 72), "B": (49, 69)}  # B: odd sizes, which no network stride divides


def _with_patch(member, root, patch):
    """A copy of a results folder whose plans tile with another patch (the weights do not depend on it)."""
    dst = root / member.name
    if not dst.exists():
        shutil.copytree(member, dst)
        plans = json.loads((dst / "plans.json").read_text())
        plans["configurations"]["2d"]["patch_size"] = list(patch)
        (dst / "plans.json").write_text(json.dumps(plans))
    return dst


@pytest.fixture(scope="module")
def odd_2d(tiny_kaz, tmp_path_factory):
    """Phantom images (and labels) resized to sizes that are not the patch's."""
    root = tmp_path_factory.mktemp("anysize2d")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    image = sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]
    label = tiny_kaz.raw / "labelsTs" / image.name.replace("_0000", "")
    for case, (h, w) in SIZES_2D.items():
        arr = np.asarray(Image.open(image).resize((w, h), Image.BILINEAR))
        Image.fromarray(np.maximum(arr, 1).astype(np.uint8)).save(root / "images" / f"{case}_0000.png")  # no crop
        Image.open(label).resize((w, h), Image.NEAREST).save(root / "labels" / f"{case}.png")
    return root


def _padded(x: torch.Tensor, patch):
    """(C, H, W) zero-padded, centred, to at least `patch`; and the crop back."""
    pads = [max(p - s, 0) for s, p in zip(x.shape[1:], patch)]
    xp = torch.nn.functional.pad(x, [v for p in reversed(pads) for v in (p // 2, p - p // 2)])
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, x.shape[1:]))
    return xp, crop


def test_explain_2d_smaller_than_the_patch_equals_one_padded_pass(tiny_kaz, odd_2d, tmp_path):
    from nnunet_kaz.explain import explain_case, list_blocks
    from nnunet_kaz.inference import load_member

    member = _with_patch(tiny_kaz.train(PLAIN), tmp_path, PATCH_2D)
    out = tmp_path / "explain"
    predictor, net = load_member(f"{member}:0", "cpu")
    layers = list_blocks(net)  # every block, the ASPP bridge included
    run(["nnunet-kaz", "explain", "-i", *(str(p) for p in sorted((odd_2d / "images").iterdir())), "-m",
         f"{member}:0", "-o", str(out), "-device", "cpu", "--layers", *layers], tiny_kaz.env)
    for case, shape in SIZES_2D.items():
        maps = np.load(out / f"{case}_gradcam.npz")
        data, _ = predictor.preprocess([str(odd_2d / "images" / f"{case}_0000.png")])
        x, crop = _padded(data[:, 0], PATCH_2D)
        ref = explain_case(net, x, list(maps.keys()))  # one direct pass at the patch size
        for name in maps.keys():
            assert maps[name].shape == (1, *shape), name
            expected = ref[name][crop]
            scale = max(float(np.abs(expected).max()), 1e-6)
            np.testing.assert_allclose(maps[name][0], expected, atol=1e-4 * scale, err_msg=name)
        assert any(float(maps[n].max()) > 0 for n in maps.keys())
    # why padding is needed: at its own size the network's strides do not divide 49 x 69
    data, _ = predictor.preprocess([str(odd_2d / "images" / "B_0000.png")])
    with pytest.raises(RuntimeError):
        explain_case(net, data[:, 0], layers)


def test_mhex_2d_smaller_than_the_patch_equals_one_padded_pass(tiny_kaz, odd_2d, tmp_path):
    from nnunet_kaz.explain.mhex_cli import mhex_tile_maps
    from nnunet_kaz.inference import load_member

    member = _with_patch(tiny_kaz.train(MHEX), tmp_path, PATCH_2D)
    out = tmp_path / "mhex"
    run(["nnunet-kaz", "mhex", "-i", str(odd_2d / "images"), "-m", f"{member}:0", "-o", str(out), "-device", "cpu"],
        tiny_kaz.env)
    predictor, model = load_member(f"{member}:0", "cpu")
    n_heads = len(model.heads)
    for case, shape in SIZES_2D.items():
        maps = np.load(out / f"{case}_mhex.npz")
        data, _ = predictor.preprocess([str(odd_2d / "images" / f"{case}_0000.png")])
        x, crop = _padded(data[:, 0], PATCH_2D)
        ref = mhex_tile_maps(model, x[None], 1)
        for j, name in enumerate([f"cam_stage{j}" for j in range(n_heads)] + ["collaboration_U"]):
            expected = ref[j if j < n_heads else 2 * n_heads - 1][crop]
            assert maps[name].shape == (1, *shape)
            scale = max(float(np.abs(expected).max()), 1e-6)
            np.testing.assert_allclose(maps[name][0], expected, atol=1e-4 * scale, err_msg=name)


def test_refine_2d_smaller_than_the_patch(tiny_kaz, odd_2d, tmp_path):
    member = _with_patch(tiny_kaz.train(PLAIN), tmp_path, PATCH_2D)
    refiner = tmp_path / "refiner.json"
    run(["nnunet-kaz", "refine", "fit", "-m", f"{member}:0", "-i", str(odd_2d / "images"), "--gt",
         str(odd_2d / "labels"), "-o", str(refiner), "--iterations", "50", "-device", "cpu"], tiny_kaz.env)
    out = tmp_path / "refined"
    run(["nnunet-kaz", "refine", "apply", "-m", f"{member}:0", "-i", str(odd_2d / "images"), "--refiner",
         str(refiner), "-o", str(out), "--gt", str(odd_2d / "labels"), "-device", "cpu"], tiny_kaz.env)
    table = pd.read_csv(out / "refinement_effect.csv")
    assert list(table.case) == ["A", "B", "mean"]
    for case, shape in SIZES_2D.items():
        assert np.asarray(Image.open(out / f"{case}.png")).shape == shape
        assert np.load(out / f"{case}.npz")["probabilities"].shape[-2:] == shape


# --- 3D: a volume larger than the patch in every axis ---------------------------------------------------------
KITS_ID, KITS = 991, "Dataset991_KitsTiny"
SPACING = (2.5, 0.8, 0.8)
BIG = (21, 45, 38)  # the planned patch of 16 x 32 x 32 volumes is at most that; none a multiple of the strides


@pytest.fixture(scope="module")
def tiny_kits(tmp_path_factory):
    """A 3D phantom dataset planned by stock nnU-Net, an MHEX+ member (nnU-Net's U-Net) trained on it by
    `nnUNetv2_train`, and one larger volume (image + label) to explain."""
    from nnunet_kaz.datasets import kits3d_case, make_kits3d_dataset

    root = tmp_path_factory.mktemp("kits")
    env = nnunet_env(root)
    make_kits3d_dataset(root / "nnUNet_raw" / KITS, n_cases=5, seed=1, shape=(16, 32, 32), spacing=SPACING)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(KITS_ID), "-c", "3d_fullres", "-np", "1"],
        dict(env, nnUNet_n_proc_DA="1"))
    shrink_plans(root / "nnUNet_preprocessed", KITS, "nnUNetPlans", "nnUNetTinyPlans", 16)
    run(["nnUNetv2_train", str(KITS_ID), "3d_fullres", "0", "-tr", MHEX_3D, "-p", "nnUNetTinyPlans", "-device",
         "cpu"], env)
    member = root / "nnUNet_results" / KITS / f"{MHEX_3D}__nnUNetTinyPlans__3d_fullres"
    patch = json.loads((member / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
    assert all(b > p for b, p in zip(BIG, patch)), patch
    for d in ("images", "labels"):
        (root / d).mkdir()
    image, label = kits3d_case(7, 0, BIG, SPACING)
    for arr, path in ((image, root / "images" / "BIG_0000.nii.gz"), (label, root / "labels" / "BIG.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(reversed(SPACING)))
        sitk.WriteImage(img, str(path))
    return root, env, member


def test_explain_and_refine_on_a_3d_volume_larger_than_the_patch(tiny_kits, tmp_path):
    root, env, member = tiny_kits
    image = root / "images" / "BIG_0000.nii.gz"
    run(["nnunet-kaz", "explain", "-i", str(image), "-m", f"{member}:0", "-o", str(tmp_path / "ex"), "--target",
         "gt", "--gt", str(root / "labels"), "-device", "cpu"], env)
    maps = np.load(tmp_path / "ex" / "BIG_gradcam.npz")
    for name in maps.keys():
        assert maps[name].shape == BIG and np.isfinite(maps[name]).all() and maps[name].min() >= 0, name
    assert sum(float(maps[n].max()) > 0 for n in maps.keys()) >= len(maps.keys()) // 2
    refiner = tmp_path / "refiner.json"
    run(["nnunet-kaz", "refine", "fit", "-m", f"{member}:0", "-i", str(root / "images"), "--gt",
         str(root / "labels"), "-o", str(refiner), "--iterations", "30", "-device", "cpu"], env)
    run(["nnunet-kaz", "refine", "apply", "-m", f"{member}:0", "-i", str(root / "images"), "--refiner",
         str(refiner), "-o", str(tmp_path / "rf"), "--gt", str(root / "labels"), "-device", "cpu"], env)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "rf" / "BIG.nii.gz")))
    assert seg.shape == BIG
    assert list(pd.read_csv(tmp_path / "rf" / "refinement_effect.csv").case) == ["BIG", "mean"]


def test_mhex_on_a_3d_volume_larger_than_the_patch(tiny_kits, tmp_path):
    root, env, member = tiny_kits
    run(["nnunet-kaz", "mhex", "-i", str(root / "images" / "BIG_0000.nii.gz"), "-m", f"{member}:0", "-o",
         str(tmp_path / "mx"), "-device", "cpu"], env)
    mx = np.load(tmp_path / "mx" / "BIG_mhex.npz")
    for name in mx.keys():
        assert mx[name].shape == BIG and np.isfinite(mx[name]).all(), name
    assert mx["cam_stage0"].std() > 0 and (tmp_path / "mx" / "BIG_collaboration.nii.gz").is_file()
