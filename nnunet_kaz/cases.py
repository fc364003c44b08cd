"""Cases on disk, in one place: naming, listing, reading, matching and checking (every command uses this module).

Conventions (nnU-Net's):
- Input images follow nnU-Net's naming `{case}_{XXXX}{file_ending}`, one file per channel (`list_image_cases`);
  an RGB(A) PNG is one file holding 3 (4) channels, as nnU-Net's NaturalImage2DIO reads it, so a case's channel
  count is the sum over its files (`check_image_case`).
- A segmentation / label file is `{case}{ending}` for any ending nnU-Net reads (`list_label_files`); nnU-Net's
  prediction folders also hold `{case}.npz` (key `probabilities`, shaped (C, *spatial)), `{case}.pkl` and json
  files. Files with other endings are ignored.
- ONE axis convention for every array read here: SimpleITK's axis order ((z, y, x) for a 3D image), `spacing`
  in that order (reversed `GetSpacing()`), and axes of length 1 dropped with their spacing. A 2D slice stored as a
  (1, H, W) NIfTI or as a PNG is the 2D image (H, W) it is (a one-voxel-thick volume would be all surface), and
  nnU-Net's probability arrays, which carry the same singleton axes (a 2D PNG gives (C, 1, H, W)), are reshaped
  the same way to (C, H, W). 2D PNG / BMP / TIFF files are read as NaturalImage2DIO reads them (scikit-image,
  spacing 1, distances in pixels).
- nnU-Net writes probabilities in the original image geometry (cropping reverted and the axes transposed back,
  `nnunetv2.inference.export_prediction`), so they align voxel for voxel with the segmentation it wrote.
- Checks: file completeness (truncated .nii.gz that SimpleITK reads as zeros, undecodable PNG) is
  `nnunet_kaz.input_checks`, called from here before pixels are read; an input's dimensionality and size against
  the member that will read it, from the header (`check_member_geometry`); probabilities are checked for NaN /
  inf over every voxel, for the [0, 1] range and for summing to 1 (`load_probabilities`).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunet_kaz.errors import KazError
from nnunet_kaz.input_checks import check_case_files, image_size

NATURAL_2D_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl.gz", ".gipl")
SEGMENTATION_ENDINGS = SITK_ENDINGS + NATURAL_2D_ENDINGS
PROB_KEY = "probabilities"
SPACING_RTOL = 1e-4


# --- naming and listing ---------------------------------------------------------------------------------------
def split_case_name(filename: str, endings: tuple[str, ...] = SEGMENTATION_ENDINGS) -> tuple[str, str] | None:
    """(case, ending) of a segmentation file name, or None when the ending is not a segmentation format."""
    lower = filename.lower()
    for ending in sorted(endings, key=len, reverse=True):
        if lower.endswith(ending) and len(filename) > len(ending):
            return filename[: -len(ending)], filename[-len(ending):]
    return None


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def list_label_files(folder: Path, what: str = "label") -> dict[str, Path]:
    """{case: file} of the segmentation / label files in `folder`; errors for a missing folder, no files or
    several files of one case."""
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


def n_input_channels(dataset_json: dict) -> int:
    """Number of input channels a dataset's cases have (dataset.json `channel_names`, or the older `modality`)."""
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))


def _channel_files(input_dir: Path, case: str, ending: str) -> list[Path]:
    """`{case}_XXXX{ending}` files of one case in channel order (nnU-Net lists the files that exist)."""
    n = len(case) + 1
    return sorted(p for p in input_dir.iterdir() if p.name.startswith(f"{case}_") and p.name.endswith(ending)
                  and len(p.name) == n + 4 + len(ending) and p.name[n:n + 4].isdigit())


def _may_hold_channels(files: Sequence[Path], ending: str) -> bool:
    """One natural-image file may hold several channels (RGB PNG); `check_image_case` counts them."""
    return len(files) == 1 and ending.lower() in NATURAL_2D_ENDINGS


