"""Calibration of probabilities fitted on validation predictions, and the post-processing chain (threshold,
closing, largest component with the cyst rule, Lanczos-4 resize and KAZ BMP export), paper 000 section 2.3."""
from nnunet_kaz.postprocessing.calibration import (CALIBRATORS, Calibrator, IsotonicCalibrator,
                                                   LogisticCalibrator, TemperatureCalibrator, apply_calibration,
                                                   check_probabilities, classes_from_labels, labels_to_channels,
                                                   load_calibrator, make_calibrator, save_calibrator, top_label_ece)
from nnunet_kaz.postprocessing.chain import (CHAIN_FILENAME, Argmax, ChainResult, Closing, LargestComponent,
                                             PostprocessingChain, Resize, Threshold, write_kaz_bmp)
from nnunet_kaz.postprocessing.components import hu_to_image_units, keep_largest_components
from nnunet_kaz.postprocessing.lanczos import resize_lanczos4, resize_probabilities
from nnunet_kaz.postprocessing.morphology import close_labels, ellipsoid_element
from nnunet_kaz.postprocessing.pooling import VoxelPool, pool_cases

__all__ = ["CALIBRATORS", "Calibrator", "IsotonicCalibrator", "LogisticCalibrator", "TemperatureCalibrator",
           "apply_calibration", "check_probabilities", "classes_from_labels", "labels_to_channels",
           "load_calibrator", "make_calibrator", "save_calibrator", "top_label_ece",
           "CHAIN_FILENAME", "Argmax", "ChainResult", "Closing", "LargestComponent", "PostprocessingChain", "Resize",
           "Threshold", "write_kaz_bmp", "hu_to_image_units", "keep_largest_components", "resize_lanczos4",
           "resize_probabilities", "close_labels", "ellipsoid_element", "VoxelPool", "pool_cases"]
