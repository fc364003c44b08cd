"""`nnunet-kaz explain`: layer-wise Grad-CAM of a trained member for one or more images."""
from __future__ import annotations

import argparse
from pathlib import Path


def _explain(args: argparse.Namespace) -> int:
    from nnunet_kaz.explain.cli_run import explain_images

    written = explain_images(args.i, args.m, args.o, layers=args.layers, target=args.target, gt=args.gt,
                             target_class=args.target_class, device=args.device)
    for path in written:
        print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="layer-wise Grad-CAM heatmaps of every block, as a grid PNG and maps",
                       description="Seg-Grad-CAM (paper 000 section 2.2, paper 001 eq. 1-2) of every block of a "
                                   "trained network, from one backward pass per image. Writes per case "
                                   "CASE_gradcam.png (block by block over the image), CASE_gradcam.npz (one map per "
                                   "block, in the input's geometry) and, for NIfTI inputs, one NIfTI per block.")
    p.add_argument("-i", type=Path, nargs="+", required=True, help="image file(s) CASE_0000.ext (nnU-Net naming)")
    p.add_argument("-m", required=True, metavar="MEMBER", help="RESULTS_DIR[:FOLD[:CHECKPOINT]] (first checkpoint "
                                                                "is used)")
    p.add_argument("-o", type=Path, required=True, help="output folder")
    p.add_argument("--layers", nargs="+", default=["all"], help="block names, or 'all' (default)")
    p.add_argument("--target", choices=("pred", "gt"), default="pred",
                   help="sum the class logits over the prediction (default) or the ground truth (--gt)")
    p.add_argument("--gt", type=Path, help="ground-truth folder (CASE.ext) or file, for --target gt")
    p.add_argument("--target-class", type=int, default=1, help="class whose logits are explained (default 1)")
    p.add_argument("-device", "--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=_explain)
