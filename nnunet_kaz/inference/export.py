"""From the preprocessed space back to the input image's geometry, and writing maps next to segmentations.

Maps are resampled with the configuration's probability resampling (nnU-Net's `resampling_fn_probabilities`),
put back into the cropped-away border and transposed back, exactly as nnU-Net exports probabilities. Resampled
probabilities are clipped to [0, 1] (cubic resampling can overshoot) and softmax ones renormalised to sum 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from PIL import Image

from nnunet_kaz.io_utils import atomic_path


class GeometryRestorer:
    """Undo nnU-Net's preprocessing geometry (resampling, cropping, transpose) for one case."""

    def __init__(self, plans_manager, configuration_manager, properties: dict):
        self.pm, self.cm, self.props = plans_manager, configuration_manager, properties

    def _resample(self, array: np.ndarray, copy: bool = True) -> np.ndarray:
        """(K, *preprocessed) -> (K, *cropped input) float32, one channel at a time into one output array.

        nnU-Net's resampling treats the channels independently (a loop over them) but converts the whole input to
        float64 first; channel by channel, the same values come out while the float64 copy is of one channel only
        (issue 15: on a resampled KiTS volume that copy alone was 8 bytes per voxel and class). Without resampling
        the result is a float32 copy, or `array` itself with `copy=False`."""
        props = self.props
        spacing_t = [props["spacing"][i] for i in self.pm.transpose_forward]
        shape = tuple(int(s) for s in props["shape_after_cropping_and_before_resampling"])
        current = self.cm.spacing if len(self.cm.spacing) == len(shape) else [spacing_t[0], *self.cm.spacing]
        if tuple(array.shape[1:]) == shape:  # nothing to resample (nnU-Net returns its input as is)
            return np.array(array, dtype=np.float32, copy=copy or None)
        out = np.empty((array.shape[0], *shape), dtype=np.float32)
        for c in range(array.shape[0]):
            out[c] = self.cm.resampling_fn_probabilities(array[c:c + 1], shape, current, spacing_t)[0]
        return out

    def _uncrop(self, res: np.ndarray, fill: float, first_fill: float | None = None) -> np.ndarray:
        """(K, *cropped) -> (K, *input) in the input's axis order; outside the crop `fill` (channel 0:
        `first_fill` if given). Without a crop and a transpose, `res` itself is returned (no copy)."""
        before = tuple(int(s) for s in self.props["shape_before_cropping"])
        axes = [0] + [i + 1 for i in self.pm.transpose_backward]
        if tuple(res.shape[1:]) != before:
            full = np.full((res.shape[0], *before), fill, dtype=np.float32)
            if first_fill is not None:
                full[0] = first_fill
            res = insert_crop_into_image(full, res, self.props["bbox_used_for_cropping"])
        return res if axes == sorted(axes) else np.ascontiguousarray(res.transpose(axes))

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape of the input image in nnU-Net's original axis order (what `maps` returns)."""
        before = [int(s) for s in self.props["shape_before_cropping"]]
        return tuple(before[i] for i in self.pm.transpose_backward)

    def zeros(self, n_channels: int) -> np.ndarray:
        """(K, *original) zeros, as `maps` of an all-zero array gives, without resampling or copying (np.zeros
        maps the pages lazily: they take no memory until written)."""
        return np.zeros((n_channels, *self.shape), dtype=np.float32)

    def maps(self, array: np.ndarray, fill: float = 0.0, consume: bool = False) -> np.ndarray:
        """(K, *preprocessed) -> (K, *original), outside the crop `fill`. `consume`: `array` is not needed
        afterwards, so without resampling, cropping and transposing it is returned itself (float32), not copied."""
        return self._uncrop(self._resample(array, copy=not consume), fill)

    def probabilities(self, probs: np.ndarray, regions: bool, consume: bool = False) -> np.ndarray:
        """Mean probabilities in the original geometry; background 1 outside the crop (nnU-Net's convention).
        `consume`: `probs` is not needed afterwards, so without resampling it is clipped and renormalised in place
        instead of copied (4 C bytes per voxel less at the predictor's peak on a 3D volume)."""
        res = self._resample(probs, copy=not consume)
        np.clip(res, 0.0, 1.0, out=res)
        if not regions:
            res /= np.clip(res.sum(0, keepdims=True), 1e-8, None)
        return self._uncrop(res, 0.0, None if regions else 1.0)

    @property
    def voxel_volume_ratio(self) -> float:
        """Volume of a preprocessed voxel in voxels of the input image (to report sample volumes in input voxels)."""
        shape = self.props["shape_after_cropping_and_before_resampling"]
        spacing_t = [self.props["spacing"][i] for i in self.pm.transpose_forward]
        current = self.cm.spacing if len(self.cm.spacing) == len(shape) else [spacing_t[0], *self.cm.spacing]
        return float(np.prod(current) / np.prod(spacing_t))


def write_map(array: np.ndarray, path: Path, properties: dict, scale: float = 1.0) -> None:
    """Write one float map (in nnU-Net's original layout: (z, y, x), or (1, y, x) for 2D) next to the image.

    NIfTI/NRRD/MHA inputs (read by SimpleITK) give float32 images with the input's spacing, origin and
    direction. PNG/BMP/TIF inputs give 8-bit images holding round(255 * scale * value), clipped to 0..255.
    """
    with atomic_path(path) as tmp:
        if "sitk_stuff" in properties:
            stuff = properties["sitk_stuff"]
            arr = array[0] if len(stuff["spacing"]) == 2 else array
            img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.float32))  # SimpleITK copies: no copy of ours
            img.SetSpacing(stuff["spacing"])
            img.SetOrigin(stuff["origin"])
            img.SetDirection(stuff["direction"])
            if "original_orientation" in stuff:
                img = sitk.DICOMOrient(img, stuff["original_orientation"])
            sitk.WriteImage(img, str(tmp), True)
        else:
            arr = array[0] if array.ndim == 3 and array.shape[0] == 1 else array
            Image.fromarray(np.clip(np.rint(arr * 255.0 * scale), 0, 255).astype(np.uint8)).save(tmp)


def write_segmentation(rw, seg: np.ndarray, path: Path, properties: dict) -> None:
    """nnU-Net's writer for the dataset's file format, through a temporary name."""
    with atomic_path(path) as tmp:
        rw.write_seg(seg, str(tmp), properties)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)
