"""Moved to `nnunet_kaz.cases` (the one module for cases on disk); these names stay importable from here for one
release."""
from nnunet_kaz.cases import (  # noqa: F401
    CasePair,
    ImageHeader,
    dataset_labels,
    labels_present,
    list_label_files,
    load_probabilities,
    load_uncertainty,
    match_cases,
    npz_array_shape,
    read_array,
    read_header,
    read_segmentation,
)
