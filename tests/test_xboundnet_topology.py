"""Issue 12: XBoundNet++ at the paper's depth inside nnU-Net's plans.

- `nnunet-kaz plan` (XBoundNetPlanner) on a 256x256 kaz2d phantom and a kits3d phantom: every dilated ASPP branch
  sees context (perturbing only its off-centre taps changes the bridge output), the patch / batch size are
  nnU-Net's VRAM fit with XBoundNet++'s own feature-map count;
- XBoundNetTrainer on nnU-Net's stock plans: depth capped by default, one warning naming the degenerate branches
  (confirmed by brute force) when the plans' depth is kept;
- the stock `nnUNetv2_train -tr XBoundNetTrainer` on nnUNetPlans (3D here, 2D in test_nnunet_integration) and the
  stock trainer on nnUNetXBoundNetPlans (2D here, 3D in test_nnunet_integration) train and predict;
- plans whose patch is smaller than the total downsampling: one message naming the configuration, exit != 0.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from PIL import Image

from nnunet_kaz.datasets import make_kaz2d_dataset, make_kits3d_dataset
from nnunet_kaz.networks import XBoundNet
from nnunet_kaz.networks.topology import degenerate_branches, fitting_depth, stage_sizes
from nnunet_kaz.trainers import XBoundNetTrainer
from tests.conftest import KAZ, KAZ_ID, nnunet_env, run, shrink_plans

pytestmark = pytest.mark.integration

KAZ256_ID, KAZ256 = 981, "Dataset981_Kaz256"
KITS_ID, KITS = 982, "Dataset982_Kits3d"
KITS_TINY_ID, KITS_TINY = 983, "Dataset983_KitsTiny"


# ----------------------------------------------------------------------------------------------- unit level


def test_depth_rule_by_hand():
    stock_256 = [[1, 1]] + [[2, 2]] * 6  # nnU-Net's 7 stages for a 256x256 patch
    assert fitting_depth([256, 256], stock_256) == 4  # 256 -> 128 -> 64 -> 32 (>= 19); 16 would be < 19
    assert stage_sizes([256, 256], stock_256[:4])[-1] == [32, 32]
    assert fitting_depth([512, 512], [[1, 1]] + [[2, 2]] * 7) == 5  # bridge 32
    assert fitting_depth([192, 192], [[1, 1]] + [[2, 2]] * 6) == 4  # bridge 24
    # anisotropic 3D: z is pooled later and less; a stage may not drop z below 19 either
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert fitting_depth([32, 64, 64], strides) == 2
    assert fitting_depth([80, 160, 160], strides) == 4  # bridge 20x20x20; one more stage would give 10
    assert fitting_depth([48, 160, 160], strides) == 3  # the third pooling would take z from 24 to 12
    # the branch a 3x3 kernel reaches nothing off-centre with: dilation >= edge on every axis with kernel > 1
    assert degenerate_branches([4, 4], [3, 3], (1, 6, 12, 18)) == [1, 2, 3]
    assert degenerate_branches([8, 8], [3, 3], (1, 6, 12, 18)) == [2, 3]
    assert degenerate_branches([32, 32], [3, 3], (1, 6, 12, 18)) == []
    assert degenerate_branches([4, 32, 32], [1, 3, 3], (1, 6, 12, 18)) == []  # z has kernel 1: irrelevant
    assert degenerate_branches([32, 4, 4], [3, 3, 3], (1, 6, 12, 18)) == []  # z still reaches off-centre taps


def off_centre_mask(weight: torch.Tensor) -> torch.Tensor:
    """True at every kernel tap except the centre one."""
    mask = torch.ones_like(weight, dtype=torch.bool)
    centre = tuple(k // 2 for k in weight.shape[2:])
    mask[(slice(None), slice(None), *centre)] = False
    return mask


@torch.no_grad()
def branch_sees_context(net: XBoundNet, x: torch.Tensor, branch: int) -> bool:
    """Brute force: does perturbing only the off-centre taps of one ASPP branch change the bridge output?"""
    bridge = net.bridge
    ref = bridge.features(x)
    w = bridge.branches[branch].weight
    saved = w.clone()
    w[off_centre_mask(w)] += torch.randn(int(off_centre_mask(w).sum())) * w.std() * 10
    # a tolerance for the convolution algorithms' rounding (Winograd transforms mix taps)
    changed = bool((bridge.features(x) - ref).abs().max() > 1e-3 * ref.abs().max())
    w.copy_(saved)
    return changed


@torch.no_grad()
def bridge_input(net: XBoundNet, patch) -> torch.Tensor:
    x = torch.randn(1, 1, *patch)
    for stage in net.encoder.stages:
        x = stage(x)
    return x


def test_brute_force_agrees_with_the_degeneracy_rule():
    """Independent reference for `degenerate_branches`: the perturbation on 4x4, 8x8, 19x19 and 18x18 maps."""
    for edge, expected in ((4, [1, 2, 3]), (8, [2, 3]), (18, [3]), (19, [])):
        net = XBoundNet(1, 2, [4, 8], torch.nn.Conv2d, 3, [[1, 1], [2, 2]], 2).eval()
        x = torch.randn(1, 8, edge, edge)
        assert [b for b in range(4) if not branch_sees_context(net, x, b)] == expected, edge
        assert degenerate_branches([edge, edge], [3, 3], (1, 6, 12, 18)) == expected


# ----------------------------------------------------------------------------------------------- planned data


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A 256x256 kaz2d phantom and a kits3d phantom, planned by `nnunet-kaz plan` (XBoundNet++ plans) and by
    nnU-Net's stock planner (nnUNetPlans), plus the same with a 0.5 GB VRAM target."""
    root = tmp_path_factory.mktemp("topology")
    env = nnunet_env(root)
    make_kaz2d_dataset(root / "nnUNet_raw" / KAZ256, n_patients=2, seed=0, image_size=(256, 256),
                       slices_per_patient=2, n_test_patients=0)
    make_kits3d_dataset(root / "nnUNet_raw" / KITS, n_cases=2, seed=0)
    plan_env = dict(env, nnUNet_n_proc_DA="1")
    for d, c in ((KAZ256_ID, "2d"), (KITS_ID, "3d_fullres")):
        run(["nnunet-kaz", "plan", "-d", str(d), "-c", c, "-np", "1"], plan_env)
        run(["nnUNetv2_plan_experiment", "-d", str(d)], plan_env)
        for planner, name in (("nnunet_kaz.planners.xboundnet_planner.XBoundNetPlanner", "XBSmallGPUPlans"),
                              ("nnunetv2.experiment_planning.experiment_planners.default_experiment_planner."
                               "ExperimentPlanner", "SmallGPUPlans")):
            module, cls = planner.rsplit(".", 1)
            run(["python", "-c", f"from {module} import {cls}\n"
                 "from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset\n"
                 f"plan_experiment_dataset({d}, {cls}, 0.5, overwrite_plans_name='{name}')"], plan_env)
    return root


