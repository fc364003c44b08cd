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
REFINE_MEMBER = "XBoundNetTrainer_demo_seed0"  # test_refine_cli's member (one training per session)
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
    """`refine fit` and `apply` on images smaller than the patch, each against nnU-Net's own sliding window on the
    same network (`assert_refined_is_nnunets_prediction_outside_the_roi`; ROI margin 0, so that these small images
    have voxels outside it). The seeded demo member of test_refine_cli: the debug member predicts every voxel of
    these images as foreground, which would leave nothing outside the ROI to compare."""
    member = _with_patch(tiny_kaz.train(REFINE_MEMBER), tmp_path, PATCH_2D)
    refiner = tmp_path / "refiner.json"
    run(["nnunet-kaz", "refine", "fit", "-m", f"{member}:0", "-i", str(odd_2d / "images"), "--gt",
         str(odd_2d / "labels"), "-o", str(refiner), "--iterations", "50", "--margin", "0", "-device", "cpu"],
        tiny_kaz.env)
    out = tmp_path / "refined"
    run(["nnunet-kaz", "refine", "apply", "-m", f"{member}:0", "-i", str(odd_2d / "images"), "--refiner",
         str(refiner), "-o", str(out), "--gt", str(odd_2d / "labels"), "-device", "cpu"], tiny_kaz.env)
    table = pd.read_csv(out / "refinement_effect.csv")
    assert list(table.case) == ["A", "B", "mean"]
    outside = 0
    for case, shape in SIZES_2D.items():
        assert np.asarray(Image.open(out / f"{case}.png")).shape == shape
        assert np.load(out / f"{case}.npz")["probabilities"].shape[-2:] == shape
        outside += assert_refined_is_nnunets_prediction_outside_the_roi(
            member, odd_2d / "images" / f"{case}_0000.png", odd_2d / "labels" / f"{case}.png", out, case,
            REFINE_MEMBER, 0)
    assert outside > 0


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


