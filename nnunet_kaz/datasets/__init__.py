"""Data in: synthetic phantoms, KAZ BMP conversion, radial reslicing, KiTS23 conversion, patient-wise splits.

Intensities: KAZ slices are 8-bit (already CT-windowed) and get nnU-Net's per-image z-score (channel
"zscore"); HU NIfTI volumes (KiTS23, kits3d phantom) get CTNormalization (channel "CT").
"""
from nnunet_kaz.datasets.kaz_convert import DEFAULT_PATTERN, convert_kaz, read_kaz_meta, scan_kaz_folders
from nnunet_kaz.datasets.kits23 import convert_kits23, scan_kits23
from nnunet_kaz.datasets.phantom_kaz2d import Kaz2DSlice, kaz2d_patient, make_kaz2d_dataset, write_kaz2d_bmp_folders
from nnunet_kaz.datasets.phantom_kits3d import kits3d_case, make_kits3d_dataset
from nnunet_kaz.datasets.raw import dataset_folder_name, parse_dataset_folder
from nnunet_kaz.datasets.reslice import axis_from_mask, radial_slices, reslice_to_bmp
from nnunet_kaz.datasets.splits import (nested_cv_splits, patient_kfold_splits, write_dataset_splits,
                                        write_patient_splits)

__all__ = ["Kaz2DSlice", "kaz2d_patient", "make_kaz2d_dataset", "write_kaz2d_bmp_folders", "kits3d_case",
           "make_kits3d_dataset", "dataset_folder_name", "parse_dataset_folder", "DEFAULT_PATTERN", "convert_kaz",
           "read_kaz_meta", "scan_kaz_folders", "convert_kits23", "scan_kits23", "axis_from_mask", "radial_slices",
           "reslice_to_bmp", "nested_cv_splits", "patient_kfold_splits", "write_dataset_splits",
           "write_patient_splits"]
