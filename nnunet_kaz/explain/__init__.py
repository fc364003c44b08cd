"""Interpretability: layer-wise Seg-Grad-CAM (paper 000 section 2.2, paper 001 eq. 1-2), ERNet heatmap-guided
refinement (paper 001 Algorithm 3), MHEX+ equivalent-kernel CAMs and collaboration-gradient uncertainty (paper 003).

The MHEX+ heads themselves are a network option: `nnunet_kaz.networks.mhex.MHEXPlus`.
"""
from nnunet_kaz.lazy import lazy_exports

_EXPORTS = {
    "LayerGradCAM": "gradcam",
    "explain_case": "gradcam",
    "list_blocks": "gradcam",
    "network_dim": "gradcam",
    "resolve_layers": "gradcam",
    "save_maps_npz": "gradcam",
    "sliding_window_gradcam": "gradcam",
    "save_gradcam_grid": "figures",
    "pick_slice": "figures",
    "HeatmapRefiner": "refinement",
    "heatmap_feature": "refinement",
    "pool_roi_features": "refinement",
    "roi_from_mask": "refinement",
    "mhex_cams": "mhex",
    "collaboration_uncertainty": "mhex",
    "ensemble_variance": "mhex",
    "ensemble_entropy": "mhex",
    "uncertainty_agreement": "mhex",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
