"""Cheap checks that input images are complete and readable, run before a command writes anything.

Why they are needed: SimpleITK (and so nnU-Net's SimpleITKIO) reads a truncated `.nii.gz` or `.nii` without
any error, filling the missing voxels with zeros; PIL reads the header of a truncated PNG / BMP and fails only
when the pixels are decoded. Checks, per file:
- names ending `.gz`: the gzip stream is decompressed to its end (CRC and length checked, nothing kept in
  memory), so a truncated or corrupt file is refused;
- NIfTI (`.nii`, `.nii.gz`): the (decompressed) file holds at least the 348-byte header plus every voxel the
  header declares;
- PNG / BMP / TIFF / JPEG: the pixels are decoded with PIL;
- other formats SimpleITK reads (`.mha`, `.nrrd` ...): the header is read.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Sequence

from nnunet_kaz.errors import KazError

NATURAL_ENDINGS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
NIFTI_HEADER_BYTES = 348


def _gzip_length(path: Path) -> int:
    """Decompressed length of a gzip file, read to its end in 16 MB chunks (KazError if truncated/corrupt)."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                n += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise KazError(f"{path} is truncated or corrupt ({e})") from None
    return n


def image_size(path: str | os.PathLike) -> tuple[int, ...]:
    """Size (x, y[, z]) of an image file after checking it is complete (module docstring); KazError otherwise."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise KazError(f"{path} not found")
    if name.endswith(NATURAL_ENDINGS):
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
                return tuple(im.size)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise KazError(f"{path}: cannot read the image ({e})") from None
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise KazError(f"{path}: cannot read the image header ({str(e).strip().splitlines()[-1]})") from None
    size = tuple(int(s) for s in reader.GetSize())
    length = _gzip_length(path) if name.endswith(".gz") else path.stat().st_size
    if name.endswith((".nii", ".nii.gz")):
        voxel_bytes = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(),
                                 reader.GetNumberOfComponents()).GetSizeOfPixelComponent()
        needed = NIFTI_HEADER_BYTES + voxel_bytes * reader.GetNumberOfComponents() * math.prod(size)
        if length < needed:
            raise KazError(f"{path} is truncated: {length} bytes hold fewer than the {needed} its header "
                           f"declares (size {size})")
    return size


def check_case_files(files: Sequence[str | os.PathLike]) -> tuple[int, ...]:
    """Check every file of one case (image channels, optionally its label) and that they share one size."""
    sizes = {str(f): image_size(f) for f in files}
    if len(set(sizes.values())) > 1:
        raise KazError("images of one case differ in size: " + ", ".join(f"{f} {s}" for f, s in sizes.items()))
    return next(iter(sizes.values()))
