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


# The authors' network for a 256 x 256 input (AUTHORS_CODE.md, oarbelw/XBoundNetPlusPlus), block by block in
# forward order with the edge of its output; nnU-Net's names for the blocks, nnU-Net's feature counts (README,
# fidelity table: the bottleneck is a strided residual SE block before the ASPP instead of a MaxPool).
AUTHORS_256 = [("encoder.stages.0", 256),   # stem (two 3x3 conv-norm-act) + residual SE level: the 256 skip
               ("encoder.stages.1", 128),   # residual SE level: the 128 skip; dropout after it
               ("encoder.stages.2", 64),    # residual SE level: the 64 skip; dropout after it
               ("encoder.stages.3", 32),    # down to the bottleneck at 256 / 8
               ("bridge", 32),              # ASPP: four 3x3 convolutions, dilations 1, 6, 12, 18, summed; dropout
               ("decoder.gates.0", 64), ("decoder.stages.0", 64),    # gate on the 64 skip, residual SE; dropout
               ("decoder.gates.1", 128), ("decoder.stages.1", 128),  # gate on the 128 skip, residual SE; dropout
               ("decoder.gates.2", 256), ("decoder.stages.2", 256),  # gate on the 256 skip, residual SE; no dropout
               ("decoder.seg_layers.2", 256)]                        # 1x1 convolution head
AUTHORS_DROPOUT_EDGES = [128, 64, 32, 64, 128]  # after encoder levels 128, 64, the ASPP, decoder levels 64, 128


