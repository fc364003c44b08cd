"""Post-processing chain: threshold / argmax, spacing-aware closing, largest component with the cyst rule
(2D and anisotropic 3D, hand-built masks), JSON round trip, KAZ BMP export, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage.morphology import ball

from nnunet_kaz.errors import KazError
from nnunet_kaz.postprocessing import (CHAIN_FILENAME, Argmax, Closing, LargestComponent, PostprocessingChain,
                                       Resize, Threshold, close_labels, ellipsoid_element, hu_to_image_units,
                                       keep_largest_components, write_kaz_bmp)
from nnunet_kaz.postprocessing.chain import FillHoles, MinimumSize, ResizeMask
from nnunet_kaz.postprocessing.components import remove_small_components
from nnunet_kaz.postprocessing.morphology import binary_closing_padded


def binary_probs(fg: np.ndarray) -> np.ndarray:
    fg = fg.astype(np.float32)
    return np.stack([1 - fg, fg])


# ------------------------------------------------------------------------------------------------ segmentation
def test_threshold_default_is_0_4_and_differs_from_argmax():
    p = binary_probs(np.array([[0.35, 0.45, 0.8]]))
    assert PostprocessingChain([Threshold()]).apply(p).segmentation.tolist() == [[0, 1, 1]]
    assert PostprocessingChain([Argmax()]).apply(p).segmentation.tolist() == [[0, 0, 1]]
    multi = np.array([[0.55, 0.7, 0.2], [0.25, 0.1, 0.3], [0.2, 0.2, 0.5]], np.float32)[:, None]  # (3, 1, 3)
    assert PostprocessingChain([Threshold(0.4)]).apply(multi).segmentation.tolist() == [[1, 0, 2]]
    assert PostprocessingChain([Argmax()]).apply(multi).segmentation.tolist() == [[0, 0, 2]]


# ----------------------------------------------------------------------------------------------------- closing
def test_ellipsoid_element_is_a_ball_in_millimetres():
    el = ellipsoid_element(1.5, (3.0, 0.7, 0.7))
    assert el.shape == (1, 5, 5)  # 1.5 mm reaches 2 pixels in-plane, no neighbouring slice
    el2 = ellipsoid_element(3.0, (3.0, 1.0, 1.0))
    assert el2.shape == (3, 7, 7) and el2[0].sum() == 1 and el2[1, 3].sum() == 7


def test_closing_is_spacing_aware_in_anisotropic_3d():
    spacing = (3.0, 0.7, 0.7)
    seg = np.zeros((7, 20, 20), np.uint8)
    seg[1:3, 5:15, 3:9] = 1
    seg[1:3, 5:15, 10:16] = 1  # 1-pixel (0.7 mm) gap in-plane
    seg[4:6, 5:15, 3:16] = 1   # one empty slice (3 mm) between the slabs
    seg[1, 9, 5] = 0           # a hole, closed as well
    out = close_labels(seg, spacing, radius_mm=1.5)
    assert out[1:3, 6:14, 9].all()        # in-plane gap bridged (but for its two ends)
    assert not out[3].any()               # the slab gap across slices is not
    assert out[1, 9, 5] == 1
    assert (out >= seg).all()
    # skimage's ball is isotropic in voxels: a radius reaching 1.5 mm in-plane (2 voxels) bridges the slices
    iso = binary_closing_padded(seg > 0, ball(2))
    assert iso[3].any()
    # foreground touching the array border is not eroded (padding)
    edge = np.zeros((1, 6, 6), np.uint8)
    edge[0, :, :2] = 1
    assert (close_labels(edge, (999, 1, 1), 2.0) == edge).all()


def test_hole_filling_in_2d_slices_and_labels_never_overwritten():
    seg = np.zeros((1, 12, 12), np.uint8)
    seg[0, 2:10, 2:10] = 1
    seg[0, 4:8, 4:8] = 0       # big hole: not closed by r = 1, filled by hole filling
    seg[0, 5, 5] = 2           # another label inside the hole stays
    closed = close_labels(seg, (999.0, 1.0, 1.0), 1.0, fill_holes=False)
    assert closed[0, 5, 6] == 0
    filled = close_labels(seg, (999.0, 1.0, 1.0), 1.0, fill_holes=True)
    assert filled[0, 4:8, 4:8].all() and filled[0, 5, 6] == 1 and filled[0, 5, 5] == 2


# ------------------------------------------------------------------------------------------ largest component
def test_largest_component_2d_and_the_intensity_cyst_rule():
    rng = np.random.default_rng(0)
    seg = np.zeros((1, 40, 40), np.uint8)
    seg[0, 2:14, 2:14] = 1     # 144 px: a cyst, homogeneous water
    seg[0, 20:30, 20:30] = 1   # 100 px: the ablation zone, heterogeneous
    seg[0, 35:38, 2:5] = 1     # 9 px
    img = np.full(seg.shape, -100.0) + rng.normal(0, 4, seg.shape)
    img[0, 2:14, 2:14] = 8 + rng.normal(0, 4, (12, 12))
    img[0, 20:30, 20:30] = 15 + rng.normal(0, 25, (10, 10))
    plain, rep = keep_largest_components(seg)
    assert plain.sum() == 144 and rep[1]["sizes"] == [144, 100, 9]
    out, rep = keep_largest_components(seg, cyst_rule="intensity", image=img)
    assert rep[1]["largest_is_cyst"] and rep[1]["kept"] == 1
    assert out[0, 20:30, 20:30].all() and out.sum() == 100
    # the same scene as a windowed 8-bit image: the window and limit must be given in gray levels
    img8 = np.clip(np.rint(hu_to_image_units(img)), 0, 255)
    hu_limits = keep_largest_components(seg, cyst_rule="intensity", image=img8)[1]
    assert not hu_limits[1]["largest_is_cyst"]  # HU window on gray levels: the cyst is missed
    window8 = [hu_to_image_units(-10.0), hu_to_image_units(20.0)]
    out8, _ = keep_largest_components(seg, cyst_rule="intensity", image=img8, fluid_window=window8,
                                      max_std=hu_to_image_units(10.0, std=True))
    assert (out8 == out).all()
    # a non-fluid largest component is kept; a lone cyst is removed
    img2 = img.copy()
    img2[0, 2:14, 2:14] = 60 + rng.normal(0, 4, (12, 12))
    assert keep_largest_components(seg, cyst_rule="intensity", image=img2)[0].sum() == 144
    lone = np.zeros_like(seg)
    lone[0, 2:14, 2:14] = 1
    out_lone, rep = keep_largest_components(lone, cyst_rule="intensity", image=img)
    assert out_lone.sum() == 0 and rep[1]["kept"] is None


def test_connectivity_option():
    seg = np.zeros((5, 5), np.uint8)
    seg[0:2, 0:2] = 1
    seg[2, 2] = 1              # touches the square diagonally
    seg[3:5, 3:5] = 1
    seg[4, 0] = 1
    assert keep_largest_components(seg)[0].sum() == 9                    # full connectivity: one 9-pixel piece
    assert keep_largest_components(seg, connectivity=1)[0].sum() == 4    # faces only: a 4-pixel square


def test_largest_component_3d_anisotropic_with_cyst_label_rule():
    tumour, cyst = 2, 3
    seg = np.zeros((6, 30, 30), np.uint8)
    seg[0:4, 1:12, 1:12] = cyst    # 484 voxels of cyst ...
    seg[0:4, 12:13, 1:6] = tumour  # ... with a 20-voxel tumour fringe: largest component, mostly cyst
    seg[1:4, 18:25, 18:25] = tumour  # 147 voxels: the tumour
    seg[5, 27:29, 27:29] = tumour    # 4 voxels
    seg[5, 0:2, 25:27] = 1           # kidney, one component
    out, rep = keep_largest_components(seg, cyst_rule="label", cyst_label=cyst)
    assert rep[tumour]["sizes"] == [504, 147, 4] and rep[tumour]["largest_is_cyst"] and rep[tumour]["kept"] == 1
    assert (out == tumour).sum() == 147 and out[1:4, 18:25, 18:25].all()
    assert (out == cyst).sum() == 484          # cysts are never removed
    assert (out == 1).sum() == 4 and cyst not in rep
    # without the rule the fringe attached to the cyst would not matter: plain per-label largest component
    plain, _ = keep_largest_components(seg)
    assert (plain == tumour).sum() == 147 and (plain == cyst).sum() == 484
    # binary 3D with the intensity rule, anisotropic spacing after closing (chain)
    rng = np.random.default_rng(1)
    fg = np.zeros((6, 30, 30), np.float32)
    fg[0:5, 2:16, 2:16] = 0.9          # large fluid cyst
    fg[1:4, 18:27, 18:27] = 0.9        # zone, split by a 1-pixel in-plane gap
    fg[1:4, 18:27, 22] = 0.0
    img = rng.normal(-80, 5, fg.shape)
    img[0:5, 2:16, 2:16] = 5 + rng.normal(0, 3, (5, 14, 14))
    img[1:4, 18:27, 18:27] = 30 + rng.normal(0, 30, (3, 9, 9))
    chain = PostprocessingChain([Threshold(), Closing(1.0, True), LargestComponent(cyst_rule="intensity")])
    res = chain.apply(binary_probs(fg), image=img, spacing=(4.0, 0.8, 0.8))
    assert res.segmentation[1:4, 19:26, 18:27].all()     # gap closed, then kept in place of the cyst
    assert not res.segmentation[:, 2:16, 2:16].any() and res.segmentation.sum() >= 3 * 79
    assert res.report[-1]["labels"][1]["largest_is_cyst"]


# ----------------------------------------------------------------------------------------------- chain / JSON
def test_chain_json_round_trip_gives_identical_outputs(tmp_path):
    rng = np.random.default_rng(2)
    fg = np.clip(np.pad(np.ones((10, 12)), 4) * 0.8 + rng.normal(0, 0.15, (18, 20)), 0, 1)[None]
    image = rng.normal(0, 30, fg.shape)
    chain = PostprocessingChain.paper000(size=(51, 79), radius_mm=1.5, cyst_rule="intensity",
                                         fluid_window=[-5.0, 25.0], max_std=12.0)
    written = chain.save(tmp_path)
    assert written == tmp_path / CHAIN_FILENAME
    d = json.loads(written.read_text())
    assert [s["step"] for s in d["steps"]] == ["threshold", "closing", "largest_component", "fill_holes",
                                               "minimum_size", "resize_mask"]
    assert d["steps"][0]["value"] == 0.4 and d["steps"][2]["fluid_window"] == [-5.0, 25.0]
    back = PostprocessingChain.load(tmp_path)
    assert back == chain and back.to_dict() == chain.to_dict()
    a = chain.apply(binary_probs(fg[0])[:, None], image=image, spacing=(999.0, 1.0, 1.0))
    b = back.apply(binary_probs(fg[0])[:, None], image=image, spacing=(999.0, 1.0, 1.0))
    np.testing.assert_array_equal(a.segmentation, b.segmentation)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.segmentation.shape == (1, 51, 79) and a.spacing[1:] == pytest.approx((18 / 51, 20 / 79))
    assert a.segmentation.any()


def _cv2_lanczos(arr, size):
    import cv2

    return cv2.resize(np.asarray(arr, np.float32), (size[1], size[0]), interpolation=cv2.INTER_LANCZOS4)


def test_paper000_resizes_the_cleaned_mask_last_not_the_probabilities_first(tmp_path):
    """Paper 000 section 2.3: threshold 0.4 -> closing -> largest component -> (holes, minimum size) -> the
    cleaned mask resized with Lanczos-4 (then 0.5) -> 8-bit BMP. The authors' notebook resizes the
    probabilities first; on this case the two orders give different masks and the chain gives the paper's."""
    fg = np.zeros((12, 14), np.float32)
    fg[3:9, 4:11] = 0.45  # above the 0.4 threshold, below 0.5
    fg[6, 7] = 0.1        # a hole, filled after the largest component
    fg[0, 0:2] = 0.9      # a second, smaller component, dropped
    size = (51, 79)
    res = PostprocessingChain.paper000(size=size, radius_mm=0.0, min_size=0).apply(binary_probs(fg)[:, None])
    # reference, step by step with scipy and OpenCV
    from scipy import ndimage

    mask = fg >= 0.4
    comp, _ = ndimage.label(mask, np.ones((3, 3)))
    mask = comp == np.argmax(np.bincount(comp.ravel())[1:]) + 1
    mask = ndimage.binary_fill_holes(mask)
    grown = _cv2_lanczos(mask, size)
    last = grown >= 0.5
    first = _cv2_lanczos(fg, size) >= 0.4  # the authors' order (their later clean-up would not restore it)
    ours = res.segmentation[0].astype(bool)
    ambiguous = np.abs(grown - 0.5) < 1e-4  # float32 rounding of OpenCV against ours
    assert ((ours != last) & ~ambiguous).sum() == 0
    assert (first != last).sum() > 100 and (ours != first).sum() > 100
    assert res.segmentation.shape == (1, *size)
    assert [r["step"] for r in res.report][-1] == "resize_mask"
    # the old order stays available as an explicit chain
    old = PostprocessingChain([Resize(list(size)), Threshold(0.4), LargestComponent()]).apply(binary_probs(fg)[:, None])
    assert (old.segmentation[0].astype(bool) != last).sum() > 100
    write_kaz_bmp(res.segmentation, tmp_path / "KAZ_P001_a000.bmp")
    with Image.open(tmp_path / "KAZ_P001_a000.bmp") as im:
        assert im.format == "BMP" and im.mode == "L" and im.size == (79, 51)
        arr = np.asarray(im)
    assert set(np.unique(arr).tolist()) == {0, 255}
    assert ((arr == 255) == (res.segmentation[0] > 0)).all()


