"""`nnunet-kaz plan`: fingerprint, XBoundNet++ plans and preprocessing in one step."""
from __future__ import annotations

import argparse


def _plan(args: argparse.Namespace) -> int:
    from nnunet_kaz.planners.planning import run_planning

    plans = run_planning(args.d, args.c, args.np, args.verify_dataset_integrity, args.clean, args.gpu_memory_target)
    print(f"Plans '{plans}' written; train with: nnUNetv2_train {args.d} {args.c[0]} 0 -p {plans}  "
          f"(or -tr XBoundNetTrainer -p {plans})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan and preprocess with XBoundNet++ plans (nnUNetXBoundNetPlans)",
                       description="Run nnU-Net's fingerprint extraction, planning with XBoundNetPlanner and "
                                   "preprocessing. Needs nnUNet_raw and nnUNet_preprocessed.")
    p.add_argument("-d", type=int, required=True, help="dataset id, e.g. 501")
    p.add_argument("-c", nargs="+", default=["2d"], help="configurations to preprocess (default: 2d)")
    p.add_argument("-np", type=int, default=2, help="worker processes (>= 1; default 2)")
    p.add_argument("--verify_dataset_integrity", action="store_true", help="check the raw dataset first")
    p.add_argument("--clean", action="store_true", help="recompute an existing fingerprint")
    p.add_argument("-gpu_memory_target", type=float, default=None, help="VRAM target in GB (default: planner's 8)")
    p.set_defaults(func=_plan)