def list_image_cases(input_dir: Path, dataset_json: dict) -> dict[str, list[str]]:
    """{case: [channel files]} of a folder with nnU-Net's naming (CASE_0000.ext ...). A case whose files number
    fewer than the dataset's channels lists its missing `CASE_XXXX` files in the error, unless its files hold
    more than one channel each (RGB PNG); `check_image_case` counts the channels."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise KazError(f"input folder {input_dir} does not exist")
    ending = dataset_json["file_ending"]
    names = sorted(p.name for p in input_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    cases = sorted({f[: -len(ending) - 5] for f in names
                    if len(f) > len(ending) + 5 and f[-len(ending) - 5] == "_" and f[-len(ending) - 4:-len(ending)].isdigit()})
    if not cases:
        raise KazError(f"no images named CASE_0000{ending} in {input_dir}")
    n_channels = n_input_channels(dataset_json)
    out, missing = {}, []
    for c in cases:
        files = _channel_files(input_dir, c, ending)
        expected = [input_dir / f"{c}_{i:04d}{ending}" for i in range(n_channels)]
        if len(files) < n_channels and not _may_hold_channels(files, ending):
            missing += [str(p) for p in expected if not p.is_file()]
        out[c] = [str(p) for p in files]
    if missing:
        raise KazError("missing input channel file(s): " + ", ".join(missing))
    return out


def resolve_images(inputs: Sequence[Path], dataset_json: dict) -> dict[str, list[str]]:
    """{case: channel files} from image files CASE_0000.ext (the other channels next to them) or folders of such
    files; every missing file is reported at once."""
    ending = dataset_json["file_ending"]
    cases: dict[str, list[str]] = {}
    problems = []
    for path in map(Path, inputs):
        if path.is_dir():
            cases.update(list_image_cases(path, dataset_json))
            continue
        name = path.name
        if not name.endswith(ending) or not name[: -len(ending)].endswith("_0000"):
            problems.append(f"{path}: expected a folder or nnU-Net naming CASE_0000{ending}")
            continue
        if not path.is_file():
            problems.append(f"{path} not found")
            continue
        case = name[: -len(ending) - 5]
        files = _channel_files(path.parent, case, ending)
        expected = [path.with_name(f"{case}_{i:04d}{ending}") for i in range(n_input_channels(dataset_json))]
        if len(files) < len(expected) and not _may_hold_channels(files, ending):
            problems += [f"{f} not found" for f in expected if not f.is_file()]
        cases[case] = [str(f) for f in files]
    if problems:
        raise KazError("bad input image(s):\n  " + "\n  ".join(problems))
    if not cases:
        raise KazError("no input images given")
    return cases


def image_channels(path: Path) -> int:
    """Channels one image file holds as nnU-Net's readers see them: RGB 3, RGBA 4, grayscale 1 (PIL's bands;
    a palette image as its palette's mode), vector NIfTI its components."""
    path = Path(path)
    try:
        if path.name.lower().endswith(NATURAL_2D_ENDINGS + (".jpg", ".jpeg")):
            from PIL import Image

            with Image.open(path) as im:
                mode = im.palette.mode if im.mode == "P" and im.palette is not None else im.mode
                return len(Image.new(mode, (1, 1)).getbands())
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return int(reader.GetNumberOfComponents())
    except Exception as e:  # noqa: BLE001 - unreadable files raise many types
        raise KazError(f"cannot read {path}: {e}") from None


def check_image_case(case: str, files: Sequence[str | Path], n_channels: int,
                     label: str | Path | None = None, member: "MemberInput | None" = None) -> None:
    """One input case before anything is written: every file complete and readable, all of one size (with the
    label, if given), and as many channels in all as the dataset declares (an RGB PNG for a one-channel dataset
    is refused here, not deep inside nnU-Net's normalisation). With `member`, the message names it, and each
    file's dimensionality and size must fit it (`check_member_geometry`)."""
    check_case_files([*files, *([label] if label is not None else [])])
    per_file = [image_channels(Path(f)) for f in files]
    if sum(per_file) != n_channels:
        held = ", ".join(f"{Path(f).name}: {k}" for f, k in zip(files, per_file))
        whose = f"{member.description} takes" if member is not None else "the dataset has"
        fix = ("convert colour images to grayscale or give one file per channel" if max(per_file) > 1 else
               f"give the file {case}_0000 only" if n_channels == 1 else
               f"give the files {case}_0000 ... {case}_{n_channels - 1:04d}")
        raise KazError(f"case {case} in {Path(files[0]).parent}: its image file(s) hold {sum(per_file)} channel(s) "
                       f"({held}) but {whose} {n_channels} (dataset.json channel_names); {fix}")
    if member is not None:
        for f in files:
            check_member_geometry(Path(f), member)


@dataclass(frozen=True)
class MemberInput:
    """What a member's network takes, from its plans, for `check_member_geometry`: `name` (how messages name
    it), the configuration's patch size and spacing (nnU-Net's transposed axis order) and `transpose_forward`."""

    name: str
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]

    @classmethod
    def from_plans(cls, name: str, plans_manager, configuration_manager) -> "MemberInput":
        return cls(name, tuple(int(p) for p in configuration_manager.patch_size),
                   tuple(float(s) for s in configuration_manager.spacing),
                   tuple(int(a) for a in plans_manager.transpose_forward))

    @property
    def description(self) -> str:
        return (f"member {self.name} (a {len(self.patch_size)}D configuration, patch "
                f"{' x '.join(map(str, self.patch_size))})")


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(map(str, shape))


