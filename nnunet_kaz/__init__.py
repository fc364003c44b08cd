"""nnunet-kaz: nnU-Net v2 extension for ambiguous-boundary segmentation with uncertainty.

Sub-packages (one per capability): networks, trainers, planners, inference, uncertainty,
postprocessing, evaluation, explain, datasets. The `nnunet-kaz` command (cli.py) is a thin layer over them.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nnunet-kaz")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from nnunet_kaz.versions import check as _check_versions

_check_versions()  # torch / numpy older than pyproject.toml's floors: one message naming the fix
