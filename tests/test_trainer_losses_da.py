"""Issue 3 item 6: weighted cross-entropy (paper 004's wcc) and paper 000's augmentation recipe."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_kaz.trainers import XBoundNetTrainer_paperDA
from nnunet_kaz.trainers.augmentation import (PaperDARecipe, PaperSpatialTransform, SpatialDraw, centered_grid,
                                              paper_initial_patch_size, to_grid_sample_grid)
from nnunet_kaz.trainers.weighted_ce import (CLASS_WEIGHTS_FILE, WeightedCEMixin, build_weighted_ce_loss,
                                             count_classes, inverse_frequency_weights)

LOGITS = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]],
                        [[-1.0, 1.5], [0.2, 3.0]],
                        [[0.3, 0.1], [-2.0, 1.0]]]])  # (1, 3, 2, 2)


def _hand_wce(logits: torch.Tensor, target: list[list[int]], w: list[float], ignore: int | None) -> float:
    """sum_i w_{y_i} (-log p_{y_i}) / sum_i w_{y_i} over the non-ignored pixels, in plain Python."""
    num = den = 0.0
    for i in range(2):
        for j in range(2):
            y = target[i][j]
            if y == ignore:
                continue
            z = [logits[0, c, i, j].item() for c in range(3)]
            log_p = z[y] - math.log(sum(math.exp(v) for v in z))
            num += w[y] * -log_p
            den += w[y]
    return num / den


@pytest.mark.parametrize("target,ignore", [([[0, 1], [2, 1]], None), ([[0, 3], [2, 1]], 3)])
def test_weighted_ce_equals_hand_computation_and_torch(target, ignore):
    w = [0.5, 1.0, 1.5]
    y = torch.tensor(target, dtype=torch.float32)[None, None]  # nnU-Net's (b, 1, x, y) float target
    loss = build_weighted_ce_loss(w, ignore_label=ignore)(LOGITS, y).item()
    assert loss == pytest.approx(_hand_wce(LOGITS, target, w, ignore), rel=1e-6)
    reference = torch.nn.CrossEntropyLoss(weight=torch.tensor(w), ignore_index=-100 if ignore is None else ignore)
    assert loss == pytest.approx(reference(LOGITS, y[:, 0].long()).item(), rel=1e-6)
    unweighted = torch.nn.functional.cross_entropy(LOGITS, y[:, 0].long(), ignore_index=ignore or -100).item()
    assert abs(loss - unweighted) > 1e-3  # the weights matter


def test_inverse_frequency_weights_on_a_tiny_label_set():
    segs = [np.array([[0, 0, 0], [1, -1, 4]]), np.array([[0, 2, 2], [4, 4, 0]])]  # 4 is the ignore label
    counts = count_classes(segs, num_classes=4, ignore_label=4)
    assert counts.tolist() == [5 + 1, 1, 2, 0]  # -1 counts as background; class 3 is absent
    w = inverse_frequency_weights(counts)
    inv = np.array([1 / 6, 1, 1 / 2, 1])  # absent class 3 gets the largest weight of the present ones (1/1)
    assert w == pytest.approx(inv / inv.mean())
    assert w.mean() == pytest.approx(1.0) and w[1] / w[2] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="label 5"):
        count_classes([np.array([0, 5])], num_classes=3, ignore_label=4)
    with pytest.raises(ValueError, match="no labelled voxels"):
        inverse_frequency_weights([0, 0])


class _StubTrainer(WeightedCEMixin):
    """The attributes of nnUNetTrainer that WeightedCEMixin._build_loss reads."""

    def __init__(self, folder: Path, keys: list[str], has_regions: bool = False, ignore_label=None):
        self.label_manager = type("LM", (), dict(has_regions=has_regions, num_segmentation_heads=3,
                                                 ignore_label=ignore_label))()
        self.output_folder, self.preprocessed_dataset_folder = str(folder / "fold_0"), str(folder / "pre")
        self.keys, self.local_rank, self.device, self.is_ddp = keys, 0, torch.device("cpu"), False
        self.enable_deep_supervision, self.splits = True, 0
        self.log: list[str] = []

    def do_split(self):
        self.splits += 1
        return self.keys, []

    def print_to_log_file(self, *args, **kwargs):
        self.log.append(" ".join(map(str, args)))

    def _get_deep_supervision_scales(self):
        return [[1, 1], [0.5, 0.5], [0.25, 0.25]]

    def _do_i_compile(self):
        return False


def test_trainer_weights_come_from_the_preprocessed_training_cases(tmp_path):
    pre = tmp_path / "pre"
    pre.mkdir()
    segs = {"a": np.array([[[0, 0, 1, 1]]]), "b": np.array([[[0, 0, 0, -1]]]), "val": np.array([[[2, 2, 2, 2]]])}
    for key, seg in segs.items():  # nnU-Net's numpy format: data and seg arrays of shape (c, x, y)
        nnUNetDatasetNumpy.save_case(np.zeros((1, 1, 4), np.float32), seg.astype(np.int8), {}, str(pre / key))
    trainer = _StubTrainer(tmp_path, ["b", "a"])
    loss = trainer._build_loss()
    assert isinstance(loss, DeepSupervisionWrapper) and loss.weight_factors == pytest.approx((4 / 6, 2 / 6, 0))
    record = json.loads((tmp_path / "fold_0" / CLASS_WEIGHTS_FILE).read_text())
    assert record["voxel_counts"] == [6, 2, 0] and record["training_cases"] == ["a", "b"]  # "val" not counted
    expected = inverse_frequency_weights([6, 2, 0])
    assert loss.loss.weight.tolist() == pytest.approx(expected.tolist())
    # resuming with the same training cases reuses the file: corrupting the data would otherwise change weights
    (pre / "a.npz").unlink()
    assert _StubTrainer(tmp_path, ["a", "b"])._build_loss().loss.weight.tolist() == pytest.approx(expected.tolist())


def test_trainer_explicit_weights_and_regions_refused(tmp_path):
    stub = type("Explicit", (_StubTrainer,), {"class_weights": (1.0, 2.0, 3.0)})(tmp_path, ["x"])
    assert stub._build_loss().loss.weight.tolist() == [1.0, 2.0, 3.0] and stub.splits == 0
    with pytest.raises(ValueError, match="3 non-negative"):
        type("Bad", (_StubTrainer,), {"class_weights": (1.0, 2.0)})(tmp_path, ["x"])._build_loss()
    with pytest.raises(ValueError, match="regions"):
        _StubTrainer(tmp_path, ["x"], has_regions=True)._build_loss()


# --- paper 000 augmentation --------------------------------------------------------------------------------
def _nnunet_call(patch, ds_scales, **kwargs):
    """Call get_training_transforms exactly as nnUNetTrainer.get_dataloaders does."""
    rotation, mirror = (-math.pi, math.pi), tuple(range(len(patch)))
    return XBoundNetTrainer_paperDA.get_training_transforms(patch, rotation, ds_scales, mirror, False,
                                                            use_mask_for_norm=[False], is_cascaded=False,
                                                            foreground_labels=[1, 2], **kwargs)


def _batch(shape, labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn((1, *shape), generator=g),
            "segmentation": torch.randint(-1, labels, (1, *shape), generator=g).to(torch.int16)}


def test_paper_da_pipeline_2d_keys_shapes_and_deep_supervision():
    patch = (32, 32)
    transforms = _nnunet_call(patch, [[1, 1], [0.5, 0.5], [0.25, 0.25]])
    assert isinstance(transforms, ComposeTransforms) and isinstance(transforms.transforms[0], PaperSpatialTransform)
    np.random.seed(1), torch.manual_seed(1)
    for _ in range(20):
        out = transforms(**_batch(paper_initial_patch_size(patch)))
        assert set(out) == {"image", "segmentation"} and out["image"].shape == (1, 32, 32)
        assert [tuple(s.shape) for s in out["segmentation"]] == [(1, 32, 32), (1, 16, 16), (1, 8, 8)]
        assert out["segmentation"][0].min() >= 0  # nnU-Net's RemoveLabel(-1 -> 0) is in the tail


def test_paper_da_pipeline_3d_regions_ignore_label_and_in_plane_only():
    patch = (6, 24, 24)
    initial = paper_initial_patch_size(patch)
    assert initial[0] == 6 and initial[1] > 24 and initial[2] > 24  # axis 0 is never resampled
    transforms = _nnunet_call(patch, None, regions=[(1, 2), 2], ignore_label=3)
    np.random.seed(2), torch.manual_seed(2)
    out = transforms(**_batch(initial, labels=4))
    assert out["image"].shape == (1, *patch) and out["segmentation"].shape == (3, *patch)  # 2 regions + ignore
    # forced spatial transforms keep every slice in its own plane: slice k of a volume filled with k stays k
    spatial = PaperSpatialTransform(patch, PaperDARecipe(p_spatial=1.0))
    volume = torch.arange(6.0)[None, :, None, None].expand(1, 6, *initial[1:]).contiguous()
    for _ in range(10):
        res = spatial(image=volume.clone())["image"]
        assert res[0, :, 12, 12].tolist() == pytest.approx(list(range(6)), abs=1e-4)


@pytest.mark.parametrize("shape", [(7, 10), (5, 6, 9)])
def test_own_sampling_grid_equals_torch_affine_grid_identity(shape):
    """The grid built without batchgeneratorsv2's private helpers: on a patch of the input's own shape the
    identity grid is torch's affine_grid(identity, align_corners=False), and grid_sample returns the input."""
    grid = to_grid_sample_grid(centered_grid(shape), shape)
    dim = len(shape)
    theta = torch.eye(dim, dim + 1)[None]
    ref = torch.nn.functional.affine_grid(theta, [1, 1, *shape], align_corners=False)[0]
    assert grid.shape == (*shape, dim) and torch.allclose(grid, ref, atol=1e-6)
    x = torch.randn(1, 1, *shape)
    out = torch.nn.functional.grid_sample(x, grid[None], align_corners=False)
    assert torch.allclose(out, x, atol=1e-5)
    # a smaller patch is the centred crop (3 pixels on odd axes, 2 on even ones): exact pixels, no interpolation
    size = [3 if s % 2 else 2 for s in shape]
    crop = to_grid_sample_grid(centered_grid(size), shape)
    ref_crop = x[(0, 0, *[slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(shape, size)])]
    got = torch.nn.functional.grid_sample(x, crop[None], align_corners=False)[0, 0]
    assert torch.allclose(got, ref_crop, atol=1e-5)


