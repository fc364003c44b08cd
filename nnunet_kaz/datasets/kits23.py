"""KiTS23 layout (`case_XXXXX/imaging.nii.gz`, `case_XXXXX/segmentation.nii.gz`) -> nnU-Net v2 raw dataset.

Labels are KiTS23's: 0 background, 1 kidney, 2 tumour, 3 cyst. With `regions=True` the dataset.json
declares the challenge's nested evaluation regions instead, as nnU-Net's own Dataset220_KiTS2023 does:
"kidney" = {1, 2, 3} (kidney and masses), "masses" = {2, 3}, "tumor" = {2}, with regions_class_order
(1, 3, 2) (the label written where each region wins, in order), so nnU-Net trains with sigmoid outputs
per region. Files are copied unchanged (HU, the cases' own spacing and direction); the channel is "CT"
(CTNormalization over the dataset's foreground intensities).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_kaz.datasets.raw import dataset_json, raw_target
from nnunet_kaz.errors import KazError
from nnunet_kaz.input_checks import image_size
from nnunet_kaz.io_utils import atomic_dir, write_json_atomic

KITS_PLAIN_LABELS = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
KITS_REGIONS = {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
KITS_REGIONS_CLASS_ORDER = [1, 3, 2]
CASE_RE = re.compile(r"^case_\d+$")
ANNOTATION_RE = re.compile(r"^(kidney|tumor|cyst)_instance-(\d+)_annotation-(\d+)\.nii\.gz$")
AGGREGATION = (("kidney", 1), ("cyst", 3), ("tumor", 2))  # KiTS23's LABEL_AGGREGATION_ORDER (1, 3, 2)
DISAGREEMENT_DIR = "raterDisagreementTr"


def instance_files(case_dir: Path) -> dict[int, list[tuple[str, Path]]]:
    """rater -> [(structure, file)] of a case's `instances/` folder (empty without one)."""
    out: dict[int, list[tuple[str, Path]]] = {}
    folder = Path(case_dir) / "instances"
    if not folder.is_dir():
        return out
    for f in sorted(folder.iterdir()):
        m = ANNOTATION_RE.match(f.name)
        if m:
            out.setdefault(int(m.group(3)), []).append((m.group(1), f))
    return out


def rater_label_maps(case_dir: Path) -> dict[int, np.ndarray]:
    """rater -> label map (uint8, array order z, y, x) painted from that rater's instance masks (module doc)."""
    maps = {}
    for rater, files in instance_files(case_dir).items():
        arrays = {}
        for structure, f in files:
            arrays.setdefault(structure, []).append(sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0)
        shape = next(iter(arrays.values()))[0].shape
        lab = np.zeros(shape, np.uint8)
        for structure, value in AGGREGATION:
            for mask in arrays.get(structure, []):
                lab[mask] = value
        maps[rater] = lab
    return maps


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def scan_kits23(kits_dir: str | Path) -> list[str]:
    """Case folder names of a KiTS23-layout folder, after checking every case.

    Raises KazError listing every problem: a case without imaging or segmentation, unreadable or truncated files,
    image and segmentation grids (size, spacing, origin, direction) that differ, labels outside {0,1,2,3}.
    """
    kits_dir = Path(kits_dir)
    if not kits_dir.is_dir():
        raise KazError(f"{kits_dir}: KiTS23 folder does not exist")
    cases = sorted(p.name for p in kits_dir.iterdir() if p.is_dir() and CASE_RE.match(p.name))
    if not cases:
        raise KazError(f"{kits_dir}: no case_XXXXX folders")
    problems = []
    for case in tqdm(cases, desc="checking KiTS23 cases", unit="case", disable=len(cases) < 20):
        img, seg = kits_dir / case / "imaging.nii.gz", kits_dir / case / "segmentation.nii.gz"
        if not img.is_file() or not seg.is_file():
            problems.append(f"{seg}: segmentation without imaging.nii.gz" if seg.is_file() else
                            f"{img}: image without segmentation.nii.gz" if img.is_file() else
                            f"{kits_dir / case}: neither imaging.nii.gz nor segmentation.nii.gz")
            continue
        try:
            image_size(img), image_size(seg)  # complete files: SimpleITK reads a truncated .nii.gz as zeros
            hi, hs = _header(img), _header(seg)
        except KazError as e:
            problems.append(str(e))
            continue
        except RuntimeError as e:
            problems.append(f"{kits_dir / case}: cannot read ({str(e).strip().splitlines()[-1]})")
            continue
        if (hi.GetSize() != hs.GetSize() or not np.allclose(hi.GetSpacing(), hs.GetSpacing(), atol=1e-4)
                or not np.allclose(hi.GetOrigin(), hs.GetOrigin(), atol=1e-3)
                or not np.allclose(hi.GetDirection(), hs.GetDirection(), atol=1e-4)):
            problems.append(f"{seg}: grid differs from {img.name} (size {hs.GetSize()} vs {hi.GetSize()}, spacing "
                            f"{np.round(hs.GetSpacing(), 4).tolist()} vs {np.round(hi.GetSpacing(), 4).tolist()})")
            continue
        for files in instance_files(kits_dir / case).values():
            for _, f in files:
                try:
                    image_size(f)
                    hf = _header(f)
                except (KazError, RuntimeError) as e:
                    problems.append(str(e) if isinstance(e, KazError) else f"{f}: cannot read")
                    continue
                if hf.GetSize() != hs.GetSize():
                    problems.append(f"{f}: size {hf.GetSize()} differs from segmentation.nii.gz's {hs.GetSize()}")
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))).tolist())
        if not values <= {0, 1, 2, 3}:
            problems.append(f"{seg}: labels {sorted(values)} outside KiTS23's 0-3")
    if problems:
        raise KazError(f"{len(problems)} problem(s) with the KiTS23 input, nothing written:\n  "
                       + "\n  ".join(problems))
    return cases


