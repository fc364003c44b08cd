"""convert-kits23 on a tiny synthetic KiTS23-layout folder: labels or nested regions, dataset.json that
nnU-Net accepts, and bad input reported case by case with nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kaz.cli import main as cli_main
from nnunet_kaz.datasets import convert_kits23, kits3d_case
from nnunet_kaz.errors import KazError

SPACING_ZYX = (3.0, 0.78, 0.78)


def write_case(folder, arr, seg, spacing=SPACING_ZYX, image=True, segmentation=True):
    folder.mkdir(parents=True)
    for name, a, keep in (("imaging", arr, image), ("segmentation", seg, segmentation)):
        if keep:
            img = sitk.GetImageFromArray(a)
            img.SetSpacing(spacing[::-1])
            img.SetOrigin((10.0, -5.0, 100.0))
            sitk.WriteImage(img, str(folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    for k in range(3):
        write_case(root / "kits23" / f"case_{k:05d}", *kits3d_case(4, k, (10, 24, 24), SPACING_ZYX))
    (root / "kits23" / "kits.json").write_text("[]")  # other files of the KiTS23 repository are ignored
    return root


def test_plain_labels(kits, tmp_path):
    out = convert_kits23(kits / "kits23", 910, raw_root=tmp_path)
    assert out.name == "Dataset910_KiTS23"
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    assert ds["channel_names"] == {"0": "CT"} and ds["numTraining"] == 3 and "regions_class_order" not in ds
    for k in range(3):
        seg = sitk.ReadImage(str(out / "labelsTr" / f"case_{k:05d}.nii.gz"))
        src = sitk.ReadImage(str(kits / "kits23" / f"case_{k:05d}" / "segmentation.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(src))
        img = sitk.ReadImage(str(out / "imagesTr" / f"case_{k:05d}_0000.nii.gz"))
        assert np.allclose(img.GetSpacing(), SPACING_ZYX[::-1]) and img.GetOrigin() == (10.0, -5.0, 100.0)


def test_nested_regions(kits, tmp_path, monkeypatch, capsys):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert cli_main(["convert-kits23", "--kits", str(kits / "kits23"), "--id", "911", "--regions"]) == 2
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    out = convert_kits23(kits / "kits23", 911, "KiTSRegions", regions=True, raw_root=tmp_path)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert ds["regions_class_order"] == [1, 3, 2]
    lm = LabelManager(ds["labels"], ds["regions_class_order"])
    assert lm.has_regions and lm.all_labels == [0, 1, 2, 3]
    assert [tuple(r) if isinstance(r, (list, tuple)) else r for r in lm.foreground_regions] == [(1, 2, 3), (2, 3), 2]
    for k in range(3):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"case_{k:05d}.nii.gz")))
        regions = np.stack([np.isin(seg, r) for r in ([1, 2, 3], [2, 3], [2])]).astype(np.float32)
        assert regions[0].sum() >= regions[1].sum() >= regions[2].sum() > 0
        # nnU-Net turns perfect region outputs back into the KiTS labels through regions_class_order
        assert np.array_equal(lm.convert_probabilities_to_segmentation(regions), seg)


def test_bad_kits_input_lists_every_case(tmp_path):
    src = tmp_path / "kits"
    arr, seg = kits3d_case(0, 0, (8, 16, 16), SPACING_ZYX)
    write_case(src / "case_00000", arr, seg)
    write_case(src / "case_00001", arr, seg, segmentation=False)  # image without segmentation
    write_case(src / "case_00002", arr, seg, image=False)  # segmentation without image
    (src / "case_00003").mkdir()
    for name, a in (("imaging", arr), ("segmentation", seg[:, :15])):  # sizes differ
        sitk.WriteImage(sitk.GetImageFromArray(a), str(src / "case_00003" / f"{name}.nii.gz"))
    bad = seg.copy()
    bad[0, 0, 0] = 5
    write_case(src / "case_00004", arr, bad)  # label outside 0..3
    raw = tmp_path / "raw"
    with pytest.raises(KazError) as err:
        convert_kits23(src, 912, raw_root=raw)
    msg = str(err.value)
    assert "5 problem" not in msg and "4 problem" in msg
    for case in ("case_00001", "case_00002", "case_00003", "case_00004"):
        assert case in msg
    assert "case_00000" not in msg
    assert not raw.exists()


def test_kits23_phantom_raters_and_disagreement(tmp_path, monkeypatch, capsys):
    from scipy import ndimage

    from nnunet_kaz.evaluation.rater_agreement import rater_disagreement

    src = tmp_path / "kits23"
    assert cli_main(["phantom", "--kind", "kits3d", "--format", "kits23", "-o", str(src), "-n", "2", "--seed", "3",
                     "--size", "12", "40", "40", "--spacing", "2.0", "0.9", "0.9"]) == 0
    assert sorted(p.name for p in src.iterdir()) == ["case_00000", "case_00001"]
    case = src / "case_00001"
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "segmentation.nii.gz")))
    assert np.array_equal(seg, kits3d_case(3, 1, (12, 40, 40), (2.0, 0.9, 0.9))[1])
    names = sorted(p.name for p in (case / "instances").iterdir())
    assert "kidney_instance-1_annotation-1.nii.gz" in names and "tumor_instance-1_annotation-3.nii.gz" in names
    assert {n.rsplit("-", 1)[1] for n in names} == {"1.nii.gz", "2.nii.gz", "3.nii.gz"}

    # rater label maps by hand: kidney 1, then cyst 3, then tumour 2 (KiTS23's aggregation order)
    maps = []
    for r in (1, 2, 3):
        lab = np.zeros(seg.shape, np.uint8)
        for structure, value in (("kidney", 1), ("cyst", 3), ("tumor", 2)):
            for f in sorted((case / "instances").glob(f"{structure}_instance-*_annotation-{r}.nii.gz")):
                lab[sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0] = value
        maps.append(lab)
    assert not np.array_equal(maps[0], maps[1])
    # raters differ at the boundaries only: every disagreement voxel is within 3 mm of a label boundary
    edge = np.zeros(seg.shape, bool)
    for v in (1, 2, 3):
        m = seg == v
        edge |= m ^ ndimage.binary_erosion(m)
        edge |= ndimage.binary_dilation(m) & ~m
    dist = ndimage.distance_transform_edt(~edge, sampling=(2.0, 0.9, 0.9))
    expected = rater_disagreement(maps)
    assert expected.any() and dist[expected > 0].max() <= 3.0

    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    assert cli_main(["convert-kits23", "--kits", str(src), "--id", "913", "--regions"]) == 0
    out = raw / "Dataset913_KiTS23"
    img = sitk.ReadImage(str(out / "raterDisagreementTr" / "case_00001.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(img), expected)
    ref = sitk.ReadImage(str(out / "labelsTr" / "case_00001.nii.gz"))
    assert img.GetSpacing() == ref.GetSpacing() and img.GetOrigin() == ref.GetOrigin()
    assert sorted(p.name for p in (out / "raterDisagreementTr").iterdir()) == ["case_00000.nii.gz",
                                                                                "case_00001.nii.gz"]

    # an instance on another grid: one message naming the file, nothing written
    bad = case / "instances" / "tumor_instance-1_annotation-2.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 40, 39), np.uint8)), str(bad))
    capsys.readouterr()
    assert cli_main(["convert-kits23", "--kits", str(src), "--id", "914"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) <= 3
    assert not (raw / "Dataset914_KiTS23").exists()
    assert cli_main(["phantom", "--kind", "kaz2d", "--format", "kits23", "-o", str(tmp_path / "x"), "-n", "1"]) == 2
    assert not (tmp_path / "x").exists()
