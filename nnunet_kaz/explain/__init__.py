"""Interpretability: layer-wise Seg-Grad-CAM (paper 000 section 2.2, paper 001 eq. 1-2), ERNet heatmap-guided
refinement (paper 001 Algorithm 3), MHEX+ equivalent-kernel CAMs and collaboration-gradient uncertainty (paper 003).

The MHEX+ heads themselves are a network option: `nnunet_kaz.networks.mhex.MHEXPlus`.
"""
from nnunet_kaz.explain.figures import pick_slice, save_gradcam_grid
from nnunet_kaz.explain.gradcam import (
    LayerGradCAM,
    explain_case,
    list_blocks,
    network_dim,
    resolve_layers,
    save_maps_npz,
    sliding_window_gradcam,
)
from nnunet_kaz.explain.mhex import (
    collaboration_uncertainty,
    ensemble_entropy,
    ensemble_variance,
    mhex_cams,
    uncertainty_agreement,
)
from nnunet_kaz.explain.refinement import HeatmapRefiner, heatmap_feature, pool_roi_features, roi_from_mask

__all__ = ["LayerGradCAM", "explain_case", "list_blocks", "network_dim", "resolve_layers", "save_maps_npz",
           "sliding_window_gradcam", "save_gradcam_grid", "pick_slice", "HeatmapRefiner", "heatmap_feature",
           "pool_roi_features", "roi_from_mask", "mhex_cams", "collaboration_uncertainty", "ensemble_variance",
           "ensemble_entropy", "uncertainty_agreement"]
