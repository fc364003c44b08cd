"""Synthetic phantoms: determinism, label sets, geometry, annotator perturbation, nnU-Net raw format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_kaz.cli import main as cli_main
from nnunet_kaz.datasets import kaz2d_patient, kits3d_case, make_kaz2d_dataset, make_kits3d_dataset
from nnunet_kaz.errors import KazError


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def kaz_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaz")
    return make_kaz2d_dataset(root / "Dataset901_KazPhantom", n_patients=3, seed=7, image_size=(48, 40),
                              slices_per_patient=4, n_test_patients=1)


def test_kaz2d_is_deterministic_and_seed_dependent():
    a = kaz2d_patient(3, 1, (48, 48), 4)
    b = kaz2d_patient(3, 1, (48, 48), 4)
    c = kaz2d_patient(4, 1, (48, 48), 4)
    for sa, sb, sc in zip(a, b, c):
        assert sa.case == sb.case == sc.case
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.label, sb.label)
        assert not np.array_equal(sa.image, sc.image)


def test_kaz2d_slices_are_views_of_one_scene():
    # the plane at 30 degrees is the same geometry whether a patient is cut into 6 or 12 slices
    six = {s.angle: s for s in kaz2d_patient(0, 2, (64, 64), 6)}
    twelve = {s.angle: s for s in kaz2d_patient(0, 2, (64, 64), 12)}
    assert np.array_equal(six[30.0].truth, twelve[30.0].truth)
    # rotated views of one zone: every slice shows it, with comparable areas
    areas = np.array([s.truth.sum() for s in twelve.values()])
    assert areas.min() > 0 and areas.max() < 3 * areas.min()
    # ... but not identical views
    assert not np.array_equal(twelve[0.0].truth, twelve[90.0].truth)


def test_kaz2d_annotation_is_a_perturbed_truth():
    dices = []
    for patient in range(4):
        for s in kaz2d_patient(11, patient, (96, 96), 3):
            assert set(np.unique(s.label)) <= {0, 1} and set(np.unique(s.truth)) <= {0, 1}
            assert not np.array_equal(s.label, s.truth)
            dices.append(dice(s.label, s.truth))
    assert min(dices) > 0.6
    assert np.mean(dices) < 0.99


def test_kaz2d_zone_is_hypodense_to_kidney():
    from scipy import ndimage
    for patient in range(3):
        s = kaz2d_patient(5, patient, (128, 128), 1)[0]
        zone = s.hu[s.truth == 1].mean()
        assert 0.0 < zone < 30.0  # zone +10..+20 HU plus noise, rim blur and texture
        band = ndimage.binary_dilation(s.truth, iterations=8) & ~ndimage.binary_dilation(s.truth, iterations=4)
        tissue = band & (s.hu > -40)  # the kidney (and maybe muscle) around the zone, not fat
        assert tissue.sum() > 20 and s.hu[tissue].mean() > zone + 10


def test_kaz2d_dataset_layout(kaz_dir):
    meta = json.loads((kaz_dir / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "ablation_zone": 1}
    assert meta["file_ending"] == ".png" and meta["numTraining"] == 2 * 4
    assert meta["channel_names"] == {"0": "zscore"}
    train = sorted(p.name for p in (kaz_dir / "imagesTr").iterdir())
    assert train[0] == "KAZ_P001_a000_0000.png" and len(train) == 8
    test = sorted(p.name for p in (kaz_dir / "imagesTs").iterdir())
    assert [n[:8] for n in test] == ["KAZ_P003"] * 4
    assert sorted(p.name for p in (kaz_dir / "labelsTs").iterdir()) == [n.replace("_0000", "") for n in test]
    for folder in ("labelsTr", "truthTr", "labelsTs", "truthTs", "raterDisagreementTr", "raterDisagreementTs"):
        for f in (kaz_dir / folder).iterdir():
            arr = np.asarray(Image.open(f))
            assert arr.dtype == np.uint8 and arr.shape == (48, 40) and set(np.unique(arr)) <= {0, 1}
    for part in ("Tr", "Ts"):  # the disagreement map of the two "raters": annotation vs true zone
        for f in (kaz_dir / f"raterDisagreement{part}").iterdir():
            lab, truth = (np.asarray(Image.open(kaz_dir / f"{k}{part}" / f.name)) for k in ("labels", "truth"))
            assert np.array_equal(np.asarray(Image.open(f)), (lab != truth).astype(np.uint8))
    img = np.asarray(Image.open(kaz_dir / "imagesTr" / train[0]))
    assert img.dtype == np.uint8 and img.ndim == 2 and img.std() > 5


def test_kaz2d_passes_nnunet_integrity_check(kaz_dir):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(kaz_dir), num_processes=1)


def test_kaz2d_is_learnable_by_a_tiny_unet():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    train = [s for p in range(5) for s in kaz2d_patient(0, p, (48, 48), 4)]
    test = kaz2d_patient(0, 5, (48, 48), 4)

    def tensor(slices, key):
        t = torch.tensor(np.stack([getattr(s, key) for s in slices]), dtype=torch.float32)[:, None]
        return (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True) if key == "image" else t

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.InstanceNorm2d(o, affine=True), nn.LeakyReLU())

    net = nn.ModuleDict({"e1": block(1, 8), "e2": block(8, 16), "d1": block(24, 8), "out": nn.Conv2d(8, 1, 1)})

    def forward(x):
        a = net["e1"](x)
        b = F.interpolate(net["e2"](F.max_pool2d(a, 2)), scale_factor=2)
        return net["out"](net["d1"](torch.cat([a, b], 1)))

    x, y = tensor(train, "image"), tensor(train, "label")
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(30):
        idx = torch.randint(0, len(x), (8,))
        logits = forward(x[idx])
        p = torch.sigmoid(logits)
        soft_dice = (2 * (p * y[idx]).sum() + 1) / (p.sum() + y[idx].sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y[idx]) + 1 - soft_dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (forward(tensor(test, "image")) > 0).numpy()
    assert dice(pred, tensor(test, "truth").numpy() > 0) > 0.3


def test_kits3d_labels_spacing_and_determinism(tmp_path):
    shape, spacing = (12, 24, 20), (3.0, 0.7, 0.9)
    out = make_kits3d_dataset(tmp_path / "Dataset902_KitsPhantom", n_cases=3, seed=2, shape=shape, spacing=spacing)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    assert meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 3 and meta["channel_names"] == {"0": "CT"}
    for k in range(3):
        img = sitk.ReadImage(str(out / "imagesTr" / f"KITS_{k:05d}_0000.nii.gz"))
        seg = sitk.ReadImage(str(out / "labelsTr" / f"KITS_{k:05d}.nii.gz"))
        assert np.allclose(img.GetSpacing(), spacing[::-1]) and np.allclose(seg.GetSpacing(), spacing[::-1])
        arr, lab = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(seg)
        assert arr.shape == shape and lab.shape == shape
        assert set(np.unique(lab)) <= {0, 1, 2, 3} and {1, 2} <= set(np.unique(lab))
        ref_img, ref_lab = kits3d_case(2, k, shape, spacing)
        assert np.array_equal(arr, ref_img) and np.array_equal(lab, ref_lab)
        assert arr[lab == 1].mean() > arr[lab == 0].mean() + 100  # enhanced kidney vs fat/air
    assert not np.array_equal(kits3d_case(2, 0, shape, spacing)[0], kits3d_case(3, 0, shape, spacing)[0])
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(out), num_processes=1)


def test_kits3d_draws_cysts_and_single_kidneys():
    labels = [kits3d_case(0, k, (16, 32, 32))[1] for k in range(12)]
    assert any((lab == 3).any() for lab in labels)
    from scipy import ndimage
    n_kidneys = [ndimage.label(lab > 0)[1] for lab in labels]
    assert 1 in n_kidneys and 2 in n_kidneys


def test_bad_folder_names_and_overwrite(tmp_path):
    with pytest.raises(KazError, match="DatasetXXX_Name"):
        make_kaz2d_dataset(tmp_path / "Kaz", n_patients=1, seed=0, image_size=(32, 32), slices_per_patient=1)
    target = tmp_path / "Dataset903_K"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(KazError, match="not empty"):
        make_kaz2d_dataset(target, n_patients=1, seed=0, image_size=(32, 32), slices_per_patient=1)
    assert (target / "keep.txt").read_text() == "user data"
    make_kaz2d_dataset(target, n_patients=1, seed=0, image_size=(32, 32), slices_per_patient=1, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "dataset.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_cli_phantom(tmp_path, capsys):
    out = tmp_path / "Dataset904_Cli"
    assert cli_main(["phantom", "--kind", "kits3d", "-o", str(out), "-n", "1", "--seed", "1",
                     "--size", "10", "16", "16", "--spacing", "2", "1", "1"]) == 0
    assert sitk.ReadImage(str(out / "imagesTr" / "KITS_00000_0000.nii.gz")).GetSize() == (16, 16, 10)
    assert cli_main(["phantom", "--kind", "kaz2d", "-o", str(tmp_path / "bad"), "-n", "1"]) == 2
    assert "DatasetXXX_Name" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert cli_main(["phantom", "--kind", "kaz2d", "--format", "bmp", "-o", str(tmp_path / "bmp"), "-n", "1",
                     "--size", "20", "30", "--slices", "2"]) == 0
    for sub in ("images", "masks", "truth"):
        assert sorted(p.name for p in (tmp_path / "bmp" / sub).iterdir()) == ["P001_a000.bmp", "P001_a090.bmp"]
    assert np.asarray(Image.open(tmp_path / "bmp" / "images" / "P001_a090.bmp")).shape == (20, 30)
