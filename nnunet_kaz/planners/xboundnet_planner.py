"""An nnU-Net experiment planner whose plans name XBoundNet++ as the network."""
from __future__ import annotations

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_kaz.networks import XBoundNet

XBOUNDNET_PLANS = "nnUNetXBoundNetPlans"


class XBoundNetPlanner(ExperimentPlanner):
    """nnU-Net's default planning (spacing, patch, strides, kernels, batch size) with `XBoundNet` as the network.

    Patch and batch size come from nnU-Net's VRAM heuristic applied to XBoundNet++'s own
    `compute_conv_feature_map_size`, so they adapt to its larger feature maps (SE, ASPP, attention gates).
    The plans are saved as `nnUNetXBoundNetPlans.json`; `nnUNetv2_train D C F -p nnUNetXBoundNetPlans` then
    trains XBoundNet++ with nnU-Net's stock trainer. nnU-Net finds planners only inside its own package, so
    this one runs through `nnunet-kaz plan` (or `run_planning` from Python).
    """

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = XBOUNDNET_PLANS,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = XBoundNet
