"""Issue 15: the memory-bounded accumulation and export give today's outputs, and the GPU fallbacks (accumulators
in CPU memory, a smaller MC batch, the retry after an out-of-memory error) are exercised on the CPU by forcing them.

The reference is computed independently of the streaming code: the predictor's own seeded logits are recorded as
it produces them, turned into probabilities by numpy (float64 softmax), accumulated over the whole volume by numpy
and brought to the input geometry the straightforward way (all channels resampled at once by the configuration's
nnU-Net resampling function, put back into the crop, transposed back).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_kaz.inference import UncertaintyPredictor, parse_member
from nnunet_kaz.inference.export import GeometryRestorer
from nnunet_kaz.inference.predictor import OUT_OF_MEMORY, case_placement
from nnunet_kaz.uncertainty import class_scores
from nnunet_kaz.uncertainty.streaming import AccumulatedStats, accumulator_bytes_per_voxel
from tests.conftest import nnunet_env, run, shrink_plans

pytestmark = pytest.mark.integration

DROPOUT = "nnUNetTrainerDropout_p02_debug"
KITS_ID, KITS = 992, "Dataset992_KitsMemory"
TEST_SHAPE, TEST_SPACING = (11, 41, 37), (3.1, 0.9, 0.7)  # resampled to the plans' spacing, not patch-sized


@pytest.fixture(scope="module")
def kits_member(tmp_path_factory):
    """A 3D dropout member trained by `nnUNetv2_train` on a tiny kits3d phantom, and one anisotropic test volume
    of another spacing (so the export resamples) and a size no patch divides."""
    from nnunet_kaz.datasets import kits3d_case, make_kits3d_dataset

    root = tmp_path_factory.mktemp("kitsmem")
    env = nnunet_env(root)
    make_kits3d_dataset(root / "nnUNet_raw" / KITS, n_cases=5, seed=2, shape=(16, 32, 32), spacing=(2.5, 0.8, 0.8))
    run(["nnUNetv2_plan_and_preprocess", "-d", str(KITS_ID), "-c", "3d_fullres", "-np", "1"],
        dict(env, nnUNet_n_proc_DA="1"))
    shrink_plans(root / "nnUNet_preprocessed", KITS, "nnUNetPlans", "nnUNetTinyPlans", 8)
    run(["nnUNetv2_train", str(KITS_ID), "3d_fullres", "0", "-tr", DROPOUT, "-p", "nnUNetTinyPlans", "-device",
         "cpu"], env)
    image, _ = kits3d_case(5, 0, TEST_SHAPE, TEST_SPACING)
    (root / "in").mkdir()
    img = sitk.GetImageFromArray(image)
    img.SetSpacing(tuple(reversed(TEST_SPACING)))
    sitk.WriteImage(img, str(root / "in" / "VOL_0000.nii.gz"))
    return root / "nnUNet_results" / KITS / f"{DROPOUT}__nnUNetTinyPlans__3d_fullres", root / "in"


@pytest.fixture(scope="module", params=["2d", "3d"])
def member(request, tiny_kaz):
    if request.param == "2d":
        return tiny_kaz.train(DROPOUT), tiny_kaz.raw / "imagesTs"
    return request.getfixturevalue("kits_member")


def predictor_of(folder, **kw) -> UncertaintyPredictor:
    return UncertaintyPredictor([parse_member(f"{folder}:0"), parse_member(f"{folder}:0")], mc=3, device="cpu",
                                verbose=False, **kw)


def first_image(images) -> str:
    return str(sorted(images.glob("*_0000.*"))[0])


def recorded_prediction(predictor, images, out_stem):
    """`predict_case` on the first image, recording the logits of every batch as the sliding window returns them:
    (result, the preprocessing properties, [float64 (B, C, *preprocessed) logits per batch])."""
    import nnunet_kaz.inference.predictor as module

    logits = []
    own = module.predict_samples

    def recording(*args, emit=None, **kwargs):  # the slabs the stitching hands to the accumulators, put together
        parts = []

        def rec(rows, part):
            parts.append(part.double().numpy().copy())
            emit(rows, part)

        out = own(*args, emit=rec, **kwargs)
        logits.append(np.concatenate(parts, axis=2))
        return out

    module.predict_samples = recording
    try:
        result = predictor.predict_case([first_image(images)], out_stem)
    finally:
        module.predict_samples = own
    _, props = predictor.preprocess([first_image(images)])
    return result, props, logits


def to_input_geometry(predictor, props, array: np.ndarray, fill: float = 0.0, background: bool = False):
    """(K, *preprocessed) -> (K, *input): every channel at once through nnU-Net's resampling, as before issue 15."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
    shape = props["shape_after_cropping_and_before_resampling"]
    current = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
    res = np.asarray(cm.resampling_fn_probabilities(array.astype(np.float32), shape, current, spacing_t), np.float32)
    if background:
        res = np.clip(res, 0, 1)
        res /= np.clip(res.sum(0, keepdims=True), 1e-8, None)
    full = np.full((res.shape[0], *props["shape_before_cropping"]), fill, dtype=np.float32)
    if background:
        full[0] = 1.0
    full = insert_crop_into_image(full, res, props["bbox_used_for_cropping"])
    return full.transpose([0] + [i + 1 for i in pm.transpose_backward])


