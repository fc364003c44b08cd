"""Data in: synthetic phantoms, KAZ BMP conversion, radial reslicing, KiTS23 conversion, patient-wise splits.

Intensities: KAZ slices are 8-bit (already CT-windowed) and get nnU-Net's per-image z-score (channel
"zscore"); HU NIfTI volumes (KiTS23, kits3d phantom) get CTNormalization (channel "CT").
"""
from nnunet_kaz.lazy import lazy_exports

_EXPORTS = {
    "Kaz2DSlice": "phantom_kaz2d",
    "kaz2d_patient": "phantom_kaz2d",
    "make_kaz2d_dataset": "phantom_kaz2d",
    "write_kaz2d_bmp_folders": "phantom_kaz2d",
    "kits3d_case": "phantom_kits3d",
    "make_kits3d_dataset": "phantom_kits3d",
    "write_kits3d_kits23_folders": "phantom_kits3d",
    "dataset_folder_name": "raw",
    "parse_dataset_folder": "raw",
    "DEFAULT_PATTERN": "kaz_convert",
    "convert_kaz": "kaz_convert",
    "read_kaz_meta": "kaz_convert",
    "scan_kaz_folders": "kaz_convert",
    "convert_kits23": "kits23",
    "scan_kits23": "kits23",
    "axis_from_mask": "reslice",
    "radial_slices": "reslice",
    "reslice_to_bmp": "reslice",
    "nested_cv_splits": "splits",
    "patient_kfold_splits": "splits",
    "write_dataset_splits": "splits",
    "write_patient_splits": "splits",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