def test_minimum_size_counts_pixels_of_the_output_grid():
    seg = np.zeros((20, 20), np.uint8)
    seg[1:4, 1:4] = 1      # 9 pixels
    seg[10:15, 10:15] = 1  # 25 pixels
    seg[0, 19] = 2
    out, removed = remove_small_components(seg, 10)
    assert out[1:4, 1:4].sum() == 0 and out[10:15, 10:15].all() and out[0, 19] == 0
    assert removed == {1: 9, 2: 1}
    # 50 pixels of a 40 x 40 output grid are 12.5 pixels of this 20 x 20 grid: the 9-pixel square goes
    step = MinimumSize(50, [40, 40])
    assert step.voxels((1, 20, 20)) == pytest.approx(12.5)
    res = PostprocessingChain([Argmax(), step]).apply(np.stack([seg == 0, seg == 1, seg == 2]).astype(np.float32))
    assert res.segmentation.sum() == 25


def test_resize_mask_with_several_labels_and_3d():
    seg = np.zeros((3, 8, 8), np.uint8)
    seg[:, 1:4, 1:4], seg[:, 4:7, 4:7] = 1, 2
    res = PostprocessingChain([Argmax(), ResizeMask([16, 16])]).apply(
        np.stack([seg == 0, seg == 1, seg == 2]).astype(np.float32), spacing=(3.0, 1.0, 1.0))
    assert res.segmentation.shape == (3, 16, 16) and res.spacing == pytest.approx((3.0, 0.5, 0.5))
    assert set(np.unique(res.segmentation).tolist()) == {0, 1, 2}
    assert res.segmentation[:, 4:6, 4:6].min() == 1 and res.segmentation[:, 10:12, 10:12].min() == 2
    assert (res.segmentation[0] == res.segmentation[2]).all()


