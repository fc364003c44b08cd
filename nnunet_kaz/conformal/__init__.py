"""Conformal risk control: masks with a guaranteed expected miss rate (Angelopoulos et al., ICLR 2024)."""
from nnunet_kaz.conformal.risk_control import FNRControl, check_alpha, false_negative_rate, min_cases

__all__ = ["FNRControl", "check_alpha", "false_negative_rate", "min_cases"]
