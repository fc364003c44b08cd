"""Paper 000's nested patient-wise cross-validation on nnU-Net's own commands: the training job list (`jobs`),
the per-outer-fold prediction, calibration, post-processing and evaluation, pooled into Table 1 (`protocol`)."""
from nnunet_kaz.lazy import lazy_exports

_EXPORTS = {
    "NestedSettings": "protocol",
    "prepare": "protocol",
    "run": "protocol",
    "write_jobs": "jobs",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
