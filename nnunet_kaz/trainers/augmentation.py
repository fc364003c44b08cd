"""Paper 000's augmentation recipe (section 3.1) as a batchgeneratorsv2 pipeline for nnU-Net trainers.

Recipe, per training sample (paper 000: "each slice had a 30% chance of undergoing one or more spatial
transformations ... independently, there was a 30% chance of a photometric adjustment"):
- with probability `p_spatial` (0.3) one or more spatial transforms: a non-empty subset of {flip, translation,
  rotation, zoom}, each member included with probability 1/2 and the draw repeated until the subset is not
  empty (so every one of the 15 non-empty subsets is equally likely);
  - flip: horizontal or vertical, one of the two in-plane axes chosen with probability 1/2 each;
  - translation: a shift ~ U(-0.1, 0.1) x the patch extent, drawn per in-plane axis;
  - rotation: an angle ~ U(-20, 20) degrees in the plane;
  - zoom: an isotropic in-plane magnification z ~ U(0.9, 1.1) (z > 1 enlarges the content);
- independently, with probability `p_contrast` (0.3), contrast scaling x' = mean + f (x - mean), f ~ U(0.8, 1.2),
  one f for all channels, clipped to the sample's range as nnU-Net's ContrastTransform does (preserve_range).

Every spatial transform is one affine resampling with nnU-Net's SpatialTransform machinery (bilinear image,
per-label bilinear argmax for the segmentation, padding seg -1 -> background). The sampling grid is built here
(`centered_grid`, `to_grid_sample_grid`): batchgeneratorsv2 has no public API for it, and its private helpers are
not used. What is still relied on is SpatialTransform's parameter contract (`get_parameters` returns
`center_location_in_pixels` and a grid_sample `grid` or None, which `_apply_to_image` / `_apply_to_segmentation`
consume), checked with batchgeneratorsv2 0.3.6; pyproject.toml pins the range. Without a spatial transform the
patch is only center-cropped, as nnU-Net does.

2D and 3D: the transforms act in the plane of the last two axes. In 3D every slice along axis 0 gets the same
2D transform (the paper's slice-wise recipe applied to a stack): rotation is about axis 0, the axis nnU-Net puts
first and keeps fixed in its own dummy-2D augmentation (the out-of-plane, usually the lowest-resolution axis), and
zoom and translation are in-plane; axis 0 is never resampled. Inference mirroring is restricted to the flipped
axes accordingly: (0, 1) in 2D, (1, 2) in 3D.

nnU-Net's required tail is reused unchanged: masking for `use_mask_for_norm`, RemoveLabel(-1 -> 0), the
cascade's previous-stage one-hot channels, region conversion (with the ignore label), and deep-supervision
downsampling (nnUNetTrainer.get_validation_transforms). The cascade's random morphology on previous-stage
segmentations is not part of the paper's recipe and is left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


@dataclass(frozen=True)
class PaperDARecipe:
    """Parameters of paper 000's recipe (section 3.1); defaults are the paper's values."""

    p_spatial: float = 0.3
    translation: float = 0.1  # fraction of the patch extent, per in-plane axis
    rotation_deg: float = 20.0
    zoom: tuple[float, float] = (0.9, 1.1)  # magnification
    p_contrast: float = 0.3
    contrast: tuple[float, float] = (0.8, 1.2)


@dataclass(frozen=True)
class SpatialDraw:
    """One sample's spatial transform: None / 0 / 1 entries are the identity."""

    flip_axis: int | None = None  # spatial axis that is mirrored
    angle: float = 0.0  # radians, in the plane
    zoom: float = 1.0
    shift: tuple[float, ...] = ()  # pixels per spatial axis (0 outside the plane)


def plane_axes(dim: int) -> tuple[int, int]:
    """The spatial axes the recipe acts on: (0, 1) in 2D, (1, 2) in 3D (rotation about axis 0)."""
    if dim not in (2, 3):
        raise ValueError(f"paper augmentation needs 2D or 3D patches, got {dim} spatial axes")
    return (dim - 2, dim - 1)


