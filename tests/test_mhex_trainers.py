"""MHEX+ trainers on the real `nnUNetv2_train`, inference rebuilding the heads, and `nnunet-kaz mhex`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from nnunet_kaz.cli import main
from nnunet_kaz.networks import MHEXPlus
from nnunet_kaz.trainers import XBoundNetTrainerMHEX_debug, nnUNetTrainerMHEX
from tests.conftest import run

pytestmark = pytest.mark.integration
MHEX = "XBoundNetTrainerMHEX_debug"


def _plans(folder):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(folder / "plans.json"))
    return pm, pm.get_configuration("2d")


def test_trainers_build_mhex_networks_with_deep_supervision_switch(tiny_kaz):
    folder = tiny_kaz.train(MHEX)
    pm, cm = _plans(folder)
    for trainer in (XBoundNetTrainerMHEX_debug, nnUNetTrainerMHEX):
        net = trainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=True)
        assert isinstance(net, MHEXPlus) and len(net.heads) == len(net.decoder.stages)
        x = torch.randn(2, 1, *cm.patch_size)
        outs = net(x)  # one deep prediction per decoder stage, highest resolution first (nnU-Net's contract)
        assert [tuple(o.shape[2:]) for o in outs][0] == tuple(cm.patch_size) and len(outs) == len(net.heads)
        net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
        assert net(x).shape == (2, 2, *cm.patch_size)
        # inference builds with deep supervision off: the same parameters, so checkpoints load
        inference = trainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=False)
        assert inference.state_dict().keys() == net.state_dict().keys()


def test_trained_mhex_member_predicts_and_gives_one_cam_per_stage(tiny_kaz, tmp_path):
    folder = tiny_kaz.train(MHEX)
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    heads = {k: v for k, v in ckpt["network_weights"].items() if k.startswith("heads.")}
    assert ckpt["trainer_name"] == MHEX and heads
    pm, cm = _plans(folder)
    fresh = XBoundNetTrainerMHEX_debug.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=False)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in heads.items())  # heads were trained

    out = tmp_path / "pred"
    run(["nnunet-kaz", "predict", "-i", str(tiny_kaz.raw / "imagesTs"), "-o", str(out), "-m", f"{folder}:0"],
        tiny_kaz.env)
    cases = sorted(p.name[:-len("_0000.png")] for p in (tiny_kaz.raw / "imagesTs").glob("*_0000.png"))
    for case in cases:
        seg = np.asarray(Image.open(out / f"{case}.png"))
        assert seg.shape == (32, 32) and set(np.unique(seg)) <= {0, 1}
        probs = np.load(out / f"{case}.npz")["probabilities"]
        assert probs.shape == (2, 1, 32, 32) and np.allclose(probs.sum(0), 1, atol=1e-4)

    from nnunet_kaz.explain import mhex_cams
    from nnunet_kaz.explain.loading import load_member

    predictor, network = load_member(f"{folder}:0")
    assert isinstance(network, MHEXPlus)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in heads.items())  # checkpoint's heads loaded
    data, _ = predictor.preprocess([str(tiny_kaz.raw / "imagesTs" / f"{cases[0]}_0000.png")])
    cams = mhex_cams(network, data[:, 0][None])
    assert len(cams) == len(network.heads) == len(network.decoder.stages)
    assert all(c.shape == (2, 32, 32) and np.isfinite(c).all() for c in cams)


def test_mhex_command_writes_cams_collaboration_and_agreement(tiny_kaz, tmp_path):
    folder = tiny_kaz.train(MHEX)
    images = tiny_kaz.raw / "imagesTs"
    out = tmp_path / "mhex"
    run(["nnunet-kaz", "mhex", "-i", str(images), "-m", f"{folder}:0", "-o", str(out), "--mc", "3"], tiny_kaz.env)
    cases = sorted(p.name[:-len("_0000.png")] for p in images.glob("*_0000.png"))
    n_heads = 3  # 4 stages in the tiny plans
    for case in cases:
        assert (out / f"{case}_mhex.png").stat().st_size > 10_000
        maps = np.load(out / f"{case}_mhex.npz")
        assert {f"cam_stage{j}" for j in range(n_heads)} <= set(maps.keys())
        u = maps["collaboration_U"]
        assert u.shape == (1, 32, 32) and np.all(np.abs(u) <= n_heads - 1 + 1e-4)
        assert np.allclose(maps["collaboration_disagreement"], n_heads - 1 - u, atol=1e-5)
        assert np.allclose(u, maps["collaboration_pair0"] + maps["collaboration_pair1"], atol=1e-4)
        assert (maps["ensemble_entropy"] >= 0).all() and (maps["ensemble_variance"] >= 0).all()
    table = pd.read_csv(out / "mhex_agreement.csv")
    assert list(table.columns) == ["case", "map", "reference", "iou", "dice", "pearson", "p_value", "n_samples"]
    assert len(table) == 4 * len(cases) and (table["n_samples"] == 3).all()
    assert table[["iou", "dice"]].stack().between(0, 1).all() and table["pearson"].abs().le(1).all()
    pair = table.set_index(["case", "map", "reference"])["pearson"]
    for case in cases:  # D = (L-1) - U: Pearson's r flips sign
        assert pair[case, "collaboration_U", "ensemble_entropy"] == pytest.approx(
            -pair[case, "collaboration_disagreement", "ensemble_entropy"], abs=1e-6)


def test_mhex_command_names_the_trainer_for_a_member_without_heads(tiny_kaz, tmp_path, capsys):
    plain = tiny_kaz.train("XBoundNetTrainer_debug")
    image = sorted((tiny_kaz.raw / "imagesTs").glob("*_0000.png"))[0]
    code = main(["mhex", "-i", str(image), "-m", f"{plain}:0", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "XBoundNetTrainer_debug" in err and "XBoundNetTrainerMHEX" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(3, 45, 70), (3, 20, 30)])
def test_tiled_maps_stitches_per_tile_maps_back_in_place(shape):
    from nnunet_kaz.explain.loading import tiled_maps

    image = torch.randn(*shape)
    calls = []

    def fn(tile):
        calls.append(tuple(tile.shape))
        return np.stack([tile[0, 0].numpy(), 2 * tile[0, 1].numpy()])  # per-voxel maps: stitching must not blur

    out = tiled_maps(fn, image, (32, 32), 0.5)
    assert out.shape == (2, *shape[1:])
    assert np.allclose(out[0], image[0].numpy(), atol=1e-5) and np.allclose(out[1], 2 * image[1].numpy(), atol=1e-5)
    assert all(c == (1, 3, 32, 32) for c in calls) and (len(calls) > 1) == (shape[1] > 32)
