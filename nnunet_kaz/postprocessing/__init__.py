"""Calibration of probabilities fitted on validation predictions, and the post-processing chain (threshold,
closing, largest component with the cyst rule, Lanczos-4 resize and KAZ BMP export), paper 000 section 2.3.
"""
from nnunet_kaz.lazy import lazy_exports

_EXPORTS = {
    "CALIBRATORS": "calibration",
    "Calibrator": "calibration",
    "IsotonicCalibrator": "calibration",
    "LogisticCalibrator": "calibration",
    "TemperatureCalibrator": "calibration",
    "apply_calibration": "calibration",
    "check_probabilities": "calibration",
    "classes_from_labels": "calibration",
    "labels_to_channels": "calibration",
    "load_calibrator": "calibration",
    "make_calibrator": "calibration",
    "save_calibrator": "calibration",
    "top_label_ece": "calibration",
    "CHAIN_FILENAME": "chain",
    "Argmax": "chain",
    "ChainResult": "chain",
    "Closing": "chain",
    "FillHoles": "chain",
    "MinimumSize": "chain",
    "ResizeMask": "chain",
    "resize_label_map": "chain",
    "LargestComponent": "chain",
    "PostprocessingChain": "chain",
    "Resize": "chain",
    "Threshold": "chain",
    "write_kaz_bmp": "chain",
    "hu_to_image_units": "components",
    "keep_largest_components": "components",
    "remove_small_components": "components",
    "resize_lanczos4": "lanczos",
    "resize_probabilities": "lanczos",
    "close_labels": "morphology",
    "ellipsoid_element": "morphology",
    "VoxelPool": "pooling",
    "pool_cases": "pooling",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
