"""Finding and reading validation probabilities and label images, matched by case name.

Probabilities: `CASE.npz` files holding `probabilities` of shape (C, *spatial) in the input image's geometry,
as nnU-Net writes them (`nnUNetv2_train ... --npz` into fold_X/validation/, `nnUNetv2_predict
--save_probabilities`; export_prediction.py) and as `nnunet-kaz predict` does. npz files without that key
(e.g. our CASE_uncertainty.npz) are skipped. Spatial layout follows nnU-Net's readers: 3D images (z, y, x)
as SimpleITK gives them; 2D images (1, y, x), for NIfTI as for PNG/BMP/TIF (NaturalImage2DIO).

Labels: `CASE<ending>` for any ending nnU-Net reads (.nii.gz, .nrrd, .mha, .gipl via SimpleITK; .png, .bmp,
.tif via skimage, as NaturalImage2DIO), read into the same layout.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_kaz.errors import KazError
from nnunet_kaz.input_checks import image_size

SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")
NATURAL_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
LABEL_ENDINGS = SITK_ENDINGS + NATURAL_ENDINGS
PROB_KEY = "probabilities"


def _split_ending(name: str, endings: tuple[str, ...]) -> tuple[str, str] | None:
    for e in endings:
        if name.lower().endswith(e):
            return name[: -len(e)], e
    return None


def npz_array_shape(path: Path, key: str = PROB_KEY) -> tuple[int, ...] | None:
    """Shape of `key` in an npz file from its header alone (no decompression), None when absent."""
    try:
        with zipfile.ZipFile(path) as z:
            if f"{key}.npy" not in z.namelist():
                return None
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, _ = reader(f)
                return tuple(int(s) for s in shape)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise KazError(f"cannot read {path}: {e}") from e


def find_probability_files(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{case: (npz file, probabilities shape)} for every npz in `folder` that holds `probabilities`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KazError(f"probability folder {folder} does not exist")
    out = {}
    for p in sorted(folder.glob("*.npz")):
        shape = npz_array_shape(p)
        if shape is not None:
            out[p.name[:-4]] = (p, shape)
    if not out:
        raise KazError(f"no npz files holding '{PROB_KEY}' in {folder} (train or predict with --npz / "
                       "--save_probabilities)")
    return out


def find_label_files(folder: Path) -> dict[str, Path]:
    """{case: label file} for every file with an ending nnU-Net reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KazError(f"label folder {folder} does not exist")
    out = {}
    for p in sorted(folder.iterdir()):
        split = _split_ending(p.name, LABEL_ENDINGS)
        if split is not None and p.is_file():
            out[split[0]] = p
    return out


def label_shape(path: Path) -> tuple[int, ...]:
    """Spatial shape of a label image in nnU-Net's layout, read from the header only."""
    try:
        if _split_ending(path.name, SITK_ENDINGS):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = tuple(int(s) for s in reversed(reader.GetSize()))
        else:
            from PIL import Image

            with Image.open(path) as im:
                size = (im.size[1], im.size[0]) + ((len(im.getbands()),) if len(im.getbands()) > 1 else ())
    except (RuntimeError, OSError) as e:
        raise KazError(f"cannot read label image {path}: {e}") from e
    return (1, *size) if len(size) == 2 else size


def read_label(path: Path) -> np.ndarray:
    """Integer label map in nnU-Net's layout ((z, y, x), or (1, y, x) for 2D)."""
    if _split_ending(path.name, SITK_ENDINGS):
        image_size(path)  # complete file: SimpleITK reads a truncated .nii.gz as zeros
    try:
        if _split_ending(path.name, SITK_ENDINGS):
            arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        else:
            from skimage import io

            arr = io.imread(str(path))
    except (RuntimeError, OSError, ValueError) as e:
        raise KazError(f"cannot read label image {path}: {e}") from e
    if arr.ndim == 3 and _split_ending(path.name, NATURAL_ENDINGS):
        raise KazError(f"label image {path} has colour channels; labels must be grayscale")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise KazError(f"label image {path} holds non-integer values")
        arr = arr.astype(np.int32)
    elif not np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int32)
    return arr[None] if arr.ndim == 2 else arr


def load_probabilities(path: Path) -> np.ndarray:
    """The `probabilities` array of an npz file."""
    try:
        with np.load(path) as z:
            return z[PROB_KEY]
    except (OSError, ValueError, KeyError) as e:
        raise KazError(f"cannot read '{PROB_KEY}' from {path}: {e}") from e


def find_dataset_json(*folders: Path) -> Path | None:
    """The first dataset.json in the given folders or their parent and grandparent (fold_X/validation ->
    the trainer folder; labelsTr -> the raw dataset folder)."""
    for folder in folders:
        for cand in (folder, folder.parent, folder.parent.parent):
            if (cand / "dataset.json").is_file():
                return cand / "dataset.json"
    return None


def read_dataset_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise KazError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict) or "labels" not in d:
        raise KazError(f"{path} has no 'labels' (not an nnU-Net dataset.json)")
    return d


def match_cases(probs: dict[str, tuple[Path, tuple[int, ...]]], labels: dict[str, Path]) -> list[str]:
    """Case names present in both; every case without a label and every shape mismatch in one KazError."""
    problems = []
    for case, (p, shape) in probs.items():
        if case not in labels:
            problems.append(f"{case}: no label file for {p.name}")
            continue
        lshape = label_shape(labels[case])
        if tuple(lshape) != tuple(shape[1:]):
            problems.append(f"{case}: probabilities {p.name} have spatial shape {tuple(shape[1:])} but label "
                            f"{labels[case].name} has {tuple(lshape)}")
    channels = {shape[0] for _, shape in probs.values()}
    if len(channels) > 1:
        problems.append(f"the probability files disagree on the number of channels: {sorted(channels)}")
    if problems:
        raise KazError(f"{len(problems)} problem(s) with the validation cases:\n  " + "\n  ".join(problems))
    return sorted(probs)