def test_outputs_equal_a_whole_volume_numpy_accumulation_of_the_same_samples(member, tmp_path):
    """Mean, variance, entropy, MI and every score, 2D and resampled anisotropic 3D, 2 models x 3 samples in
    batches of 2: float32 streaming against float64 numpy, probabilities / entropy / MI within 2e-5 absolute,
    variance within 1e-3 relative + 1e-6, scores within 1e-4 relative (the pairwise-Dice counts exactly)."""
    folder, images = member
    predictor = predictor_of(folder, mc_batch=2)
    result, props, logits = recorded_prediction(predictor, images, tmp_path / "case")
    z = np.concatenate(logits)                                   # (6, C, *preprocessed)
    assert z.shape[0] == 6
    s = np.exp(z - z.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)                                 # softmax in float64
    assert not np.allclose(s[0], s[1])                           # MC samples differ
    n_classes = s.shape[1]
    h = -(s * np.log(np.clip(s, 1e-300, None))).sum(1) / np.log(n_classes)  # normalised entropy per sample

    probs = to_input_geometry(predictor, props, s.mean(0), background=True)
    np.testing.assert_allclose(result["probabilities"], probs, atol=2e-5)
    with np.load(tmp_path / "case.npz") as f:
        np.testing.assert_array_equal(f["probabilities"], result["probabilities"])
    entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(0) / np.log(n_classes)
    np.testing.assert_allclose(result["entropy"], entropy, atol=2e-5)
    mi = np.clip(entropy - to_input_geometry(predictor, props, h.mean(0)[None])[0], 0, None)
    np.testing.assert_allclose(result["mutual_information"], mi, atol=2e-5)
    assert result["mutual_information"].max() > 1e-3
    np.testing.assert_allclose(result["variance"], to_input_geometry(predictor, props, s.var(0)), rtol=1e-3,
                               atol=1e-6)

    masks = s >= 0.5
    volumes = masks.reshape(6, n_classes, -1).sum(-1)
    inter = {c: np.array([[(a & b).sum() for b in masks[:, c]] for a in masks[:, c]]) for c in range(1, n_classes)}
    ref = AccumulatedStats(6, s.mean(0), s.var(0), (s * np.log(np.clip(s, 1e-300, None))).mean(0), h.mean(0),
                           volumes, intersections=inter)
    u = to_input_geometry(predictor, props, -ref.mean_plogp)
    ratio = GeometryRestorer(predictor.plans_manager, predictor.configuration_manager, props).voxel_volume_ratio
    for row, (channel, label) in zip(result["scores"], predictor._foreground()):
        expected = class_scores(ref, channel, probs[channel], u[channel], ratio)
        assert row["label"] == label and row["n_samples"] == 6
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (label, key)