def check_member_geometry(path: Path, member: MemberInput) -> None:
    """Refuse, from the file's header alone, an image whose dimensionality does not fit the member, with one
    KazError naming the file and the member, before anything is read or written. nnU-Net's readers see a 2D file
    (natural image or 2D NIfTI) as a volume of one slice, a 3D file as the volume (z, y, x), and a 4D file as its
    4th axis' volumes stacked as channels (SimpleITKIO). Refused:
    - a 4D file with more than one volume (this package takes one file per channel, `CASE_XXXX`);
    - for a 3D configuration: a 2D image, or a volume that is (or, resampled to the configuration's spacing as
      nnU-Net resamples, becomes) one voxel thick along an axis where the patch is thicker: the 3D network would
      see one slice and zero padding (nnU-Net then fails on a zero-size array, or pads it silently);
    - for any configuration: an axis that resamples to no voxel at all (nnU-Net's `compute_new_shape`:
      round(size x spacing / target spacing) = 0, where nnU-Net fails with a zero-size array).
    A 2D configuration takes 2D images and volumes (slice by slice, as nnU-Net's 2D configurations do). Sizes
    are given in array order (z, y, x), spacings in the same order."""
    header = read_header(path)
    shape, spacing = tuple(header.shape), tuple(header.spacing)
    if len(shape) == 4 and shape[0] == 1:
        shape, spacing = shape[1:], spacing[1:]
    three_d = len(member.patch_size) == 3
    takes = "3D volumes" if three_d else "2D images or 3D volumes (slice by slice)"
    if len(shape) == 4:
        raise KazError(f"{path} is a 4D image ({shape[0]} volumes of {_shape_text(shape[1:])}): "
                       f"{member.description} takes {takes}, one file per channel (CASE_0000, CASE_0001, ...)")
    if len(shape) not in (2, 3):
        raise KazError(f"{path} has {len(shape)} dimension(s) (shape {_shape_text(shape)}): {member.description} "
                       f"takes {takes}")
    if three_d and len(shape) == 2:
        raise KazError(f"{path} is a 2D image (shape {_shape_text(shape)}): {member.description} takes 3D volumes")
    if len(shape) == 2:  # nnU-Net's readers: one slice, its spacing 999 x the largest in-plane spacing
        shape, spacing = (1, *shape), (999.0 * max(spacing), *spacing)
    order = member.transpose_forward
    shape_t, spacing_t = [shape[i] for i in order], [spacing[i] for i in order]
    target = list(member.spacing) if len(member.spacing) == 3 else [spacing_t[0], *member.spacing]
    resampled = [int(round(sp / t * n)) for sp, t, n in zip(spacing_t, target, shape_t)]  # compute_new_shape
    where = f"{path} (shape {_shape_text(shape)}, spacing {' x '.join(f'{v:g}' for v in spacing)})"
    # voxels each axis needs: more than one where a 3D patch is thicker than one voxel, else one
    need = [2 if three_d and p > 1 else 1 for p in (member.patch_size if three_d else (1, *member.patch_size))]
    for k in range(3):
        if shape_t[k] < need[k]:
            raise KazError(f"{where} is one voxel thick along axis {order[k]}: {member.description} takes 3D volumes "
                           "of more than one slice along every axis")
    for k in range(3):
        if resampled[k] < need[k]:
            raise KazError(f"{where} has {resampled[k]} voxel(s) along axis {order[k]} once resampled, as nnU-Net "
                           f"resamples it, to the spacing {' x '.join(f'{v:g}' for v in target)} of "
                           f"{member.description}; it needs {need[k]} at least")


# --- headers and pixels ---------------------------------------------------------------------------------------
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
    return drop_singletons(arr, spacing)