def test_planned_kaz256_network_is_the_authors_topology(planned):
    """The network XBoundNetTrainer builds from `nnunet-kaz plan`'s plans for a 256 x 256 KAZ phantom against
    AUTHORS_256 (hand-listed from the authors' code): the blocks in forward order and the edge of each block's
    output on a 256 x 256 input (forward hooks), where the dropout modules sit, the stem's two 3x3 convolutions,
    every residual SE block's two 3x3 convolutions, SE bottleneck C / 16 and 1x1 shortcut, the ASPP's four 3x3
    branches with dilations 1, 6, 12, 18, each attention gate's 1x1 convolutions to its skip's channels and to one
    channel, and a 1x1 head."""
    from nnunet_kaz.networks.blocks import ResidualBlock

    pm = PlansManager(load_plans(planned, KAZ256, "nnUNetXBoundNetPlans"))
    cm = pm.get_configuration("2d")
    net = XBoundNetTrainer.build_network_architecture(pm, cm, 1, 2, False).eval()
    assert list(net.named_blocks()) == [name for name, _ in AUTHORS_256]
    edges, dropped = {}, []
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: edges.__setitem__(n, o.shape[2:]))
             for n, _ in AUTHORS_256]
    hooks += [m.register_forward_hook(lambda m, i, o: dropped.append(o.shape[2])) for m in net.modules()
              if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    with torch.no_grad():
        net(torch.randn(1, 1, 256, 256))
    for h in hooks:
        h.remove()
    assert [(n, tuple(edges[n])) for n, _ in AUTHORS_256] == [(n, (e, e)) for n, e in AUTHORS_256]
    assert dropped == AUTHORS_DROPOUT_EDGES
    stem = net.encoder.stages[0].stem
    assert len(stem) == 2 and all(c.conv.kernel_size == (3, 3) and c.conv.stride == (1, 1) for c in stem)
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 4 + 3  # encoder levels 256, 128, 64, 32; decoder levels 64, 128, 256
    for b in blocks:
        channels = b.conv2.conv.out_channels
        assert b.conv1.conv.kernel_size == b.conv2.conv.kernel_size == (3, 3)
        assert b.se.fc1.out_channels == channels // 16 and b.se.fc2.out_channels == channels
        assert b.shortcut.kernel_size == (1, 1)
    assert [(c.kernel_size, c.dilation) for c in net.bridge.branches] == [((3, 3), (d, d)) for d in (1, 6, 12, 18)]
    skips = [net.encoder.stages[s].level.conv2.conv.out_channels if s == 0 else
             net.encoder.stages[s].conv2.conv.out_channels for s in (2, 1, 0)]
    for gate, c in zip(net.decoder.gates, skips):
        assert gate.w_x[0].out_channels == gate.w_g[0].out_channels == c and gate.psi.out_channels == 1
        assert {conv.kernel_size for conv in (gate.w_x[0], gate.w_g[0], gate.psi)} == {(1, 1)}
    assert net.decoder.seg_layers[2].kernel_size == (1, 1)


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


def assert_nnunet_prediction_is_the_brute_force_one(results: Path, image: Path, prediction: Path) -> None:
    """`nnUNetv2_predict --save_probabilities` (mirroring on, Gaussian, step 0.5) of `image` against
    `tests.sliding_reference`: the checkpoint's weights, the image preprocessed by nnU-Net's preprocessor (no crop
    and no resampling here, checked, so the outputs are the stitched logits' softmax and argmax voxel for voxel),
    each tile's logits averaged over the checkpoint's mirror flips and stitched by hand in float64 with nnU-Net's
    float16 Gaussian. nnU-Net stitches in float16: each logit is within `half_stitch_bound` of the reference's
    (plus 16 float32 roundings of the flips' mean, 2^-24 each, relative), so each probability within half the
    largest bound of its voxel (a softmax moves by at most p (1 - p) x 2 max|dz| <= max|dz| / 2) plus 1e-6 (its
    float32 softmax), and a voxel may take another class only where the reference's logits of the two classes
    differ by less than the sum of their bounds. The bounds leave most voxels decided (checked)."""
    from nnunet_kaz.inference import load_member
    from tests.sliding_reference import brute_force_stitch, half_stitch_bound, mirrored_logits

    predictor, net = load_member(f"{results}:0", "cpu")
    data, props = predictor.preprocess([str(image)])
    assert tuple(props["shape_before_cropping"]) == tuple(props["shape_after_cropping_and_before_resampling"]) \
        == tuple(data.shape[1:]) and list(predictor.plans_manager.transpose_forward) == list(range(3))
    assert net.mirror_axes  # nnUNetv2_predict mirrors along these
    ref = brute_force_stitch(mirrored_logits(net, net.mirror_axes), [data], net.patch_size, 0.5, torch.float16)
    z = ref.value
    bound = half_stitch_bound(ref.peak, ref.weights, ref.tiles) + 16 * 2.0 ** -24 * ref.peak
    with np.load(prediction.with_suffix("").with_suffix(".npz")) as f:
        probs = f["probabilities"].reshape(z.shape)
    e = np.exp(z - z.max(0))
    assert (np.abs(probs - e / e.sum(0)) <= bound.max(0) / 2 + 1e-6).all()
    seg = (sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))) if prediction.name.endswith(".nii.gz")
           else np.asarray(Image.open(prediction))).reshape(z.shape[1:]).astype(np.int64)
    best = z.argmax(0)

    def at(a, index):
        return np.take_along_axis(a, index[None], 0)[0]

    differ = seg != best
    assert (at(z, best) - at(z, seg) <= at(bound, best) + at(bound, seg))[differ].all()
    assert (at(z, best) - np.sort(z, 0)[-2] > 2 * bound.max(0)).mean() > 0.9