def test_one_member_without_mc_equals_numpy_on_the_whole_volume(member, tmp_path, monkeypatch):
    """One sample (no accumulators): the maps computed slab by slab (slabs of a few rows forced here) equal numpy
    on the whole volume; mutual information and variance are exactly 0 (one sample is its own mean)."""
    from nnunet_kaz.uncertainty import measures
    from nnunet_kaz.uncertainty.streaming import StreamingStats

    monkeypatch.setattr(measures, "SLAB_VOXELS", 64)
    monkeypatch.setattr(StreamingStats, "SLAB_VOXELS", 64)
    folder, images = member
    predictor = UncertaintyPredictor([parse_member(f"{folder}:0")], mc=0, device="cpu", verbose=False)
    result, props, logits = recorded_prediction(predictor, images, tmp_path / "case")
    z = logits[0][0]
    s = np.exp(z - z.max(0, keepdims=True))
    s /= s.sum(0, keepdims=True)
    probs = to_input_geometry(predictor, props, s, background=True)
    np.testing.assert_allclose(result["probabilities"], probs, atol=2e-5)
    entropy = -(probs * np.log(np.clip(probs, 1e-30, None))).sum(0) / np.log(s.shape[0])
    np.testing.assert_allclose(result["entropy"], entropy, atol=2e-5)
    assert not result["mutual_information"].any() and not result["variance"].any()
    assert result["variance"].shape == result["probabilities"].shape
    assert result["mutual_information"].shape == result["entropy"].shape
    with np.load(tmp_path / "case_uncertainty.npz") as f:
        assert f["variance"].shape == result["probabilities"].shape and not f["variance"].any()
    u = to_input_geometry(predictor, props, -(s * np.log(np.clip(s, 1e-300, None))))
    masks = s >= 0.5
    ref = AccumulatedStats(1, s, np.zeros_like(s), None, None, masks.reshape(1, s.shape[0], -1).sum(-1))
    ratio = GeometryRestorer(predictor.plans_manager, predictor.configuration_manager, props).voxel_volume_ratio
    for row, (channel, label) in zip(result["scores"], predictor._foreground()):
        expected = class_scores(ref, channel, probs[channel], u[channel], ratio)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (label, key)


def test_by_slabs_equals_the_function_on_the_whole_array():
    from nnunet_kaz.uncertainty.measures import binary_entropy, by_slabs, normalized_entropy

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(7, 5, 3)).transpose(3, 0, 1, 2).astype(np.float32)
    for slab in (1, 15, 16, 1000):
        np.testing.assert_array_equal(by_slabs(normalized_entropy, p, axis=1, slab_voxels=slab), normalized_entropy(p))
        got = by_slabs(binary_entropy, p[1], slab_voxels=slab)
        assert got.dtype == binary_entropy(p[1]).dtype
        np.testing.assert_array_equal(got, binary_entropy(p[1]))


def _batches_run(predictor) -> list[int]:
    """The batch of every forward call the predictor's networks will make (a forward pre-hook)."""
    calls = []
    for net in {id(m.network): m.network for m in predictor.models}.values():
        net.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_a_memory_budget_sets_the_batch_the_network_runs(kits_member, tmp_path):
    """`device_memory` forces on the CPU what a GPU meets, and the network's forward calls show what ran (2 models
    x 3 samples, batches of up to 3 asked for). The budgets are the case's `device_bytes` for batches of 3 and 2,
    and one byte less than one sample needs (`device_bytes` is checked against what torch really allocates in
    test_gpu_paths.test_device_bytes_are_what_torch_allocates): batches of 3; of 2 then 1; and, the case not
    fitting, accumulators in CPU memory at batch 1, whose outputs equal those of an unbounded run asked for batches
    of 1 (the same samples) bit for bit. (On the CPU both placements are CPU memory: test_gpu_paths'
    test_no_pinned_memory_when_the_accumulators_go_to_cpu_memory drives the placement with a CUDA device faked.)"""
    from nnunet_kaz.inference.predictor import device_bytes

    folder, images = kits_member
    image = first_image(images)
    free = predictor_of(folder, mc_batch=1)
    data, _ = free.preprocess([image])
    voxels, classes = int(np.prod(data.shape[1:])), free.label_manager.num_segmentation_heads
    window = free.window_voxels(data.shape[1:])

    def budget(batch: int) -> int:
        return device_bytes(classes, voxels, window, 6, batch, int(data.shape[0]), free.regions)

    for room, expected in ((budget(3), 3), (budget(2), 2), (budget(1) - 1, 1)):
        predictor = predictor_of(folder, mc_batch=3, device_memory=room)
        calls = _batches_run(predictor)
        predictor.sample_case(data, "VOL")
        assert predictor.case_mc_batch == expected and max(calls) == expected
        assert set(calls) == ({3} if expected == 3 else {2, 1} if expected == 2 else {1})
    for d in ("free", "forced"):
        (tmp_path / d).mkdir()
    a = free.predict_case([image], tmp_path / "free" / "VOL")  # same case name: same dropout streams
    b = predictor.predict_case([image], tmp_path / "forced" / "VOL")
    for key in ("probabilities", "entropy", "mutual_information", "variance", "segmentation"):
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    for x, y in zip(a["scores"], b["scores"]):
        assert x == pytest.approx(y, nan_ok=True)


