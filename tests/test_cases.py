"""nnunet_kaz.cases (one module for cases on disk), the shared tiling and the CLI's flag vocabulary, without
trained models: listing and channel checks, the one axis convention, the probability checks, dataset.json lookup,
undeclared labels in `evaluate`, and `stitch_tiles` against nnU-Net's own slicers and a hand-made stitch."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from nnunet_kaz.cases import (MemberInput, check_image_case, check_member_geometry, find_dataset_json,
                              list_image_cases, load_probabilities, match_probabilities, read_segmentation,
                              resolve_images)
from nnunet_kaz.cli import main
from nnunet_kaz.errors import KazError
from nnunet_kaz.inference.tiling import sliding_window_slicers, stitch_tiles

ONE_CHANNEL = {"channel_names": {"0": "zscore"}, "file_ending": ".png", "labels": {"background": 0, "zone": 1}}


def _png(path, shape=(20, 24), mode="L", value=7):
    arr = np.full((*shape, 3) if mode == "RGB" else shape, value, np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def test_rgb_png_for_a_one_channel_dataset_is_refused_naming_the_case(tmp_path):
    _png(tmp_path / "A_0000.png")
    _png(tmp_path / "B_0000.png", mode="RGB")
    cases = list_image_cases(tmp_path, ONE_CHANNEL)
    assert sorted(cases) == ["A", "B"]
    check_image_case("A", cases["A"], 1)
    with pytest.raises(KazError, match=r"case B in .*: .*3 channel\(s\).*B_0000.png: 3.* dataset has 1"):
        check_image_case("B", cases["B"], 1)
    check_image_case("B", cases["B"], 3)  # an RGB dataset (nnU-Net's NaturalImage2DIO: one file, 3 channels)


def test_missing_channel_files_are_all_listed(tmp_path):
    two = dict(ONE_CHANNEL, channel_names={"0": "a", "1": "b"}, file_ending=".nii.gz")
    for case in ("A", "B"):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)), str(tmp_path / f"{case}_0000.nii.gz"))
    with pytest.raises(KazError, match="A_0001.nii.gz.*B_0001.nii.gz"):
        list_image_cases(tmp_path, two)
    with pytest.raises(KazError, match="A_0001.nii.gz not found"):
        resolve_images([tmp_path / "A_0000.nii.gz"], two)


@pytest.mark.parametrize("member", [
    MemberInput("3d", (16, 32, 32), (2.5, 0.8, 0.8), (0, 1, 2)),
    MemberInput("3d transposed", (32, 16, 32), (0.8, 2.5, 0.8), (1, 0, 2)),
    MemberInput("2d", (32, 32), (0.8, 0.8), (0, 1, 2)),
    MemberInput("2d transposed", (32, 32), (0.8, 0.5), (2, 1, 0))])
def test_member_geometry_against_nnunets_reader_and_new_shape(member, tmp_path):
    """`check_member_geometry` decides from the header what nnU-Net would make of the file: the reference reads the
    pixels with nnU-Net's SimpleITKIO, transposes and computes the resampled shape with nnU-Net's
    `compute_new_shape` (a 2D configuration keeps the first axis' spacing, as its preprocessor does). A file is
    taken iff the resampled volume has a voxel along every axis, and, for a 3D member, at least two along every
    axis (file and resampled) where the patch has more than one and the file is not 2D."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    files = {"vol": ((21, 45, 38), (2.5, 0.8, 0.8)), "thin": ((2, 45, 38), (0.5, 0.8, 0.8)),
             "three_at_1mm": ((3, 45, 38), (1.0, 0.8, 0.8)), "two_at_2.5": ((2, 45, 38), (2.5, 0.8, 0.8)),
             "one_slice": ((1, 45, 38), (2.5, 0.8, 0.8)), "image_2d": ((45, 38), (0.8, 0.8)),
             "narrow_x": ((21, 45, 1), (2.5, 0.8, 0.1)), "one_row": ((21, 1, 38), (2.5, 0.8, 0.8))}
    three_d = len(member.patch_size) == 3
    decided = {}
    for name, (shape, spacing) in files.items():
        path = tmp_path / f"{name}.nii.gz"
        img = sitk.GetImageFromArray(np.ones(shape, np.float32))
        img.SetSpacing(tuple(reversed(spacing)))
        sitk.WriteImage(img, str(path))
        data, props = SimpleITKIO().read_images([str(path)])
        order = member.transpose_forward
        old = [data.shape[1:][i] for i in order]
        old_spacing = [props["spacing"][i] for i in order]
        target = list(member.spacing) if three_d else [old_spacing[0], *member.spacing]
        new = compute_new_shape(old, old_spacing, target)
        need = [2 if three_d and p > 1 else 1 for p in (member.patch_size if three_d else (1, *member.patch_size))]
        taken = (not (three_d and len(shape) == 2) and all(n >= k for n, k in zip(new, need))
                 and all(o >= k for o, k in zip(old, need)))
        if taken:
            check_member_geometry(path, member)
        else:
            with pytest.raises(KazError, match=rf"^{re.escape(str(path))}.*member {re.escape(member.name)} \(a "):
                check_member_geometry(path, member)
        decided[name] = taken
    # by hand: a 3D member takes two 2.5 mm slices, not three 1 mm ones (1.2 -> 1 slice); a 2D member takes any
    # number of slices and 2D images, but no axis that resamples to nothing (0.1 mm -> 0.8 mm: 0.125 -> 0)
    expected = {"vol", "two_at_2.5"} if three_d else {"vol", "thin", "three_at_1mm", "two_at_2.5", "one_slice",
                                                     "image_2d", "one_row"}
    if member.name == "2d transposed":  # x, the axis of 1 voxel at 0.1 mm, keeps its spacing; 45 rows at 0.8 ->
        expected = set(files)           # 0.5 mm: more, never fewer
    assert {n for n, t in decided.items() if t} == expected