def convert_kits23(kits_dir: str | Path, dataset_id: int, name: str = "KiTS23", regions: bool = False,
                   raw_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """Copy a KiTS23-layout folder into `raw_root/DatasetXXX_Name` (default root $nnUNet_raw) with
    plain labels or nested regions (module doc), and `raterDisagreementTr/` for the cases with two or more
    raters' instance annotations; returns the dataset folder."""
    from nnunet_kaz.paths import nnunet_folder

    raw_root = Path(raw_root) if raw_root else nnunet_folder("nnUNet_raw")
    target = raw_target(raw_root, dataset_id, name, overwrite)
    cases = scan_kits23(kits_dir)
    with atomic_dir(target) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case in tqdm(cases, desc="copying KiTS23 cases", unit="case", disable=len(cases) < 20):
            shutil.copyfile(Path(kits_dir) / case / "imaging.nii.gz", tmp / "imagesTr" / f"{case}_0000.nii.gz")
            shutil.copyfile(Path(kits_dir) / case / "segmentation.nii.gz", tmp / "labelsTr" / f"{case}.nii.gz")
            write_disagreement(Path(kits_dir) / case, tmp / DISAGREEMENT_DIR / f"{case}.nii.gz")
        labels = KITS_REGIONS if regions else KITS_PLAIN_LABELS
        write_json_atomic(dataset_json({"0": "CT"}, labels, len(cases), ".nii.gz", name,
                                       "KiTS23 converted by nnunet-kaz convert-kits23"
                                       + (" (nested regions)" if regions else ""),
                                       KITS_REGIONS_CLASS_ORDER if regions else None), tmp / "dataset.json")
    return target


def write_disagreement(case_dir: Path, target: Path) -> bool:
    """Write the case's pairwise rater-disagreement map (module doc) to `target` on the segmentation's
    grid; False (nothing written) when the case has fewer than two raters."""
    from nnunet_kaz.evaluation.rater_agreement import rater_disagreement

    maps = rater_label_maps(case_dir)
    if len(maps) < 2:
        return False
    ref = sitk.ReadImage(str(Path(case_dir) / "segmentation.nii.gz"))
    img = sitk.GetImageFromArray(rater_disagreement([maps[r] for r in sorted(maps)]))
    img.CopyInformation(ref)
    target.parent.mkdir(exist_ok=True)
    sitk.WriteImage(img, str(target), useCompression=True)
    return True
