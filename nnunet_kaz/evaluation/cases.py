"""Finding, matching and reading the cases of prediction / ground-truth / probability folders.

Conventions (nnU-Net's):
- A segmentation file is `{case}{file_ending}`; nnU-Net's prediction folders also hold `{case}.npz` (key
  `probabilities`, shaped (C, *spatial)) and `{case}.pkl` when `--save_probabilities` was given, and json files.
  Files with other endings are ignored.
- Arrays are in SimpleITK's axis order ((z, y, x) for a 3D image) and `spacing` is reversed `GetSpacing()`, so
  it is in array axis order. 2D PNG / BMP / TIFF files are read as nnU-Net's NaturalImage2DIO reads them
  (scikit-image, spacing 1, so distances are in pixels).
- Axes of length 1 are dropped with their spacing: a 2D slice stored as a (1, H, W) NIfTI is evaluated as the
  2D image it is (a one-voxel-thick volume would otherwise be all surface). nnU-Net's probability arrays, which
  carry the same singleton axes (a 2D PNG gives (C, 1, H, W)), are reshaped the same way.
- nnU-Net writes probabilities in the original image geometry (cropping reverted and the axes transposed back,
  `nnunetv2.inference.export_prediction`), so they align voxel for voxel with the segmentation it wrote.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_kaz.errors import KazError
from nnunet_kaz.input_checks import image_size

NATURAL_2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl")
SEGMENTATION_ENDINGS = SITK_ENDINGS + NATURAL_2D_ENDINGS
SPACING_RTOL = 1e-4


def split_case_name(filename: str, endings: tuple[str, ...] = SEGMENTATION_ENDINGS) -> tuple[str, str] | None:
    """(case, ending) of a segmentation file name, or None when the ending is not a segmentation format."""
    lower = filename.lower()
    for ending in sorted(endings, key=len, reverse=True):
        if lower.endswith(ending) and len(filename) > len(ending):
            return filename[: -len(ending)], filename[-len(ending):]
    return None


def list_cases(folder: Path, what: str) -> dict[str, Path]:
    """{case: file} of the segmentation files in `folder`; errors for a missing folder or ambiguous cases."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KazError(f"{what} folder {folder} does not exist")
    found: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        parsed = split_case_name(f.name) if f.is_file() and not f.name.startswith(".") else None
        if parsed:
            found.setdefault(parsed[0], []).append(f)
    dup = {c: fs for c, fs in found.items() if len(fs) > 1}
    if dup:
        listing = "; ".join(f"{c}: {', '.join(f.name for f in fs)}" for c, fs in sorted(dup.items())[:10])
        raise KazError(f"{what} folder {folder} holds several files for the same case: {listing}")
    if not found:
        raise KazError(f"{what} folder {folder} holds no segmentation files (endings {', '.join(SEGMENTATION_ENDINGS)})")
    return {c: fs[0] for c, fs in found.items()}


