"""Data in: synthetic phantoms (KAZ radial slices, KiTS-like volumes) written as nnU-Net v2 raw datasets."""
from nnunet_kaz.datasets.phantom_kaz2d import Kaz2DSlice, kaz2d_patient, make_kaz2d_dataset
from nnunet_kaz.datasets.phantom_kits3d import kits3d_case, make_kits3d_dataset
from nnunet_kaz.datasets.raw import dataset_folder_name, parse_dataset_folder

__all__ = ["Kaz2DSlice", "kaz2d_patient", "make_kaz2d_dataset", "kits3d_case", "make_kits3d_dataset",
           "dataset_folder_name", "parse_dataset_folder"]
