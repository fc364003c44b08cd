"""Experiment planning that writes XBoundNet++ into nnU-Net plans (`nnUNetXBoundNetPlans`)."""
from nnunet_kaz.planners.planning import resolve_dataset_name, run_planning

__all__ = ["run_planning", "resolve_dataset_name", "XBoundNetPlanner", "XBOUNDNET_PLANS"]


def __getattr__(name: str):
    # the planner imports nnU-Net and torch; load it only when asked for
    if name in ("XBoundNetPlanner", "XBOUNDNET_PLANS"):
        from nnunet_kaz.planners import xboundnet_planner

        return getattr(xboundnet_planner, name)
    raise AttributeError(name)