def _member_and_case(root, member, with_label=False):
    """The member as the commands load it, and BIG preprocessed by nnU-Net's preprocessor (with its label). BIG's
    spacing is the plans' and its image has no zero border, so the preprocessed volume is BIG voxel for voxel
    (checked): maps in the input geometry compare with maps on the network's grid directly."""
    from nnunet_kaz.inference import load_member

    predictor, net = load_member(f"{member}:0", "cpu")
    pre = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, seg, props = pre.run_case([str(root / "images" / "BIG_0000.nii.gz")],
                                    str(root / "labels" / "BIG.nii.gz") if with_label else None,
                                    predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    assert data.shape[1:] == BIG and props["shape_before_cropping"] == BIG
    assert list(predictor.plans_manager.transpose_forward) == [0, 1, 2]
    return predictor, net, torch.from_numpy(np.asarray(data, np.float32)), seg


def test_explain_on_a_3d_volume_larger_than_the_patch_equals_a_brute_force_tile_loop(tiny_kits, tmp_path):
    """Every block's Grad-CAM over the ground truth of a volume larger than the patch (8 tiles, up to 8 per
    voxel) against `tests.sliding_reference`: each tile explained on its own (one direct LayerGradCAM pass with
    the tile's part of the mask), stitched by hand in float64 with nnU-Net's Gaussian. The stitching sums the
    same float32 products in float32: within 1e-5 of each map's maximum."""
    from nnunet_kaz.explain.gradcam import LayerGradCAM
    from tests.sliding_reference import brute_force_stitch

    root, env, member = tiny_kits
    image = root / "images" / "BIG_0000.nii.gz"
    run(["nnunet-kaz", "explain", "-i", str(image), "-m", f"{member}:0", "-o", str(tmp_path / "ex"), "--target",
         "gt", "--gt", str(root / "labels"), "-device", "cpu"], env)
    maps = np.load(tmp_path / "ex" / "BIG_gradcam.npz")
    predictor, net, data, seg = _member_and_case(root, member, with_label=True)
    cam = LayerGradCAM(net.eval(), list(maps.keys()))

    def tile_maps(tile, mask):
        results, _ = cam(tile, [(1, mask[0, 0] > 0.5)])
        return np.stack([results[0][n][0].detach().numpy() for n in cam.layers])

    ref = brute_force_stitch(tile_maps, [data, torch.from_numpy((seg == 1).astype(np.float32))],
                             predictor.configuration_manager.patch_size)
    assert ref.tiles.max() == 8
    for i, name in enumerate(cam.layers):
        assert maps[name].shape == BIG
        scale = max(float(np.abs(ref.value[i]).max()), 1e-6)  # a head off the target's path has all-zero maps
        np.testing.assert_allclose(maps[name], ref.value[i], atol=1e-5 * scale, err_msg=name)
    assert sum(float(np.abs(v).max()) > 0 for v in ref.value) >= len(cam.layers) // 2


@pytest.fixture(scope="module")
def big_refiner(tiny_kits, tmp_path_factory):
    root, env, member = tiny_kits
    refiner = tmp_path_factory.mktemp("refiner") / "refiner.json"
    run(["nnunet-kaz", "refine", "fit", "-m", f"{member}:0", "-i", str(root / "images"), "--gt",
         str(root / "labels"), "-o", str(refiner), "--iterations", "30", "-device", "cpu"], env)
    return refiner


def assert_refined_is_nnunets_prediction_outside_the_roi(member, image, label, out, case, trainer,
                                                         margin: int = 5) -> int:
    """What `refine apply` wrote for `case` into `out` against nnU-Net's own sliding window
    (`nnUNetPredictor.predict_sliding_window_return_logits`, no mirroring, as refine) on the same network, softmax
    in float32: outside the ROI the output keeps those probabilities (1e-6: float32 rounding of the softmax) and
    their argmax, the ROI is the bounding box of their class-1 argmax enlarged by `margin` voxels (by hand), and the Dice before refinement in refinement_effect.csv is that argmax's against the label.
    Preconditions (checked): nothing cropped or resampled, so the network's grid is the image's. Returns the number
    of voxels outside the ROI."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_kaz.inference import load_member

    predictor, net = load_member(f"{member}:0", "cpu")
    data, props = predictor.preprocess([str(image)])
    shape = tuple(data.shape[1:])
    assert tuple(props["shape_before_cropping"]) == tuple(props["shape_after_cropping_and_before_resampling"]) \
        == shape and list(predictor.plans_manager.transpose_forward) == [0, 1, 2]
    ref = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                          device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    ref.manual_initialization(net, predictor.plans_manager, predictor.configuration_manager, None,
                              predictor.dataset_json, trainer, None)
    p = torch.softmax(ref.predict_sliding_window_return_logits(data).float(), 0).numpy()
    fg = p.argmax(0) == 1
    assert fg.any()
    box = tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + 1 + margin))
                for i, n in zip(np.nonzero(fg), shape))
    with np.load(out / f"{case}.npz") as f:
        probs, roi = f["probabilities"].reshape(p.shape), f["roi"]
    assert [tuple(r) for r in roi.reshape(-1, 2)][-2:] == [(b.start, b.stop) for b in box][-2:]
    outside = np.ones(shape, bool)
    outside[box] = False
    np.testing.assert_allclose(probs[:, outside], p[:, outside], atol=1e-6)
    ending = predictor.dataset_json["file_ending"]
    seg, gt = ((sitk.GetArrayFromImage(sitk.ReadImage(str(f))) if ending == ".nii.gz" else np.asarray(Image.open(f)))
               .reshape(shape) for f in (out / f"{case}{ending}", label))
    np.testing.assert_array_equal(seg[outside], p.argmax(0)[outside])
    table = pd.read_csv(out / "refinement_effect.csv").set_index("case")
    gt = gt == 1
    assert table.loc[case, "dice_before"] == pytest.approx(2 * (fg & gt).sum() / (fg.sum() + gt.sum()), rel=1e-12)
    assert table.loc[case, "roi_voxels"] == int(np.prod([b.stop - b.start for b in box])) \
        >= table.loc[case, "changed_voxels"]
    return int(outside.sum())


def test_refine_on_a_3d_volume_larger_than_the_patch_against_nnunets_predictor(tiny_kits, big_refiner, tmp_path):
    """`refine apply` on a volume larger than the patch (`assert_refined_is_nnunets_prediction_outside_the_roi`)."""
    root, env, member = tiny_kits
    run(["nnunet-kaz", "refine", "apply", "-m", f"{member}:0", "-i", str(root / "images"), "--refiner",
         str(big_refiner), "-o", str(tmp_path / "rf"), "--gt", str(root / "labels"), "-device", "cpu"], env)
    assert list(pd.read_csv(tmp_path / "rf" / "refinement_effect.csv").case) == ["BIG", "mean"]
    assert assert_refined_is_nnunets_prediction_outside_the_roi(member, root / "images" / "BIG_0000.nii.gz",
                                                                root / "labels" / "BIG.nii.gz", tmp_path / "rf",
                                                                "BIG", MHEX_3D) > 0


def test_mhex_on_a_3d_volume_larger_than_the_patch_equals_a_brute_force_tile_loop(tiny_kits, tmp_path):
    """The MHEX+ CAMs, collaboration maps and the head's probability of a volume larger than the patch against
    `tests.sliding_reference` (each tile's `mhex_tile_maps`, stitched by hand in float64 with nnU-Net's Gaussian):
    within 1e-5 of each map's maximum (float32 sums of the same products)."""
    from nnunet_kaz.explain.mhex_cli import mhex_tile_maps
    from tests.sliding_reference import brute_force_stitch

    root, env, member = tiny_kits
    run(["nnunet-kaz", "mhex", "-i", str(root / "images" / "BIG_0000.nii.gz"), "-m", f"{member}:0", "-o",
         str(tmp_path / "mx"), "-device", "cpu"], env)
    mx = np.load(tmp_path / "mx" / "BIG_mhex.npz")
    predictor, model, data, _ = _member_and_case(root, member)
    ref = brute_force_stitch(lambda tile: mhex_tile_maps(model, tile, 1), [data],
                             predictor.configuration_manager.patch_size).value
    n = len(model.heads)
    expected = {**{f"cam_stage{j}": ref[j] for j in range(n)},
                **{f"collaboration_pair{j}": ref[n + j] for j in range(n - 1)},
                "collaboration_U": ref[2 * n - 1], "collaboration_disagreement": (n - 1) - ref[2 * n - 1]}
    assert set(mx.keys()) == set(expected)
    for name, want in expected.items():
        assert mx[name].shape == BIG
        scale = max(float(np.abs(want).max()), 1e-6)
        np.testing.assert_allclose(mx[name], want, atol=1e-5 * scale, err_msg=name)
    assert np.abs(expected["cam_stage0"]).max() > 0 and np.ptp(expected["collaboration_U"]) > 0
    collab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mx" / "BIG_collaboration.nii.gz")))
    np.testing.assert_allclose(collab, expected["collaboration_U"], atol=1e-5 * float(np.abs(ref[2 * n - 1]).max()))


# --- inputs whose dimensionality does not fit the member (issue 24.6) ------------------------------------------
def _write(path, array, spacing):
    img = sitk.JoinSeries([_image(a, spacing) for a in array]) if array.ndim == 4 else _image(array, spacing)
    sitk.WriteImage(img, str(path))


def _image(array, spacing):
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
    img.SetSpacing(tuple(reversed(spacing[-array.ndim:])))
    return img


BAD_INPUTS = {  # folder: ({file suffix: (array shape, spacing (z, y, x))}, what the message says)
    "twod": ({"_0000": ((45, 38), (0.8, 0.8))}, "is a 2D image (shape 45 x 38)"),
    "oneslice": ({"_0000": ((1, 45, 38), SPACING)}, "is one voxel thick along axis 0"),
    "thin": ({"_0000": ((2, 45, 38), (0.5, 0.8, 0.8))}, "has 0 voxel(s) along axis 0 once resampled"),
    "fourd": ({"_0000": ((2, 21, 45, 38), SPACING)}, "is a 4D image (2 volumes of 21 x 45 x 38)"),
    "twochannels": ({"_0000": ((21, 45, 38), SPACING), "_0001": ((21, 45, 38), SPACING)},
                    "hold 2 channel(s) (X_0000.nii.gz: 1, X_0001.nii.gz: 1)"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """One folder per input of BAD_INPUTS, each with case X (and a 'label' of the image's size for refine)."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    for folder, (files, _) in BAD_INPUTS.items():
        for d in ("images", "labels"):
            (root / folder / d).mkdir(parents=True)
        for suffix, (shape, spacing) in files.items():
            _write(root / folder / "images" / f"X{suffix}.nii.gz", rng.random(shape) * 100, spacing)
        shutil.copy(root / folder / "images" / "X_0000.nii.gz", root / folder / "labels" / "X.nii.gz")
    return root


@pytest.mark.parametrize("folder", list(BAD_INPUTS))
def test_inputs_the_member_cannot_take_are_one_message_before_anything_is_written(tiny_kits, big_refiner,
                                                                                  bad_inputs, folder, tmp_path,
                                                                                  capsys):
    """A 2D image, a one-slice volume, a volume that resamples to no slice, a 4D file and two channels for a
    one-channel member: `predict`, `explain`, `mhex`, `refine fit` and `refine apply` (the real CLI, in process)
    each end with exit code 2 and one line naming the file (the case's files for the channel count) and the
    member, and leave no output behind (nnU-Net would fail on a zero-size array or an index error, or predict a
    2D image replicated into a volume, after predict had written dataset.json, plans.json and predict_args.json)."""
    from nnunet_kaz.cli import main

    root, env, member = tiny_kits
    images, labels = bad_inputs / folder / "images", bad_inputs / folder / "labels"
    out = tmp_path / "out"
    m = ["-m", f"{member}:0", "-device", "cpu"]
    commands = {"predict": ["predict", "-i", str(images), "-o", str(out), *m, "-q"],
                "explain": ["explain", "-i", str(images / "X_0000.nii.gz"), "-o", str(out), *m],
                "mhex": ["mhex", "-i", str(images), "-o", str(out), *m],
                "refine fit": ["refine", "fit", "-i", str(images), "--gt", str(labels), "-o", str(out / "r.json"), *m],
                "refine apply": ["refine", "apply", "-i", str(images), "--refiner", str(big_refiner), "-o", str(out),
                                 *m]}
    names = f"{member.parent.name}/{member.name} (a 3D configuration, patch"
    what = BAD_INPUTS[folder][1]
    for command, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"nnunet-kaz {command.split()[0]}: error: "), err
        assert what in err and names in err, (command, err)
        assert str(images / "X_0000.nii.gz" if folder != "twochannels" else images) in err, (command, err)
        assert not out.exists(), command