def drop_singletons(arr: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """The array and spacing without axes of length 1 (the module's axis convention); a 1-voxel array keeps
    its last axis."""
    keep = [i for i, s in enumerate(arr.shape) if s != 1] or [arr.ndim - 1]
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


def check_declared_labels(case: str, present: Iterable[int], declared: Iterable[int], source: str,
                          allow: bool = False) -> list[int]:
    """Labels of a ground truth that its dataset.json does not declare: a KazError naming them and the case, or,
    with `allow`, a warning on stderr (the labels are then evaluated like any other). Returns them."""
    undeclared = sorted(set(present) - set(declared))
    if undeclared:
        message = (f"case {case}: ground truth {source} holds label(s) {undeclared} that dataset.json does not "
                   f"declare (declared: {sorted(set(declared))})")
        if not allow:
            raise KazError(message + " (allow_undeclared_labels makes this a warning)", option="allow_undeclared_labels")
        import warnings

        warnings.warn(message, stacklevel=2)
    return undeclared


# --- probabilities and uncertainty maps -------------------------------------------------------------------------
def npz_keys(path: Path) -> list[str]:
    """Names of the arrays of an .npz file, from its zip directory (nothing decompressed)."""
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise KazError(f"cannot read {path}: {e}") from e


def npz_array_shape(path: Path, key: str = PROB_KEY) -> tuple[int, ...]:
    """Shape of `key` in an .npz file, read from the member's header without decompressing the data."""
    path = Path(path)
    keys = npz_keys(path)
    if key not in keys:
        raise KazError(f"{path} has no array '{key}' (it holds {keys})")
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, _ = reader(f)
        return tuple(int(s) for s in shape)
    except Exception as e:
        raise KazError(f"cannot read {path}: {e}") from e


def squeeze_to(arr: np.ndarray, spatial: tuple[int, ...] | None, leading: int, path: Path) -> np.ndarray:
    """Reshape (*lead, *rest) to (*lead, *spatial), checking the axes other than singletons agree (so singleton
    axes are dropped or added); `spatial` None: just drop the singleton axes of `rest`."""
    lead, rest = arr.shape[:leading], arr.shape[leading:]
    squeezed = [s for s in rest if s != 1]
    if spatial is None:
        spatial = tuple(squeezed)
    if squeezed != [s for s in spatial if s != 1]:
        raise KazError(f"{path}: spatial shape {tuple(rest)} does not match the segmentation's {tuple(spatial)}")
    return arr.reshape(*lead, *spatial)


def check_probability_header(path: Path, spatial: tuple[int, ...], n_labels_needed: int = 2) -> int:
    """Number of classes C of an nnU-Net probability file, after checking its shape against the segmentation's
    (squeezed) spatial shape."""
    shape = npz_array_shape(path)
    if len(shape) < 2:
        raise KazError(f"{path}: probabilities must be shaped (C, *spatial), got {shape}")
    if [s for s in shape[1:] if s != 1] != list(spatial):
        raise KazError(f"{path}: probabilities of spatial shape {shape[1:]} do not match the label's "
                       f"{tuple(spatial)} (singleton axes ignored)")
    if shape[0] < max(2, n_labels_needed):
        raise KazError(f"{path}: {shape[0]} probability channels but labels up to {n_labels_needed - 1} are used")
    return int(shape[0])


def load_probabilities(path: Path, spatial: tuple[int, ...] | None = None, softmax: bool = True) -> np.ndarray:
    """float32 (C, *spatial) softmax probabilities from an nnU-Net npz (singleton spatial axes dropped; checked
    against `spatial` when given), checked over EVERY voxel: finite, within [0, 1], summing to 1 over C.

    Region-based (sigmoid) outputs do not sum to 1 and are refused: their calibration needs one binary
    problem per region, which neither the evaluation nor the calibrators do. `softmax=False` reads them (one
    sigmoid channel per region, checked finite and within [0, 1]) for the per-channel users (conformal)."""
    from nnunet_kaz.postprocessing.calibration import check_probabilities

    try:
        with np.load(path) as z:
            probs = z[PROB_KEY]
    except KeyError:
        raise KazError(f"{path} has no array '{PROB_KEY}'") from None
    except Exception as e:
        raise KazError(f"cannot read probabilities from {path}: {e}") from e
    probs = squeeze_to(np.asarray(probs), spatial, 1, path)
    if not softmax:
        probs = np.asarray(probs, dtype=np.float32)
        if not np.all(np.isfinite(probs)) or (probs.size and (probs.min() < 0 or probs.max() > 1)):
            raise KazError(f"{path}: probabilities must be finite and within [0, 1]")
        return probs
    return check_probabilities(probs, str(path))


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


def list_probability_files(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{case: (npz file, probabilities shape as stored)} for every npz in `folder` holding `probabilities`
    (others, e.g. the predictor's CASE_uncertainty.npz, are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KazError(f"probability folder {folder} does not exist")
    out = {p.name[:-4]: (p, npz_array_shape(p)) for p in sorted(folder.glob("*.npz")) if PROB_KEY in npz_keys(p)}
    if not out:
        raise KazError(f"no npz files holding '{PROB_KEY}' in {folder} (have nnU-Net save the probabilities: "
                       "nnUNetv2_train --npz, nnUNetv2_predict --save_probabilities, or nnunet-kaz predict)")
    return out


# --- dataset.json -----------------------------------------------------------------------------------------------
def find_dataset_json(*folders: Path, levels: int = 2) -> Path | None:
    """The first `dataset.json` in the given folders, then in their parents, then grandparents (`levels`):
    nnU-Net writes one next to its predictions; fold_X/validation -> the trainer folder; labelsTr -> the raw
    dataset folder."""
    for level in range(levels + 1):
        for folder in folders:
            cand = Path(folder)
            for _ in range(level):
                cand = cand.parent
            if (cand / "dataset.json").is_file():
                return cand / "dataset.json"
    return None


def read_dataset_json(path: Path) -> dict:
    """A dataset.json as a dict; KazError when unreadable or without `labels`."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise KazError(f"cannot read {path}: {e}") from e
    if not isinstance(d, dict) or "labels" not in d:
        raise KazError(f"{path} has no 'labels' (not an nnU-Net dataset.json)")
    return d


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


# --- matching folders -------------------------------------------------------------------------------------------
@dataclass
class CasePair:
    case: str
    pred: Path
    gt: Path
    header: ImageHeader          # squeezed
    probs: Path | None = None
    uncertainty: Path | None = None
    image: Path | None = None


def match_cases(pred_dir: Path, gt_dir: Path, probs_dir: Path | None = None, uncertainty_dir: Path | None = None,
                uncertainty_pattern: str = "{case}.npz", images_dir: Path | None = None,
                pred_subset: bool = False) -> list[CasePair]:
    """Pair prediction and ground-truth files by case name and check every header before any pixel is read.

    Errors (KazError) list every offending case: predictions without ground truth, ground truth without
    prediction (unless `pred_subset`: then only the predicted cases are evaluated), shape or spacing
    mismatches, missing probability / uncertainty files and probability arrays of the wrong shape.
    """
    preds = list_label_files(pred_dir, "prediction")
    gts = list_label_files(gt_dir, "ground-truth")
    # prediction folders also hold per-case maps named {case}_{map}{ending} (this project's predictor writes
    # {case}_entropy, {case}_mi, {case}_prob_{label}); files named after a ground-truth case are not cases
    preds = {c: f for c, f in preds.items()
             if c in gts or not any(c[:i] in gts for i, ch in enumerate(c) if ch == "_")}
    problems: list[str] = []
    extra = sorted(set(preds) - set(gts))
    if extra:
        problems.append(f"{len(extra)} predicted case(s) have no ground truth in {gt_dir}: {_listing(extra)}")
    missing = sorted(set(gts) - set(preds))
    if missing and not pred_subset:
        problems.append(f"{len(missing)} ground-truth case(s) have no prediction in {pred_dir}: {_listing(missing)}"
                        " (pred_subset evaluates only the predicted cases)")
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
        raise KazError("; ".join(problems), option="pred_subset" if any("pred_subset" in p for p in problems) else None)
    if not pairs:
        raise KazError(f"no case is both in {pred_dir} and in {gt_dir}")
    return pairs


def match_probabilities(prob_dir: Path, label_dir: Path) -> tuple[list[str], dict[str, Path], dict[str, Path], int]:
    """(cases, {case: npz}, {case: label file}, number of channels) of a probability folder and a label folder.
    Every probability case without a label, every shape mismatch (singleton axes ignored) and disagreeing
    channel counts are listed in one KazError; labels without probabilities are left out (a label folder such
    as labelsTr holds more cases than one fold's validation set)."""
    probs = list_probability_files(prob_dir)
    labels = list_label_files(label_dir, "label")
    problems = [f"{case}: no label file for {p.name} in {label_dir}" for case, (p, _) in probs.items()
                if case not in labels]
    cases = sorted(set(probs) & set(labels))
    for case in cases:
        p, shape = probs[case]
        lshape = read_header(labels[case]).squeezed.shape
        if [s for s in shape[1:] if s != 1] != list(lshape):
            problems.append(f"{case}: probabilities {p.name} have spatial shape {tuple(shape[1:])} but label "
                            f"{labels[case].name} has {tuple(lshape)} (singleton axes ignored)")
    channels = {probs[c][1][0] for c in cases}
    if len(channels) > 1:
        problems.append(f"the probability files disagree on the number of channels: {sorted(channels)}")
    if problems:
        raise KazError(f"{len(problems)} problem(s) with the cases:\n  " + "\n  ".join(problems))
    if not cases:
        raise KazError(f"no case is both in {prob_dir} and in {label_dir}")
    return cases, {c: probs[c][0] for c in cases}, {c: labels[c] for c in cases}, int(channels.pop())