def test_3d_stock_train_and_predict_with_xboundnet_trainer_on_nnunet_plans(tmp_path):
    """The stock commands with XBoundNetTrainer on nnU-Net's own 3D plans: the depth warning, and the
    segmentations of a training case (the patch's size) and of a larger volume no stride divides (8 tiles)
    against the brute-force reference (`assert_nnunet_prediction_is_the_brute_force_one`)."""
    from nnunet_kaz.datasets import kits3d_case

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
    image, _ = kits3d_case(7, 0, (21, 45, 38), (2.5, 0.8, 0.8))
    big = sitk.GetImageFromArray(image)
    big.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(big, str(tmp_path / "in" / "BIG_0000.nii.gz"))
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(out), "-d", str(KITS_TINY_ID), "-c", "3d_fullres",
         "-f", "0", "-tr", "XBoundNetTrainer_debug", "-p", "nnUNetTinyPlans", "-device", "cpu", "-npp", "1",
         "-nps", "1", "--save_probabilities"], env)
    results = tmp_path / "nnUNet_results" / KITS_TINY / "XBoundNetTrainer_debug__nnUNetTinyPlans__3d_fullres"
    for img in (case, tmp_path / "in" / "BIG_0000.nii.gz"):
        pred = out / img.name.replace("_0000.nii.gz", ".nii.gz")
        assert sitk.ReadImage(str(pred)).GetSize() == sitk.ReadImage(str(img)).GetSize()
        assert_nnunet_prediction_is_the_brute_force_one(results, img, pred)


def test_plan_of_32px_images_has_one_downsampling_and_fitted_dilations(tiny_kaz):
    """`nnunet-kaz plan` on 32x32 images: too small for a 19-voxel bridge after one downsampling; one
    downsampling is planned all the same, and the dilations are fitted to the 16x16 bridge (18 -> 15)."""
    run(["nnunet-kaz", "plan", "-d", str(KAZ_ID), "-c", "2d", "-np", "1"], dict(tiny_kaz.env, nnUNet_n_proc_DA="1"))
    plans = json.loads((tiny_kaz.root / "nnUNet_preprocessed" / KAZ / "nnUNetXBoundNetPlans.json").read_text())
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 2 and arch["aspp_dilations"] == [1, 6, 12, 15]


def test_2d_stock_trainer_on_xboundnet_plans_trains_and_predicts(planned, tmp_path):
    """nnU-Net's stock trainer (`nnUNetv2_train -tr nnUNetTrainer_debug`) on `nnunet-kaz plan`'s plans of the
    256x256 phantom (four stages: nnU-Net's trainer needs three or more, README), and the stock prediction of an
    image that is not the patch's size (300 x 200, no zero border, so nothing is cropped) against the brute-force
    reference (`assert_nnunet_prediction_is_the_brute_force_one`). The weights are finite: on a two-stage plan the
    stock trainer weights its only deep-supervision output 0 / 0 and trains NaN, which a shape check passed."""
    env = nnunet_env(planned)
    pre = planned / "nnUNet_preprocessed" / KAZ256
    shrink_plans(planned / "nnUNet_preprocessed", KAZ256, "nnUNetXBoundNetPlans", "nnUNetXBoundNetTinyPlans", 16)
    cases = sorted(p.name[:-len("_0000.png")] for p in (planned / "nnUNet_raw" / KAZ256 / "imagesTr").iterdir())
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:-1], "val": cases[-1:]}]))  # 4 cases
    run(["nnUNetv2_train", str(KAZ256_ID), "2d", "0", "-tr", "nnUNetTrainer_debug", "-p", "nnUNetXBoundNetTinyPlans",
         "-device", "cpu"], env)
    results = planned / "nnUNet_results" / KAZ256 / "nnUNetTrainer_debug__nnUNetXBoundNetTinyPlans__2d"
    weights = torch.load(results / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    images = tmp_path / "in"
    images.mkdir()
    first = planned / "nnUNet_raw" / KAZ256 / "imagesTr" / f"{cases[0]}_0000.png"
    odd = np.maximum(np.asarray(Image.open(first).resize((200, 300), Image.BILINEAR)), 1).astype(np.uint8)
    Image.fromarray(odd).save(images / "odd_0000.png")
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(KAZ256_ID), "-c", "2d", "-f", "0",
         "-tr", "nnUNetTrainer_debug", "-p", "nnUNetXBoundNetTinyPlans", "-device", "cpu", "-npp", "1",
         "-nps", "1", "--save_probabilities"], env)
    assert np.asarray(Image.open(out / "odd.png")).shape == (300, 200)
    assert_nnunet_prediction_is_the_brute_force_one(results, images / "odd_0000.png", out / "odd.png")


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