def test_paper000_uses_the_models_cyst_label_when_the_dataset_has_one():
    kits = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    step = [s for s in PostprocessingChain.paper000(labels=kits).steps if isinstance(s, LargestComponent)][0]
    assert (step.cyst_rule, step.cyst_label) == ("label", 3)
    step = [s for s in PostprocessingChain.paper000(labels={"background": 0, "kaz": 1}).steps
            if isinstance(s, LargestComponent)][0]
    assert step.cyst_rule == "none"
    assert [type(s) for s in PostprocessingChain.paper000(size=[510, 788]).steps] == [
        Threshold, Closing, LargestComponent, FillHoles, MinimumSize, ResizeMask]
    # on a 3-class map: the largest kidney component is mostly cyst, so the second largest kidney blob is kept
    probs = np.zeros((4, 1, 20, 30), np.float32)
    probs[0] = 1.0
    big, small = (slice(2, 14), slice(2, 14)), (slice(5, 10), slice(20, 26))
    probs[:, 0][(slice(None), *big)] = np.array([0, 0.3, 0, 0.7])[:, None, None]
    probs[:, 0][(slice(None), *small)] = np.array([0, 1.0, 0, 0])[:, None, None]
    probs[:, 0, 2:14, 2:4] = np.array([0, 1.0, 0, 0])[:, None, None]  # kidney rim on the cyst
    seg = PostprocessingChain.paper000(labels=kits, radius_mm=0.0, min_size=0).apply(probs).segmentation[0]
    assert (seg[small] == 1).all() and (seg[2:14, 2:4] == 0).all() and (seg[2:14, 4:14] == 3).all()


