"""KAZ BMP slices + masks -> nnU-Net v2 raw 2D dataset, with patient-wise splits.

Input: one folder of grayscale slices (BMP, also PNG/TIFF) and one of masks (0/255 or 0/1), optionally one
of true zones (phantoms). A regular expression with named groups `patient` and `angle`, matched at the start
of each file's stem, pairs a mask with its image (default `DEFAULT_PATTERN`: `P001_a045.bmp`,
`P001_a045_mask.bmp`, `case_00001_a150.bmp`...).

Output (`$nnUNet_raw/DatasetXXX_Name/`): `imagesTr/{Name}_{patient}_a{angle}_0000.png` (8-bit as read, or
resized with Lanczos), `labelsTr/{case}.png` (0/1, resized with nearest neighbour), `truthTr/` when given
(with `raterDisagreementTr/`: 1 where the resized mask and truth differ, for `evaluate --raters`),
`dataset.json` (channel "zscore": see `make_kaz2d_dataset`), and `kaz_meta.json` recording every case's
source files, patient, angle and original size (H, W) so predictions can be exported back at that size.
Splits go to `$nnUNet_preprocessed/DatasetXXX_Name/` (see `nnunet_kaz.datasets.splits`).

Every input file is checked before anything is written; all problems are reported in one error.
Resizing uses PIL's Lanczos filter (a = 3); paper 000 used OpenCV's Lanczos-4, which is not a dependency.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from nnunet_kaz.datasets.raw import dataset_json, raw_target
from nnunet_kaz.datasets.splits import check_nested_patients, patient_groups, write_patient_splits
from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_dir, write_json_atomic

DEFAULT_PATTERN = r"(?P<patient>.+?)_a(?P<angle>\d+(?:\.\d+)?)"
IMAGE_SUFFIXES = (".bmp", ".png", ".tif", ".tiff")
META_FILE = "kaz_meta.json"
# nnU-Net channel names for 8-bit KAZ slices: per-image z-score, or x / 255 (nnU-Net's RGBTo01Normalization, which
# accepts one grey channel: the authors' `x / 255.0`); nnU-Net's CT scheme would clip to the zone's percentiles
NORMALIZATIONS = ("zscore", "rgb_to_0_1")


def read_gray(path: Path) -> np.ndarray:
    """An 8-bit single-channel array from an image file; colour files are accepted only if grey (R = G = B).
    Raises ValueError with the reason otherwise."""
    with Image.open(path) as im:
        if im.mode in ("1", "P", "RGB", "RGBA", "LA"):
            rgb = np.asarray(im.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise ValueError("colour image; expected grayscale")
            return rgb[..., 0].copy()
        if im.mode != "L":
            raise ValueError(f"image mode {im.mode}; expected 8-bit grayscale")
        return np.asarray(im).copy()


def angle_tag(angle: float) -> str:
    """`a045` for 45 degrees, `a007p5` for 7.5 degrees: a file-name-safe angle."""
    whole = int(np.floor(angle))
    frac = f"{angle - whole:.3f}".rstrip("0").rstrip(".")[2:] if angle != whole else ""
    return f"a{whole:03d}" + (f"p{frac}" if frac else "")


def _scan(folder: Path, pattern: re.Pattern, what: str, problems: list[str]) -> dict[tuple[str, float], Path]:
    """(patient, angle) -> file for every image file of `folder`; pattern misses and duplicates to `problems`."""
    found: dict[tuple[str, float], list[Path]] = {}
    if not folder.is_dir():
        problems.append(f"{folder}: {what} folder does not exist")
        return {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        problems.append(f"{folder}: no {what} files ({', '.join(IMAGE_SUFFIXES)})")
    for f in files:
        m = pattern.match(f.stem)
        if not m:
            problems.append(f"{f}: name does not match the pattern {pattern.pattern!r}")
            continue
        found.setdefault((m.group("patient"), float(m.group("angle"))), []).append(f)
    for (patient, angle), fs in found.items():
        if len(fs) > 1:
            problems.append(f"duplicate patient {patient} angle {angle:g} in {what}: " + ", ".join(map(str, fs)))
    return {k: v[0] for k, v in found.items() if len(v) == 1}


def _safe_patient(patient: str) -> str:
    return re.sub(r"[^A-Za-z0-9\-]", "-", patient)


def scan_kaz_folders(images: Path, masks: Path, pattern: str = DEFAULT_PATTERN, truth: Path | None = None
                     ) -> list[dict]:
    """Pair and check every slice; returns one record per case (patient, angle, files, original size).

    Raises KazError listing every problem: names not matching the pattern, duplicate patient/angle, a mask
    or truth without an image or an image without one, unreadable or colour files, sizes that differ,
    masks that are not binary (values other than 0/1 or 0/255), patient ids that clash once made file-safe.
    """
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise KazError(f"--pattern {pattern!r} is not a valid regular expression: {e}") from None
    if not {"patient", "angle"} <= set(rx.groupindex):
        raise KazError(f"--pattern {pattern!r} must have named groups (?P<patient>...) and (?P<angle>...)")
    problems: list[str] = []
    imgs = _scan(Path(images), rx, "image", problems)
    folders = {"mask": _scan(Path(masks), rx, "mask", problems)}
    if truth is not None:
        folders["truth"] = _scan(Path(truth), rx, "truth", problems)
    for what, found in folders.items():
        problems += [f"{f}: {what} without an image (patient {k[0]}, angle {k[1]:g})"
                     for k, f in sorted(found.items()) if k not in imgs]
        problems += [f"{f}: image without a {what}" for k, f in sorted(imgs.items()) if k not in found]
    safe: dict[str, str] = {}
    for patient, _ in imgs:
        other = safe.setdefault(_safe_patient(patient), patient)
        if other != patient:
            problems.append(f"patient ids {other!r} and {patient!r} both become {_safe_patient(patient)!r} "
                            f"in case names")
    records = []
    for key, img_path in tqdm(sorted(imgs.items()), desc="checking slices", unit="slice", disable=len(imgs) < 200):
        try:
            shape = read_gray(img_path).shape
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not raised
            problems.append(f"{img_path}: cannot read as a grayscale image ({e})")
            continue
        rec = {"patient": key[0], "angle": key[1], "image": img_path, "original_size": list(shape)}
        for what, found in folders.items():
            if key not in found:
                continue
            try:
                m = read_gray(found[key])
            except Exception as e:  # noqa: BLE001
                problems.append(f"{found[key]}: cannot read as a grayscale {what} ({e})")
                continue
            if m.shape != shape:
                problems.append(f"{found[key]}: {what} size {m.shape[1]}x{m.shape[0]} differs from image "
                                f"{img_path.name} {shape[1]}x{shape[0]} (WxH)")
            values = set(np.unique(m).tolist())
            if not (values <= {0, 1} or values <= {0, 255}):
                problems.append(f"{found[key]}: {what} is not binary (values {sorted(values)[:6]}...; "
                                f"expected 0/1 or 0/255)")
            rec[what] = found[key]
        records.append(rec)
    if problems:
        raise KazError(f"{len(problems)} problem(s) with the KAZ input, nothing written:\n  " + "\n  ".join(problems))
    return records


def _resize(arr: np.ndarray, size: tuple[int, int] | None, is_mask: bool) -> np.ndarray:
    """Images: PIL's Lanczos, which widens its kernel when shrinking (anti-aliasing; OpenCV's Lanczos-4, used
    for the export back to the original size, does not, and would alias a 510 x 788 -> 256 x 256 shrink);
    masks: nearest."""
    if size is None or tuple(arr.shape) == tuple(size):
        return arr
    im = Image.fromarray(arr)
    return np.asarray(im.resize((size[1], size[0]), Image.NEAREST if is_mask else Image.LANCZOS))


def convert_kaz(images: str | Path, masks: str | Path, dataset_id: int, name: str = "KAZ",
                pattern: str = DEFAULT_PATTERN, resize: tuple[int, int] | None = None,
                truth: str | Path | None = None, raw_root: str | Path | None = None,
                preprocessed_root: str | Path | None = None, n_folds: int = 5, seed: int = 0,
                overwrite: bool = False, test_patients: int = 0, nested: bool = False,
                normalization: str = "zscore") -> Path:
    """Convert KAZ slices to `raw_root/DatasetXXX_Name` and write patient-wise splits under
    `preprocessed_root/DatasetXXX_Name`. Roots default to $nnUNet_raw and $nnUNet_preprocessed.

    `resize` (H, W) resizes every slice (paper 000: 256 x 256); None keeps the original sizes.
    Case names are `{name}_{patient}_{angle_tag}`. `test_patients` = K holds the last K patients (sorted by
    id) out: their slices go to imagesTs/labelsTs(/truthTs) and into no fold. `nested=True` makes
    splits_final.json the nested CV's outer folds (`splits.write_patient_splits`). `normalization` is the
    channel name nnU-Net normalises by (NORMALIZATIONS): "zscore" (default, per-image z-score) or
    "rgb_to_0_1" (x / 255, paper 000 section 3.1's [0, 1] scaling as the authors' code does it).
    Returns the raw dataset folder.
    """
    from nnunet_kaz.paths import nnunet_folder

    raw_root = Path(raw_root) if raw_root else nnunet_folder("nnUNet_raw")
    pre_root = Path(preprocessed_root) if preprocessed_root else nnunet_folder("nnUNet_preprocessed")
    target = raw_target(raw_root, dataset_id, name, overwrite)
    folder = target.name
    splits_file = pre_root / folder / "splits_final.json"
    if splits_file.exists() and not overwrite:
        raise KazError(f"{splits_file} exists; pass --overwrite to replace the splits")
    if normalization not in NORMALIZATIONS:
        raise KazError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}",
                       option="normalization")
    if resize is not None and (len(resize) != 2 or min(resize) < 8):
        raise KazError(f"--resize takes a size >= 8 (N or H W), got {resize}")
    records = scan_kaz_folders(Path(images), Path(masks), pattern, Path(truth) if truth else None)
    patients = sorted({r["patient"] for r in records})
    if not 0 <= test_patients < len(patients):
        raise KazError(f"--test-patients {test_patients}: need fewer than the {len(patients)} patients found")
    held_out = set(patients[len(patients) - test_patients:]) if test_patients else set()
    fold_patients = [r["patient"] for r in records if r["patient"] not in held_out]
    if nested:  # the stricter check first: its message names the nested CV's needs
        check_nested_patients(len(set(fold_patients)), n_folds)
    patient_groups(fold_patients, n_folds, seed)
    check_nested_patients(len(set(fold_patients)), n_folds)  # nested_cv/ is always written

    cases: dict[str, dict] = {}
    with atomic_dir(target) as tmp:
        for part in ("Tr", "Ts") if held_out else ("Tr",):
            for d in ["images", "labels"] + (["truth", "raterDisagreement"] if truth else []):
                (tmp / f"{d}{part}").mkdir()
        for rec in tqdm(records, desc="writing slices", unit="slice", disable=len(records) < 200):
            case = f"{name}_{_safe_patient(rec['patient'])}_{angle_tag(rec['angle'])}"
            part = "Ts" if rec["patient"] in held_out else "Tr"
            img = _resize(read_gray(rec["image"]), resize, False)
            Image.fromarray(img).save(tmp / f"images{part}" / f"{case}_0000.png")
            written = {}
            for what, sub in (("mask", "labels"), ("truth", "truth")):
                if what in rec:
                    lab = _resize((read_gray(rec[what]) > 0).astype(np.uint8), resize, True)
                    Image.fromarray(lab).save(tmp / f"{sub}{part}" / f"{case}.png")
                    written[what] = lab
            if "truth" in written:
                Image.fromarray((written["mask"] != written["truth"]).astype(np.uint8)).save(
                    tmp / f"raterDisagreement{part}" / f"{case}.png")
            cases[case] = {"patient": rec["patient"], "angle": rec["angle"], "original_size": rec["original_size"],
                           "split": "test" if part == "Ts" else "train",
                           "size": list(img.shape), "image": str(Path(rec["image"]).resolve()),
                           "mask": str(Path(rec["mask"]).resolve())}
            if "truth" in rec:
                cases[case]["truth"] = str(Path(rec["truth"]).resolve())
        n_train = sum(c["split"] == "train" for c in cases.values())
        write_json_atomic(dataset_json({"0": normalization}, {"background": 0, "ablation_zone": 1}, n_train, ".png",
                                       name, "KAZ radial CT slices converted by nnunet-kaz convert-kaz"),
                          tmp / "dataset.json")
        write_json_atomic({"pattern": pattern, "resize": list(resize) if resize else None,
                           "resampling": {"image": "PIL Lanczos (a=3)", "mask": "nearest"},
                           "size_order": "H, W (rows, columns)", "cases": cases}, tmp / META_FILE)
    write_patient_splits(pre_root / folder, {c: v["patient"] for c, v in cases.items() if v["split"] == "train"},
                         n_folds, seed, nested)
    return target


def read_kaz_meta(dataset_dir: str | Path) -> dict:
    """The `kaz_meta.json` of a converted dataset: per case patient, angle, source files, original (H, W)."""
    path = Path(dataset_dir) / META_FILE
    if not path.is_file():
        raise KazError(f"{path} not found; was this dataset written by convert-kaz?")
    return json.loads(path.read_text())