def test_one_axis_convention_for_png_and_single_slice_nifti(tmp_path):
    label = (np.arange(20 * 24).reshape(20, 24) % 3 == 0).astype(np.uint8)
    Image.fromarray(label).save(tmp_path / "a.png")
    sitk.WriteImage(sitk.GetImageFromArray(label[None]), str(tmp_path / "b.nii.gz"))
    a, sa = read_segmentation(tmp_path / "a.png")
    b, sb = read_segmentation(tmp_path / "b.nii.gz")
    assert a.shape == b.shape == (20, 24) and np.array_equal(a, b) and len(sa) == len(sb) == 2
    p = np.stack([1 - label, label]).astype(np.float32)[:, None]  # nnU-Net's (C, 1, H, W) for a 2D image
    np.savez_compressed(tmp_path / "a.npz", probabilities=p)
    assert load_probabilities(tmp_path / "a.npz").shape == (2, 20, 24)
    assert load_probabilities(tmp_path / "a.npz", (20, 24)).shape == (2, 20, 24)
    with pytest.raises(KazError, match="does not match"):
        load_probabilities(tmp_path / "a.npz", (24, 20))


@pytest.mark.parametrize("bad,message", [("nan", "NaN"), ("range", r"\[0, 1\]"), ("sum", "sum to 1")])
def test_probabilities_are_checked_at_every_voxel(tmp_path, bad, message):
    p = np.full((2, 1, 300, 400), 0.5, np.float32)  # 120000 voxels: a sampled check would skip most of them
    if bad == "nan":
        p[1, 0, 299, 399] = np.nan
    elif bad == "range":
        p[:, 0, 151, 3] = (1.5, -0.5)
    else:
        p[1, 0, 7, 301] = 0.7
    np.savez_compressed(tmp_path / "c.npz", probabilities=p)
    with pytest.raises(KazError, match=message):
        load_probabilities(tmp_path / "c.npz")


def test_dataset_json_is_found_next_to_the_folders_before_their_parents(tmp_path):
    (tmp_path / "raw" / "labelsTr").mkdir(parents=True)
    (tmp_path / "res" / "fold_0" / "validation").mkdir(parents=True)
    for d in ("raw", "res"):
        (tmp_path / d / "dataset.json").write_text(json.dumps({"labels": {"background": 0, d: 1}}))
    val, labels = tmp_path / "res" / "fold_0" / "validation", tmp_path / "raw" / "labelsTr"
    assert find_dataset_json(val, labels) == tmp_path / "raw" / "dataset.json"  # parent level before grandparent
    assert find_dataset_json(val) == tmp_path / "res" / "dataset.json"
    assert find_dataset_json(val, levels=1) is None


