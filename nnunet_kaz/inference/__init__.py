"""Streaming ensemble x MC-dropout prediction with uncertainty maps and per-image scores."""
from nnunet_kaz.inference.members import Member, parse_member
from nnunet_kaz.inference.predictor import UncertaintyPredictor, collect_scores, list_cases

__all__ = ["UncertaintyPredictor", "Member", "parse_member", "list_cases", "collect_scores"]
