"""Streaming ensemble x MC-dropout prediction with uncertainty maps and per-image scores."""
from nnunet_kaz.lazy import lazy_exports

_EXPORTS = {
    "UncertaintyPredictor": "predictor",
    "Member": "members",
    "parse_member": "members",
    "load_member": "predictor",
    "load_models": "members",
    "LoadedModel": "members",
    "resolve_device": "predictor",
    "stitch_tiles": "tiling",
    "collect_scores": "predictor",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