def test_paper_spatial_draws_are_exact_flips_and_shifts():
    spatial = PaperSpatialTransform((8, 8))
    x = torch.arange(64.0).reshape(1, 8, 8)
    for axis in (0, 1):
        params = spatial.params_for(SpatialDraw(flip_axis=axis), (8, 8))
        assert torch.allclose(spatial._apply_to_image(x, **params), torch.flip(x, (axis + 1,)), atol=1e-4)
    shifted = spatial._apply_to_image(x, **spatial.params_for(SpatialDraw(shift=(0.0, 2.0)), (8, 8)))
    assert torch.allclose(shifted[0, :, :-2], x[0, :, 2:], atol=1e-4) and (shifted[0, :, -2:] == 0).all()
    quarter = spatial._apply_to_image(x, **spatial.params_for(SpatialDraw(angle=math.pi / 2), (8, 8)))
    assert torch.allclose(quarter[0], torch.rot90(x[0], -1), atol=1e-4)


def test_paper_da_applies_spatial_and_contrast_transforms_about_30_percent_each():
    """Over 1500 seeded draws: a sample is spatially transformed iff its segmentation differs from the plain
    center crop; among those that are not, contrast was applied iff the image differs. Both near 0.3 (4 sd)."""
    patch, n = (24, 24), 1500
    initial = paper_initial_patch_size(patch)
    lo = [(i - p) // 2 for i, p in zip(initial, patch)]
    crop = (slice(None), slice(lo[0], lo[0] + patch[0]), slice(lo[1], lo[1] + patch[1]))
    base = _batch(initial)
    base["segmentation"].clamp_(min=0)
    transforms = _nnunet_call(patch, None)
    np.random.seed(3), torch.manual_seed(3)
    spatial = contrast = plain = 0
    for _ in range(n):
        out = transforms(image=base["image"].clone(), segmentation=base["segmentation"].clone())
        if not torch.equal(out["segmentation"], base["segmentation"][crop]):
            spatial += 1
            continue
        plain += 1
        contrast += not torch.equal(out["image"], base["image"][crop])
    assert abs(spatial / n - 0.3) < 4 * math.sqrt(0.21 / n)
    assert abs(contrast / plain - 0.3) < 4 * math.sqrt(0.21 / plain)


# --- real nnUNetv2_train runs ------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("trainer", ["nnUNetTrainerWCE_debug", "XBoundNetTrainerWCE_debug",
                                     "XBoundNetTrainer_paperDA_debug"])
def test_real_training_run_leaves_final_checkpoint(tiny_kaz, trainer):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    fold = tiny_kaz.train(trainer) / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and len(ckpt["logging"]["train_losses"]) == 2
    if "WCE" in trainer:  # weights = inverse frequencies of the fold's training cases, counted here by hand
        pre = tiny_kaz.root / "nnUNet_preprocessed" / "Dataset990_KazTiny"
        train_keys = json.loads((pre / "splits_final.json").read_text())[0]["train"]
        folder = str(pre / "nnUNetPlans_2d")
        dataset = infer_dataset_class(folder)(folder, train_keys)
        counts = np.zeros(2, np.int64)
        for key in train_keys:
            seg = np.asarray(dataset.load_case(key)[1][:])
            counts += [(seg <= 0).sum(), (seg == 1).sum()]
        record = json.loads((fold / CLASS_WEIGHTS_FILE).read_text())
        assert record["voxel_counts"] == counts.tolist()
        assert record["weights"] == pytest.approx((1 / counts / (1 / counts).mean()).tolist())
        assert record["weights"][1] > record["weights"][0]  # the ablation zone is the rarer class
    else:
        assert tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1)
        log = next(fold.glob("training_log_*.txt")).read_text()
        assert "paper 000 augmentation" in log