@dataclass(frozen=True)
class ImageHeader:
    """Shape and spacing in array axis order, singleton axes kept (`squeezed` drops them)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int = 1

    @property
    def squeezed(self) -> "ImageHeader":
        keep = [i for i, s in enumerate(self.shape) if s != 1]
        return ImageHeader(tuple(self.shape[i] for i in keep), tuple(self.spacing[i] for i in keep), self.channels)


def _is_natural(path: Path) -> bool:
    return path.name.lower().endswith(NATURAL_2D_ENDINGS)


def read_header(path: Path) -> ImageHeader:
    """Header of an image without reading its pixels (SimpleITK's ReadImageInformation, PIL for 2D files)."""
    path = Path(path)
    try:
        if _is_natural(path):
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                channels = len(im.getbands())
                frames = getattr(im, "n_frames", 1)
            if frames != 1:
                raise KazError(f"{path}: multi-page images are not 2D natural images; store 3D data as NIfTI")
            return ImageHeader((h, w), (1.0, 1.0), channels)
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return ImageHeader(tuple(reversed(reader.GetSize())), tuple(reversed(reader.GetSpacing())),
                           reader.GetNumberOfComponents())
    except KazError:
        raise
    except Exception as e:  # unreadable or corrupt file
        raise KazError(f"cannot read {path}: {e}") from e


def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Pixel array and spacing (array axis order) of an image, singleton axes dropped (module docstring)."""
    path = Path(path)
    if not _is_natural(path):
        image_size(path)  # complete file: SimpleITK reads a truncated .nii.gz as zeros
    try:
        if _is_natural(path):
            from skimage import io

            arr = io.imread(path)
            spacing = (1.0,) * arr.ndim
        else:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img)
            spacing = tuple(reversed(img.GetSpacing()))
            if img.GetNumberOfComponentsPerPixel() > 1:
                spacing = spacing + (1.0,)
    except Exception as e:
        raise KazError(f"cannot read {path}: {e}") from e
    keep = [i for i, s in enumerate(arr.shape) if s != 1]
    return arr.reshape([arr.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def read_segmentation(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Integer label array (singleton axes dropped) and spacing; errors for colour or non-integer labels."""
    arr, spacing = read_array(path)
    if _is_natural(path) and arr.ndim == 3:
        raise KazError(f"{path}: a segmentation must be a grayscale image, this one has {arr.shape[-1]} channels")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise KazError(f"{path}: segmentation values must be integer labels")
        arr = arr.astype(np.int32)
    if arr.size and arr.min() < 0:
        raise KazError(f"{path}: segmentation holds negative labels")
    return arr, spacing


def labels_present(seg: np.ndarray) -> set[int]:
    """Label values > 0 present in a segmentation. One comparison pass per value up to the maximum when it is
    small (a 67M-voxel CT: ~30 ms), bincount otherwise (which first copies the volume to 8-byte integers)."""
    top = int(seg.max()) if seg.size else 0
    if top <= 32:
        return {v for v in range(1, top + 1) if (seg == v).any()}
    return {int(v) for v in np.flatnonzero(np.bincount(seg.ravel())) if v > 0}


def npz_array_shape(path: Path, key: str = "probabilities") -> tuple[int, ...]:
    """Shape of `key` in an .npz file, read from the member's header without decompressing the data."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            member = f"{key}.npy"
            if member not in z.namelist():
                keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
                raise KazError(f"{path} has no array '{key}' (it holds {keys})")
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(f)
        return tuple(shape)
    except KazError:
        raise
    except Exception as e:
        raise KazError(f"cannot read {path}: {e}") from e


def squeeze_to(arr: np.ndarray, spatial: tuple[int, ...], leading: int, path: Path) -> np.ndarray:
    """Reshape (*lead, *spatial_with_singletons) to (*lead, *spatial), checking the non-singleton axes agree."""
    lead, rest = arr.shape[:leading], arr.shape[leading:]
    if [s for s in rest if s != 1] != list(spatial):
        raise KazError(f"{path}: spatial shape {tuple(rest)} does not match the segmentation's {spatial}")
    return arr.reshape(*lead, *spatial)


def check_probability_header(path: Path, spatial: tuple[int, ...], n_labels_needed: int) -> int:
    """Number of classes C of an nnU-Net probability file, after checking its shape against the segmentation."""
    shape = npz_array_shape(path)
    if len(shape) < 2:
        raise KazError(f"{path}: probabilities must be shaped (C, *spatial), got {shape}")
    if [s for s in shape[1:] if s != 1] != list(spatial):
        raise KazError(f"{path}: probabilities of spatial shape {shape[1:]} do not match the segmentation's "
                       f"{spatial} (singleton axes ignored)")
    if shape[0] < max(2, n_labels_needed):
        raise KazError(f"{path}: {shape[0]} probability channels but labels up to {n_labels_needed - 1} are evaluated")
    return int(shape[0])


def load_probabilities(path: Path, spatial: tuple[int, ...]) -> np.ndarray:
    """float32 (C, *spatial) probabilities from an nnU-Net npz, checked to be a softmax (sum 1 over C).

    Region-based (sigmoid) outputs do not sum to 1 and are refused: their calibration needs one binary
    problem per region, which this evaluation does not do."""
    try:
        with np.load(path) as z:
            probs = np.asarray(z["probabilities"], dtype=np.float32)
    except Exception as e:
        raise KazError(f"cannot read probabilities from {path}: {e}") from e
    probs = squeeze_to(probs, spatial, 1, path)
    sample = probs.reshape(probs.shape[0], -1)[:, :: max(1, probs[0].size // 100_000)]
    if not np.all(np.isfinite(sample)) or np.any(sample < -1e-6) or np.any(sample > 1 + 1e-6):
        raise KazError(f"{path}: probabilities must lie in [0, 1]")
    if not np.isfinite(probs.sum(dtype=np.float64)):  # every voxel (the sample above skips most of a volume)
        raise KazError(f"{path}: probabilities hold NaN or infinite values")
    if not np.allclose(sample.sum(0), 1.0, atol=1e-3):
        raise KazError(f"{path}: probabilities do not sum to 1 over the class axis (region-based / sigmoid "
                       "outputs are not supported)")
    return probs


def load_uncertainty(path: Path, spatial: tuple[int, ...], key: str = "entropy") -> np.ndarray:
    """A voxel uncertainty map (float32, `spatial` shape): an image file, or array `key` of an .npz (the
    predictor's `{case}_uncertainty.npz` holds entropy, mutual_information and variance; an .npz holding one
    array is read whatever its name). Values must be finite and >= 0; only their order and per-case range
    matter. A (K, *spatial) array (per-class variance) is reduced to its maximum over K."""
    path = Path(path)
    if path.name.lower().endswith(".npz"):
        try:
            with np.load(path) as z:
                keys = list(z.keys())
                key = keys[0] if len(keys) == 1 else key
                if key not in keys:
                    raise KazError(f"{path} has no array '{key}' (it holds {keys})")
                arr = np.asarray(z[key], dtype=np.float32)
                if arr.ndim == len(spatial) + 1 or (arr.ndim > 1 and arr.size != np.prod(spatial)):
                    arr = arr.max(0)
        except KazError:
            raise
        except Exception as e:
            raise KazError(f"cannot read {path}: {e}") from e
    else:
        arr = read_array(path)[0].astype(np.float32)
    arr = squeeze_to(arr, spatial, 0, path)
    if not np.all(np.isfinite(arr)) or (arr.size and arr.min() < 0):
        raise KazError(f"{path}: uncertainty values must be finite and >= 0")
    return arr


def find_dataset_json(*folders: Path) -> dict | None:
    """The first `dataset.json` found in the given folders (nnU-Net writes one next to its predictions)."""
    for folder in folders:
        f = Path(folder) / "dataset.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise KazError(f"cannot read {f}: {e}") from e
    return None


def dataset_labels(dataset_json: dict, source: str = "dataset.json") -> list[int]:
    """Foreground label values of an nnU-Net dataset.json; region-based label definitions are refused."""
    labels = dataset_json.get("labels", {})
    values = []
    for name, v in labels.items():
        if isinstance(v, (list, tuple)):
            raise KazError(f"{source}: label '{name}' is a region {v}; region-based evaluation is not supported")
        if int(v) > 0 and name != "ignore":
            values.append(int(v))
    return sorted(values)


@dataclass
class CasePair:
    case: str
    pred: Path
    gt: Path
    header: ImageHeader          # squeezed
    probs: Path | None = None
    uncertainty: Path | None = None
    image: Path | None = None


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def match_cases(pred_dir: Path, gt_dir: Path, probs_dir: Path | None = None, uncertainty_dir: Path | None = None,
                uncertainty_pattern: str = "{case}.npz", images_dir: Path | None = None,
                pred_subset: bool = False) -> list[CasePair]:
    """Pair prediction and ground-truth files by case name and check every header before any pixel is read.

    Errors (KazError) list every offending case: predictions without ground truth, ground truth without
    prediction (unless `pred_subset`: then only the predicted cases are evaluated), shape or spacing
    mismatches, missing probability / uncertainty files and probability arrays of the wrong shape.
    """
    preds = list_cases(pred_dir, "prediction")
    gts = list_cases(gt_dir, "ground-truth")
    problems: list[str] = []
    # prediction folders also hold per-case maps named {case}_{map}{ending} (this project's predictor writes
    # {case}_entropy, {case}_mi, {case}_prob_{label}); files named after a ground-truth case are not cases
    gt_set = set(gts)
    preds = {c: f for c, f in preds.items()
             if c in gt_set or not any(c[:i] in gt_set for i, ch in enumerate(c) if ch == "_")}
    extra = sorted(set(preds) - gt_set)
    if extra:
        problems.append(f"{len(extra)} predicted case(s) have no ground truth in {gt_dir}: {_listing(extra)}")
    missing = sorted(set(gts) - set(preds))
    if missing and not pred_subset:
        problems.append(f"{len(missing)} ground-truth case(s) have no prediction in {pred_dir}: {_listing(missing)}"
                        " (use --pred-subset to evaluate only the predicted cases)")
    cases = sorted(set(preds) & set(gts))
    pairs, shape_bad, spacing_bad, probs_missing, unc_missing, img_missing = [], [], [], [], [], []
    for case in cases:
        hp, hg = read_header(preds[case]), read_header(gts[case])
        if hp.channels != 1 or hg.channels != 1:
            problems.append(f"{case}: segmentations must have one channel")
            continue
        sp, sg = hp.squeezed, hg.squeezed
        if sp.shape != sg.shape:
            shape_bad.append(f"{case} {sp.shape} vs {sg.shape}")
            continue
        if not np.allclose(sp.spacing, sg.spacing, rtol=SPACING_RTOL, atol=1e-6):
            spacing_bad.append(f"{case} {tuple(round(s, 6) for s in sp.spacing)} vs "
                               f"{tuple(round(s, 6) for s in sg.spacing)}")
            continue
        pair = CasePair(case, preds[case], gts[case], sg)
        if probs_dir is not None:
            f = Path(probs_dir) / f"{case}.npz"
            if f.is_file():
                try:
                    check_probability_header(f, sg.shape, 2)
                except KazError as e:
                    problems.append(str(e))
                pair.probs = f
            else:
                probs_missing.append(case)
        if uncertainty_dir is not None:
            f = Path(uncertainty_dir) / uncertainty_pattern.format(case=case)
            if f.is_file():
                pair.uncertainty = f
            else:
                unc_missing.append(case)
        if images_dir is not None:
            f = next((Path(images_dir) / f"{case}_0000{e}" for e in SEGMENTATION_ENDINGS
                      if (Path(images_dir) / f"{case}_0000{e}").is_file()), None)
            if f is None:
                img_missing.append(case)
            pair.image = f
        pairs.append(pair)
    for what, items in (
            ("shape mismatch between prediction and ground truth (singleton axes ignored)", shape_bad),
            ("spacing mismatch between prediction and ground truth", spacing_bad),
            (f"no {{case}}.npz probabilities in {probs_dir}", probs_missing),
            (f"no uncertainty map '{uncertainty_pattern}' in {uncertainty_dir}", unc_missing),
            (f"no image {{case}}_0000{{ending}} in {images_dir}", img_missing)):
        if items:
            problems.append(f"{what} for {len(items)} case(s): {_listing(items)}")
    if problems:
        raise KazError("; ".join(problems))
    if not pairs:
        raise KazError(f"no case is both in {pred_dir} and in {gt_dir}")
    return pairs