def centered_grid(patch_size: Sequence[int]) -> torch.Tensor:
    """Pixel offsets of every output-patch pixel from the patch centre, (*patch, dim) float32, axis order as the
    array's: entry [i, j, ..., d] = index_d - (size_d - 1) / 2."""
    axes = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in patch_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def to_grid_sample_grid(offsets: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Pixel offsets from the centre of an input of spatial `shape` -> torch `grid_sample` coordinates
    (align_corners=False: -1 and 1 are the outer edges of the border pixels, so offset o on an axis of size s is
    o / (s / 2)), with the last dimension reversed to grid_sample's (x, y[, z]) order."""
    scale = torch.tensor([s / 2 for s in shape], dtype=offsets.dtype)
    return torch.flip(offsets / scale, (offsets.ndim - 1,))


def affine_of(draw: SpatialDraw, dim: int) -> np.ndarray:
    """Matrix taking output-patch pixel offsets (from the patch centre) to input offsets: R(angle) / zoom * F."""
    a, b = plane_axes(dim)
    m = np.eye(dim)
    if draw.flip_axis is not None:
        m[draw.flip_axis, draw.flip_axis] = -1.0
    rot = np.eye(dim)
    c, s = math.cos(draw.angle), math.sin(draw.angle)
    rot[a, a], rot[a, b], rot[b, a], rot[b, b] = c, -s, s, c
    scale = np.eye(dim)
    scale[a, a] = scale[b, b] = 1.0 / draw.zoom
    return rot @ scale @ m


class PaperSpatialTransform(SpatialTransform):
    """Center crop to `patch_size`, and with probability `recipe.p_spatial` the recipe's spatial transforms
    (module docstring), resampled with nnU-Net's SpatialTransform (seg padding -1, bilinear argmax)."""

    def __init__(self, patch_size: Sequence[int], recipe: PaperDARecipe = PaperDARecipe()):
        super().__init__(tuple(int(p) for p in patch_size), patch_center_dist_from_border=0, random_crop=False,
                         p_elastic_deform=0, p_rotation=0, p_scaling=0, border_mode_seg="constant",
                         padding_value_seg=-1)
        self.recipe = recipe
        self.plane = plane_axes(len(self.patch_size))

    def sample_draw(self) -> SpatialDraw | None:
        """None (no spatial transform, probability 1 - p_spatial) or a draw with a non-empty subset of transforms."""
        r = self.recipe
        if np.random.uniform() >= r.p_spatial:
            return None
        chosen = np.zeros(4, dtype=bool)
        while not chosen.any():
            chosen = np.random.uniform(size=4) < 0.5
        do_flip, do_shift, do_rotate, do_zoom = chosen.tolist()
        shift = [0.0] * len(self.patch_size)
        if do_shift:
            for ax in self.plane:
                shift[ax] = float(np.random.uniform(-r.translation, r.translation) * self.patch_size[ax])
        return SpatialDraw(
            flip_axis=int(self.plane[np.random.randint(2)]) if do_flip else None,
            angle=float(np.deg2rad(np.random.uniform(-r.rotation_deg, r.rotation_deg))) if do_rotate else 0.0,
            zoom=float(np.random.uniform(*r.zoom)) if do_zoom else 1.0,
            shift=tuple(shift))

    def params_for(self, draw: SpatialDraw | None, shape: Sequence[int]) -> dict:
        """SpatialTransform parameters for `draw` on an input of spatial `shape` (None: center crop only)."""
        center = [s / 2 for s in shape]
        if draw is None:
            return {"center_location_in_pixels": center, "grid": None, "affine": None, "elastic_offsets": None,
                    "draw": None}
        dim = len(shape)
        affine = affine_of(draw, dim)
        grid = centered_grid(self.patch_size)  # output pixel offsets from the patch centre, (*patch, dim)
        grid = torch.matmul(grid, torch.from_numpy(affine.T).float())
        grid += torch.tensor(list(draw.shift) or [0.0] * dim, dtype=grid.dtype)
        grid = to_grid_sample_grid(grid, shape)
        return {"center_location_in_pixels": center, "grid": grid, "affine": affine, "elastic_offsets": None,
                "draw": draw}

    def get_parameters(self, **data_dict) -> dict:
        return self.params_for(self.sample_draw(), data_dict["image"].shape[1:])


def paper_initial_patch_size(patch_size: Sequence[int], recipe: PaperDARecipe = PaperDARecipe()) -> list[int]:
    """The patch the data loader must cut so that no recipe transform samples outside it: the rotated patch's
    bounding box (worst angle) at the smallest zoom, plus the largest shift on each side, in the plane."""
    patch = np.asarray(patch_size, dtype=float)
    a, b = plane_axes(len(patch))
    angles = np.deg2rad(np.linspace(-recipe.rotation_deg, recipe.rotation_deg, 81))
    c, s = np.abs(np.cos(angles)), np.abs(np.sin(angles))
    initial = patch.copy()
    for ax, other in ((a, b), (b, a)):
        extent = np.max(c * patch[ax] + s * patch[other]) / min(recipe.zoom) + 2 * recipe.translation * patch[ax]
        initial[ax] = max(patch[ax], math.ceil(extent - 1e-6))
    return [int(v) for v in initial]


def paper_training_transforms(patch_size: Sequence[int], deep_supervision_scales: Union[List, Tuple, None],
                              use_mask_for_norm: List[bool] | None = None, is_cascaded: bool = False,
                              foreground_labels: Sequence[int] | None = None,
                              regions: List[Union[List[int], Tuple[int, ...], int]] | None = None,
                              ignore_label: int | None = None,
                              recipe: PaperDARecipe = PaperDARecipe()) -> BasicTransform:
    """Paper 000's recipe followed by nnU-Net's required tail (module docstring), as one ComposeTransforms."""
    transforms: list[BasicTransform] = [
        PaperSpatialTransform(patch_size, recipe),
        RandomTransform(ContrastTransform(contrast_range=tuple(recipe.contrast), preserve_range=True,
                                          synchronize_channels=True, p_per_channel=1),
                        apply_probability=recipe.p_contrast),
    ]
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        transforms.append(MaskImageTransform(apply_to_channels=[i for i, m in enumerate(use_mask_for_norm) if m],
                                             channel_idx_in_seg=0, set_outside_to=0))
    tail = nnUNetTrainer.get_validation_transforms(deep_supervision_scales, is_cascaded=is_cascaded,
                                                   foreground_labels=foreground_labels, regions=regions,
                                                   ignore_label=ignore_label)
    return ComposeTransforms(transforms + list(tail.transforms))


class PaperDAMixin:
    """Put before an nnUNetTrainer class: paper 000's augmentation (class attribute `paper_da`, a PaperDARecipe)
    replaces nnU-Net's; the data loader cuts patches large enough for it; inference mirrors the flipped axes."""

    paper_da: PaperDARecipe = PaperDARecipe()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        patch_size = self.configuration_manager.patch_size
        mirror_axes = plane_axes(len(patch_size))
        initial_patch_size = paper_initial_patch_size(patch_size, self.paper_da)
        rotation = (-np.deg2rad(self.paper_da.rotation_deg), np.deg2rad(self.paper_da.rotation_deg))
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file(f"paper 000 augmentation {self.paper_da}; initial patch size {initial_patch_size}, "
                               f"mirror axes {mirror_axes}")
        # dummy-2D augmentation is not needed: the recipe never resamples axis 0 of a 3D patch
        return rotation, False, initial_patch_size, mirror_axes

    @classmethod
    def get_training_transforms(cls, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
        """nnU-Net's signature; rotation, mirroring and dummy-2D come from `cls.paper_da`, not the arguments."""
        return paper_training_transforms(patch_size, deep_supervision_scales, use_mask_for_norm, is_cascaded,
                                         foreground_labels, regions, ignore_label, cls.paper_da)


__all__ = ["PaperDARecipe", "SpatialDraw", "PaperSpatialTransform", "PaperDAMixin", "paper_training_transforms",
           "paper_initial_patch_size", "plane_axes", "affine_of", "centered_grid", "to_grid_sample_grid"]
