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