def load_plans(root: Path, dataset: str, name: str) -> dict:
    return json.loads((root / "nnUNet_preprocessed" / dataset / f"{name}.json").read_text())


def build(cfg: dict) -> XBoundNet:
    arch = cfg["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, 2, allow_init=True).eval()


@pytest.mark.parametrize("dataset,configuration", [(KAZ256, "2d"), (KITS, "3d_fullres")])
def test_planned_bridge_sees_context_with_every_dilated_branch(planned, dataset, configuration):
    cfg = load_plans(planned, dataset, "nnUNetXBoundNetPlans")["configurations"][configuration]
    arch = cfg["architecture"]["arch_kwargs"]
    assert cfg["architecture"]["network_class_name"] == "nnunet_kaz.networks.XBoundNet"
    assert not {"n_conv_per_stage", "n_conv_per_stage_decoder"} & set(arch)  # keys XBoundNet++ would ignore
    if dataset == KAZ256:  # paper 000: four levels, bridge 32x32 for a 256x256 input
        assert cfg["patch_size"] == [256, 256] and arch["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2]]
        assert arch["aspp_dilations"] == [1, 6, 12, 18]
    bridge = stage_sizes(cfg["patch_size"], arch["strides"])[-1]
    pooled = np.prod(arch["strides"], axis=0) > 1
    assert all(19 <= e <= 37 for e, p in zip(bridge, pooled) if p)  # the documented rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ignored, nothing degenerate: no warning
        net = build(cfg)
    x = bridge_input(net, cfg["patch_size"])
    assert list(x.shape[2:]) == bridge
    for b in range(1, len(net.bridge.branches)):  # the dilated ones
        assert branch_sees_context(net, x, b), (dataset, b)


@pytest.mark.parametrize("dataset,configuration", [(KAZ256, "2d"), (KITS, "3d_fullres")])
def test_stock_plans_tiny_bottleneck_capped_or_warned(planned, dataset, configuration):
    plans = load_plans(planned, dataset, "nnUNetPlans")
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    arch = cm.network_arch_init_kwargs
    planned_bridge = stage_sizes(cm.patch_size, arch["strides"])[-1]
    assert max(planned_bridge) <= 8  # nnU-Net plans down to a 4x4(x4) bottleneck

    keep = type("Keep", (XBoundNetTrainer,), {"keep_planned_depth": True})
    with pytest.warns(UserWarning) as record:
        full = keep.build_network_architecture(pm, cm, 1, 2, False).eval()
    msgs = [str(w.message) for w in record if "XBoundNet++ on" in str(w.message)]
    assert len(msgs) == 1 and f"nnUNetPlans configuration {configuration}" in msgs[0]
    assert len(full.encoder.stages) == arch["n_stages"]
    x = bridge_input(full, cm.patch_size)
    degenerate = [b for b in range(4) if not branch_sees_context(full, x, b)]  # brute force
    assert degenerate == [1, 2, 3]
    for b in degenerate:
        assert f"bridge.branches.{b} (dilation {(1, 6, 12, 18)[b]})" in msgs[0]
    assert "bridge.branches.0" not in msgs[0]

    with pytest.warns(UserWarning) as record:
        capped = XBoundNetTrainer.build_network_architecture(pm, cm, 1, 2, False).eval()
    msgs = [str(w.message) for w in record if "XBoundNet++ on" in str(w.message)]
    n = fitting_depth(cm.patch_size, arch["strides"])
    assert len(msgs) == 1 and f"depth capped from {arch['n_stages']} to {n} stages" in msgs[0]
    assert "only ever use their centre tap" not in msgs[0]
    assert len(capped.encoder.stages) == n < arch["n_stages"]
    assert capped.encoder.strides == [list(s) for s in arch["strides"][:n]]  # the others' strides and kernels kept
    assert capped.encoder.kernel_sizes == [list(k) for k in arch["kernel_sizes"][:n]]
    x = bridge_input(capped, cm.patch_size)
    assert all(branch_sees_context(capped, x, b) for b in range(1, 4))


@pytest.mark.parametrize("dataset,configuration,ref_val,ref_bs",
                         [(KAZ256, "2d", 85_000_000, 12), (KITS, "3d_fullres", 560_000_000, 2)])
def test_planner_refits_patch_and_batch_to_the_vram_target(planned, dataset, configuration, ref_val, ref_bs):
    """With a 0.5 GB target, nnU-Net's loop shrinks the patch against XBoundNet++'s own feature-map count
    (larger than PlainConvUNet's), and the batch size is nnU-Net's formula on that estimate."""
    reference = ref_val * 0.5 / 8
    ours = load_plans(planned, dataset, "XBSmallGPUPlans")["configurations"][configuration]
    plain = load_plans(planned, dataset, "SmallGPUPlans")["configurations"][configuration]
    arch = ours["architecture"]
    est = ExperimentPlanner.static_estimate_VRAM_usage(ours["patch_size"], 1, 2, arch["network_class_name"],
                                                       arch["arch_kwargs"], arch["_kw_requires_import"])
    assert est / ref_bs * 2 <= reference  # nnU-Net's fit criterion, with XBoundNet++'s estimate
    assert np.prod(ours["patch_size"]) < np.prod(plain["patch_size"])  # bigger feature maps, smaller patch
    bridge = stage_sizes(ours["patch_size"], arch["arch_kwargs"]["strides"])[-1]
    assert degenerate_branches(bridge, arch["arch_kwargs"]["kernel_sizes"][-1],
                               arch["arch_kwargs"]["aspp_dilations"]) == []


# ----------------------------------------------------------------------------------------------- stock commands


def test_3d_stock_train_and_predict_with_xboundnet_trainer_on_nnunet_plans(tmp_path):
    env = nnunet_env(tmp_path)
    make_kits3d_dataset(tmp_path / "nnUNet_raw" / KITS_TINY, n_cases=5, seed=1, shape=(16, 32, 32),
                        spacing=(2.5, 0.8, 0.8))
    run(["nnUNetv2_plan_and_preprocess", "-d", str(KITS_TINY_ID), "-c", "3d_fullres", "-np", "1"],
        dict(env, nnUNet_n_proc_DA="1"))
    shrink_plans(tmp_path / "nnUNet_preprocessed", KITS_TINY, "nnUNetPlans", "nnUNetTinyPlans", 16)
    proc = run(["nnUNetv2_train", str(KITS_TINY_ID), "3d_fullres", "0", "-tr", "XBoundNetTrainer_debug", "-p",
                "nnUNetTinyPlans", "-device", "cpu"], env)
    assert "XBoundNet++ on nnUNetTinyPlans configuration 3d_fullres" in proc.stderr  # the depth warning
    case = sorted((tmp_path / "nnUNet_raw" / KITS_TINY / "imagesTr").glob("*_0000.nii.gz"))[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / case.name).symlink_to(case)
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(out), "-d", str(KITS_TINY_ID), "-c", "3d_fullres",
         "-f", "0", "-tr", "XBoundNetTrainer_debug", "-p", "nnUNetTinyPlans", "-device", "cpu", "-npp", "1",
         "-nps", "1"], env)
    pred = sitk.ReadImage(str(out / case.name.replace("_0000.nii.gz", ".nii.gz")))
    assert pred.GetSize() == sitk.ReadImage(str(case)).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}