def test_match_probabilities_lists_every_problem(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    for c in ("A", "B", "C"):
        np.savez_compressed(tmp_path / "p" / f"{c}.npz", probabilities=np.full((2, 1, 4, 5), 0.5, np.float32))
    np.savez_compressed(tmp_path / "p" / "A_uncertainty.npz", entropy=np.zeros((4, 5)))  # not a case
    _png(tmp_path / "l" / "A.png", (4, 5), value=1)
    _png(tmp_path / "l" / "C.png", (4, 6), value=1)
    _png(tmp_path / "l" / "D.png", (4, 5), value=1)  # a label without probabilities: not evaluated
    with pytest.raises(KazError, match=r"2 problem\(s\)[\s\S]*B: no label file[\s\S]*C: .*\(4, 6\)"):
        match_probabilities(tmp_path / "p", tmp_path / "l")
    (tmp_path / "l" / "C.png").unlink()
    (tmp_path / "p" / "C.npz").unlink()
    (tmp_path / "p" / "B.npz").unlink()
    cases, probs, labels, n = match_probabilities(tmp_path / "p", tmp_path / "l")
    assert cases == ["A"] and n == 2 and labels["A"].name == "A.png"


def _eval_folders(tmp_path, gt_value):
    for d in ("pred", "gt"):
        (tmp_path / d).mkdir()
    seg = np.zeros((16, 16), np.uint8)
    seg[4:10, 5:12] = 1
    gt = seg.copy()
    gt[12:14, 2:4] = gt_value
    for c in ("case_a", "case_b"):
        Image.fromarray(seg).save(tmp_path / "pred" / f"{c}.png")
        Image.fromarray(gt if c == "case_b" else seg).save(tmp_path / "gt" / f"{c}.png")
    (tmp_path / "pred" / "dataset.json").write_text(json.dumps(ONE_CHANNEL))


def test_evaluate_refuses_an_undeclared_ground_truth_label_or_warns_when_allowed(tmp_path, capsys):
    _eval_folders(tmp_path, 2)  # label 2 in a 0/1 dataset
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("nnunet-kaz evaluate: error:") == 1 and "case_b" in err and "[2]" in err
    assert "--allow-undeclared-labels" in err and not out.exists()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(out),
                 "--allow-undeclared-labels", "-q"]) == 0
    err = capsys.readouterr().err
    assert "nnunet-kaz evaluate: warning:" in err and "case_b" in err and "[2]" in err
    import pandas as pd

    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.label.unique()) == [1]  # the declared labels are evaluated; label 2 is background to them


def test_library_errors_get_the_cli_flag(tmp_path, capsys):
    _eval_folders(tmp_path, 1)
    (tmp_path / "gt" / "case_c.png").write_bytes((tmp_path / "gt" / "case_a.png").read_bytes())
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o",
                 str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "case_c" in err and "(--pred-subset evaluates only the predicted cases)" in err
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o",
                 str(tmp_path / "ev"), "--n-bins", "0"]) == 2
    assert "(--n-bins)" in capsys.readouterr().err
    from nnunet_kaz.evaluation.evaluate import EvaluationSettings

    with pytest.raises(KazError) as e:  # the library's own message names its parameter, not a flag
        EvaluationSettings(n_bins=0).check()
    assert "(n_bins)" in str(e.value) and "--" not in str(e.value)


# --- tiling -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image,patch,step", [((1, 64, 80), (64, 80), 0.5), ((3, 70, 90), (32, 48), 0.5),
                                              ((40, 50, 37), (16, 32, 16), 0.5), ((1, 100, 200), (64, 80), 0.3)])
def test_slicers_are_nnunets(image, patch, step):
    """Reference: nnU-Net's private `_internal_get_sliding_window_slicers` (called here only to check ours)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    shim = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch)), tile_step_size=step,
                           verbose=False)
    assert sliding_window_slicers(image, patch, step) == \
        nnUNetPredictor._internal_get_sliding_window_slicers(shim, image)


@pytest.mark.parametrize("shape,patch", [((2, 64, 72), (64, 80)), ((2, 50, 70), (32, 32)),
                                         ((1, 20, 44, 40), (8, 16, 16)), ((1, 3, 45, 70), (32, 32))])
def test_stitch_of_a_per_voxel_map_returns_it_for_any_size(shape, patch):
    """Identity tiles stitch back to the image exactly (the weights cancel), for images smaller than the patch
    (padded, as nnU-Net pads), larger, 3D, and a 2D patch over every slice of a volume."""
    image = torch.randn(*shape, dtype=torch.float64)
    seen = []

    def fn(tile):
        seen.append((tuple(tile.shape), tile.dtype))
        return tile[0] * 2

    net = torch.nn.Conv2d(1, 1, 1).to(torch.float64)  # tiles come in the network's dtype
    out = stitch_tiles(fn, image.float(), patch, 0.5, net, accumulate_dtype=torch.float64)
    assert out.shape == image.shape
    torch.testing.assert_close(out, 2 * image.float().double(), atol=1e-6, rtol=1e-6)
    assert all(s == ((1, shape[0], *patch), torch.float64) for s in seen)


def test_stitch_weights_overlapping_tiles_with_nnunets_gaussian():
    """Hand-made reference: a map equal to each tile's index is stitched to sum_t g_t t / sum_t g_t."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    image = torch.zeros(1, 40, 20)
    patch = (32, 20)
    calls = []

    def fn(tile):
        calls.append(len(calls))
        return torch.full((1, *patch), float(len(calls) - 1))

    out = stitch_tiles(fn, image, patch, 0.5)[0]
    g = compute_gaussian(patch, 1.0 / 8, 10, torch.float32, torch.device("cpu"))
    assert len(calls) == 2  # tiles at 0 and 8 along the first axis
    num, den = torch.zeros(40, 20), torch.zeros(40, 20)
    for t, start in enumerate((0, 8)):
        num[start:start + 32] += g * t
        den[start:start + 32] += g
    torch.testing.assert_close(out, num / den)
