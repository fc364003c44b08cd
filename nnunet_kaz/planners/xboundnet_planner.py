"""An nnU-Net experiment planner whose plans name XBoundNet++ as the network, at the paper's depth."""
from __future__ import annotations

import warnings

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_kaz.errors import KazError
from nnunet_kaz.networks import XBoundNet
from nnunet_kaz.networks.topology import PAPER_DILATIONS, as_per_axis, fit_dilations, max_dilation, stage_sizes
from nnunet_kaz.networks.xboundnet import IGNORED_PLANS_KEYS

XBOUNDNET_PLANS = "nnUNetXBoundNetPlans"


class XBoundNetPlanner(ExperimentPlanner):
    """nnU-Net's default planning (spacing, patch, strides, kernels, batch size) with `XBoundNet` as the network
    and its ASPP bridge at the paper's scale (paper 000 section 2.1: four levels, bridge 32x32 for 256x256).

    Depth rule (`nnunet_kaz.networks.topology`): nnU-Net's own topology search (`get_pool_and_conv_props`) with
    `UNet_featuremap_min_edge_length = max(aspp_dilations) + 1` (19) instead of 4, so an axis is pooled only while
    it keeps at least 19 voxels after pooling and every dilated branch has off-centre taps on the bridge: 256x256
    -> strides 1, 2, 2, 2 (bridge 32x32); in 3D the same per axis (a thin axis is pooled less or not at all).
    nnU-Net's loop then shrinks the patch and sets the batch size against its VRAM target with XBoundNet++'s own
    `compute_conv_feature_map_size` (as for PlainConvUNet), re-running the topology for each candidate patch, so
    the plans stay trainable on the same GPU budget. When the images are too small for one downsampling at that
    edge, the minimum edge is lowered until there is one (XBoundNet++ needs an encoder and a decoder level), and
    the dilations are reduced along the axes where the bridge is too short: `aspp_dilations` in the plans holds one
    dilation per axis for every branch (`fit_dilations`), with a warning. Plans keys of nnU-Net's U-Nets that
    XBoundNet++ ignores (`n_conv_per_stage`, ...) are left out.

    The plans are saved as `nnUNetXBoundNetPlans.json`; `nnUNetv2_train D C F -p nnUNetXBoundNetPlans` then
    trains XBoundNet++ with nnU-Net's stock trainer. nnU-Net finds planners only inside its own package, so
    this one runs through `nnunet-kaz plan` (or `run_planning` from Python).
    """

    aspp_dilations = PAPER_DILATIONS

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = XBOUNDNET_PLANS,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = XBoundNet
        self.UNet_featuremap_min_edge_length = max_dilation(self.aspp_dilations) + 1

    @staticmethod
    def static_estimate_VRAM_usage(patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        """nnU-Net's estimate; a one-stage candidate (no downsampling: XBoundNet++ cannot be built) is estimated
        as two stages at full resolution, so nnU-Net's patch loop can go on (such a plan is replaced below)."""
        if arch_kwargs["n_stages"] < 2:
            arch_kwargs = dict(arch_kwargs, n_stages=2, strides=[arch_kwargs["strides"][0]] * 2,
                               kernel_sizes=[arch_kwargs["kernel_sizes"][0]] * 2,
                               features_per_stage=[arch_kwargs["features_per_stage"][0]] * 2)
        return ExperimentPlanner.static_estimate_VRAM_usage(patch_size, input_channels, output_channels,
                                                            arch_class_name, arch_kwargs, arch_kwargs_req_import)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        wanted = max_dilation(self.aspp_dilations) + 1
        plan = None
        try:
            for edge in range(wanted, 0, -1):  # lowered only when the images allow no downsampling at `wanted`
                self.UNet_featuremap_min_edge_length = edge
                plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                           approximate_n_voxels_dataset, _cache)
                if plan["architecture"]["arch_kwargs"]["n_stages"] >= 2:
                    break
        finally:
            self.UNet_featuremap_min_edge_length = wanted
        arch = plan["architecture"]["arch_kwargs"]
        if arch["n_stages"] < 2:
            raise KazError(f"{data_identifier}: median image size {list(map(int, median_shape))} allows no "
                           f"downsampling; XBoundNet++ needs at least one (an encoder and a decoder level)")
        for key in IGNORED_PLANS_KEYS:
            arch.pop(key, None)
        bridge = stage_sizes(plan["patch_size"], arch["strides"])[-1]
        dilations = fit_dilations(bridge, arch["kernel_sizes"][-1], self.aspp_dilations)
        uniform = [d[0] if len(set(d)) == 1 else list(d) for d in dilations]
        if dilations != as_per_axis(self.aspp_dilations, len(bridge)):
            warnings.warn(f"{data_identifier}: the {'x'.join(map(str, bridge))} bridge is shorter than "
                          f"{wanted} voxels along some axis; ASPP dilations reduced to fit: {uniform}")
        arch["aspp_dilations"] = uniform
        if arch["n_stages"] == 2:  # one deep-supervision output, which nnUNetTrainer._build_loss weights 0 / 0
            warnings.warn(f"{data_identifier}: XBoundNet++ gets 2 stages on patch {plan['patch_size']}; nnU-Net's own "
                          "trainers give a 2-stage network's single deep-supervision output the weight 0/0 (NaN "
                          "losses): train these plans with -tr XBoundNetTrainer (or nnUNetTrainerNoDeepSupervision)")
        return plan