def test_2d_stock_trainer_on_xboundnet_plans_trains_and_predicts(tiny_kaz):
    env = tiny_kaz.env
    run(["nnunet-kaz", "plan", "-d", str(KAZ_ID), "-c", "2d", "-np", "1"], dict(env, nnUNet_n_proc_DA="1"))
    pre = tiny_kaz.root / "nnUNet_preprocessed"
    plans = json.loads((pre / KAZ / "nnUNetXBoundNetPlans.json").read_text())
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    # 32x32 images: too small for a 19-voxel bridge after one downsampling; one downsampling, dilations fitted
    assert arch["n_stages"] == 2 and arch["aspp_dilations"] == [1, 6, 12, 15]
    shrink_plans(pre, KAZ, "nnUNetXBoundNetPlans", "nnUNetXBoundNetTinyPlans", 16)
    run(["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", "nnUNetTrainer_debug", "-p", "nnUNetXBoundNetTinyPlans",
         "-device", "cpu"], env)
    images = tiny_kaz.raw / "imagesTs"
    out = tiny_kaz.root / "pred_xbplans"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(KAZ_ID), "-c", "2d", "-f", "0",
         "-tr", "nnUNetTrainer_debug", "-p", "nnUNetXBoundNetTinyPlans", "-device", "cpu", "-npp", "1",
         "-nps", "1"], env)
    for img in sorted(images.glob("*_0000.png")):
        pred = np.asarray(Image.open(out / img.name.replace("_0000.png", ".png")))
        assert pred.shape == np.asarray(Image.open(img)).shape and set(np.unique(pred)) <= {0, 1}


def test_patch_smaller_than_total_downsampling_is_one_message(tiny_kaz):
    pre = tiny_kaz.root / "nnUNet_preprocessed" / KAZ
    plans = json.loads((pre / "nnUNetTinyPlans.json").read_text())
    plans["plans_name"] = "nnUNetBadPatchPlans"
    cfg = plans["configurations"]["2d"]
    total = np.prod(cfg["architecture"]["arch_kwargs"]["strides"], axis=0)
    cfg["patch_size"] = [int(t) // 2 for t in total]
    (pre / "nnUNetBadPatchPlans.json").write_text(json.dumps(plans))
    proc = run(["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", "XBoundNetTrainer_debug", "-p",
                "nnUNetBadPatchPlans", "-device", "cpu"], tiny_kaz.env, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nnUNetv2_train: error:")]
    assert len(errors) == 1 and "nnUNetBadPatchPlans configuration 2d" in errors[0]
    assert not tiny_kaz.results("XBoundNetTrainer_debug").with_name(
        "XBoundNetTrainer_debug__nnUNetBadPatchPlans__2d").exists()  # no folder or log of the refused run
    assert f"patch size {cfg['patch_size']}" in errors[0] and "total downsampling" in errors[0]
