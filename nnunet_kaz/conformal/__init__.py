"""Conformal risk control: masks with a guaranteed expected miss rate (Angelopoulos et al., ICLR 2024)."""
from nnunet_kaz.conformal.folder_fit import ConformalMasks, fit_folder
from nnunet_kaz.conformal.risk_control import FNRControl, check_alpha, false_negative_rate, min_cases

__all__ = ["ConformalMasks", "FNRControl", "check_alpha", "false_negative_rate", "fit_folder", "min_cases"]