def test_bad_chains_and_inputs_raise_clear_errors_and_write_nothing(tmp_path):
    with pytest.raises(KazError, match="exactly one"):
        PostprocessingChain([Closing()])
    with pytest.raises(KazError, match="out of order"):
        PostprocessingChain([Threshold(), Resize([4, 4])])
    with pytest.raises(KazError, match="cyst_label"):
        LargestComponent(cyst_rule="label")
    with pytest.raises(KazError, match="threshold"):
        Threshold(1.5)
    p = binary_probs(np.zeros((1, 8, 8)))
    chain = PostprocessingChain([Threshold(), LargestComponent(cyst_rule="intensity")])
    with pytest.raises(KazError, match="needs the input image"):
        chain.apply(p)
    with pytest.raises(KazError, match="shape"):
        chain.apply(p, image=np.zeros((1, 8, 9)))
    nan = p.copy()
    nan[1, 0, 0, 0] = np.nan
    with pytest.raises(KazError, match="NaN"):
        chain.apply(nan, image=np.zeros((1, 8, 8)))
    with pytest.raises(KazError, match=r"\[0, 1\]"):
        chain.apply(p * 3 - 1, image=np.zeros((1, 8, 8)))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "nnunet_kaz.postprocessing",
                                                   "steps": [{"step": "dilate"}]}))
    with pytest.raises(KazError, match="unknown step 'dilate'"):
        PostprocessingChain.load(tmp_path / "bad.json")
    with pytest.raises(KazError, match="2D"):
        write_kaz_bmp(np.zeros((2, 4, 4)), tmp_path / "x.bmp")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["bad.json"]