def test_out_of_memory_above_mc_batch_1_redoes_the_case_at_batch_1_with_one_warning(kits_member, tmp_path):
    """Issue 23.1: a network that raises torch's out-of-memory error for any batch above 1 (a forward pre-hook on
    the real member: the first attempt runs batches of 3); the run goes on, the case is redone once at MC batch 1
    with one warning, and its outputs equal a run asked for batches of 1 (the same samples) bit for bit."""
    folder, images = kits_member
    normal = predictor_of(folder, mc_batch=1)
    normal.predict_folder(images, tmp_path / "normal")
    retried = predictor_of(folder, mc_batch=3)
    calls = []

    def over_one(module, args):
        calls.append(args[0].shape[0])
        if args[0].shape[0] > 1:
            raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 20.00 GiB")

    for net in {id(m.network): m.network for m in retried.models}.values():
        net.register_forward_pre_hook(over_one)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retried.predict_folder(images, tmp_path / "retried")
    oom = [w for w in caught if "out of memory" in str(w.message)]
    assert len(oom) == 1 and "VOL" in str(oom[0].message)
    assert calls[0] == 3 and set(calls[1:]) == {1} and retried.case_mc_batch == 1
    for name in ("VOL.npz", "VOL_uncertainty.npz"):
        with np.load(tmp_path / "normal" / name) as x, np.load(tmp_path / "retried" / name) as y:
            for key in x.files:
                np.testing.assert_array_equal(x[key], y[key])
    with open(tmp_path / "normal" / "VOL_scores.json") as x, open(tmp_path / "retried" / "VOL_scores.json") as y:
        assert x.read() == y.read()


def test_an_out_of_memory_error_with_nothing_left_to_give_up_ends_the_case(kits_member):
    """Already at MC batch 1 with the accumulators in CPU memory: the error is raised, not retried, no warning."""
    folder, images = kits_member
    predictor = predictor_of(folder, mc_batch=1)

    def always(module, args):
        raise OUT_OF_MEMORY("out of memory")

    predictor.models[0].network.register_forward_pre_hook(always)
    data, _ = predictor.preprocess([first_image(images)])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(OUT_OF_MEMORY):
        warnings.simplefilter("always")
        predictor.sample_or_retry(data, "VOL")
    assert not [w for w in caught if "out of memory" in str(w.message)]


def test_case_placement_by_hand():
    """4 classes, 10 samples, 1 input channel, 1000 voxels of which a window of 100 (a patch-deep slab): the image
    4 and the accumulators 12 x 4 = 48 bytes per voxel, 52,000; per window voxel the float16 weights 2 and 2 x 4 = 8
    per sample of a batch (float16 logits): 53,000 for one sample, 800 more for each further one. One sample
    alone: image 4,000 + window (8 + 2) x 100 = 5,000 (its mean is made in CPU memory). Regions: 4 more per
    voxel (the samples' entropies)."""
    assert accumulator_bytes_per_voxel(4, 10) == 48 and accumulator_bytes_per_voxel(4, 10, regions=True) == 52
    assert accumulator_bytes_per_voxel(4, 1) == 16
    voxels, window = 1000, 100
    assert case_placement(4, voxels, 10, 8, float("inf"), window_voxels=window) == (True, 8)
    assert case_placement(4, voxels, 10, 8, 53_000 + 2 * 800 + 5, window_voxels=window) == (True, 3)
    assert case_placement(4, voxels, 10, 8, 53_000 - 1, window_voxels=window) == (False, 1)  # CPU memory
    assert case_placement(4, voxels, 10, 8, 57_000, regions=True, window_voxels=window) == (True, 1)
    assert case_placement(4, voxels, 1, 1, 5_000, window_voxels=window) == (True, 1)        # one sample
    assert case_placement(4, voxels, 1, 1, 5_000 - 1, window_voxels=window) == (False, 1)
    assert case_placement(4, voxels, 10, 2, 10 ** 9, window_voxels=window) == (True, 2)     # never above the request
