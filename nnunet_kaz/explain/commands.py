"""`nnunet-kaz explain` (layer-wise Grad-CAM), `nnunet-kaz mhex` (MHEX+ CAMs and collaboration uncertainty) and
`nnunet-kaz refine fit|apply` (ERNet heatmap-guided refinement) for trained members."""
from __future__ import annotations

import argparse
from pathlib import Path


def _explain(args: argparse.Namespace) -> int:
    from nnunet_kaz.explain.cli_run import explain_images

    written = explain_images(args.i, args.m, args.o, layers=args.layers, target=args.target, gt=args.gt,
                             target_class=args.target_class, device=args.device, tile_step_size=args.tile_step_size)
    for path in written:
        print(path)
    return 0


def _mhex(args: argparse.Namespace) -> int:
    from nnunet_kaz.explain.mhex_cli import mhex_images

    for path in mhex_images(args.i, args.m, args.o, ensemble=args.ensemble or (), mc=args.mc,
                            target_class=args.target_class, device=args.device, tile_step_size=args.tile_step_size):
        print(path)
    return 0


def _refine_fit(args: argparse.Namespace) -> int:
    from nnunet_kaz.explain.refine_cli import refine_fit

    d = refine_fit(args.m, args.i, args.gt, args.o, margin=args.margin, target_class=args.target_class,
                   layer=args.layer, roi=args.roi, iterations=args.iterations, learning_rate=args.learning_rate,
                   seed=args.seed, device=args.device, tile_step_size=args.tile_step_size, reduction=args.reduction)
    print(f"{args.o}: fitted on {d['fit']['n_voxels']} ROI voxels of {len(d['fit']['cases'])} case(s) "
          f"(block {d['features']['block']}, loss {d['fit']['initial_loss']:.4g} -> {d['fit']['final_loss']:.4g})")
    return 0


def _refine_apply(args: argparse.Namespace) -> int:
    from nnunet_kaz.explain.refine_cli import refine_apply

    table = refine_apply(args.m, args.i, args.refiner, args.o, gt_dir=args.gt, device=args.device,
                         tile_step_size=args.tile_step_size)
    if table is not None:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"written to {args.o / 'refinement_effect.csv'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz import cli_options as o

    p = sub.add_parser("explain", help="layer-wise Grad-CAM heatmaps of every block, as a grid PNG and maps",
                       description="Seg-Grad-CAM (paper 000 section 2.2, paper 001 eq. 1-2) of every block of a "
                                   "trained network, from one backward pass per tile, on nnU-Net's sliding window "
                                   "(images of any size). Writes per case CASE_gradcam.png (block by block over "
                                   "the image), CASE_gradcam.npz (one map per block, in the input's geometry) "
                                   "and, for NIfTI inputs, one NIfTI per block.")
    o.add_inputs(p)
    o.add_member(p)
    o.add_output(p)
    p.add_argument("--layers", nargs="+", default=["all"], help="block names, or 'all' (default)")
    p.add_argument("--target", choices=("pred", "gt"), default="pred",
                   help="sum the class logits over the prediction (default) or the ground truth (--gt)")
    o.add_gt(p, help="ground-truth folder (CASE.ext) or file, for --target gt")
    o.add_target_class(p, "whose logits are explained")
    o.add_step(p)
    o.add_device(p)
    p.set_defaults(func=_explain)
    _register_mhex(sub)
    _register_refine(sub)


def _register_mhex(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz import cli_options as o

    p = sub.add_parser("mhex", help="MHEX+ per-stage CAMs and collaboration-gradient uncertainty (paper 003)",
                       description="For a member trained with MHEX+ heads (XBoundNetTrainerMHEX, nnUNetTrainerMHEX): "
                                   "per image the equivalent-kernel CAM of every decoder stage and the "
                                   "collaboration-gradient map U (sum of cosines of adjacent heads' per-voxel "
                                   "gradients; D = (L-1) - U, high = heads disagree). Writes CASE_mhex.png (grid) "
                                   "and CASE_mhex.npz (maps in the input's geometry). With --ensemble and/or --mc, "
                                   "also the ensemble's entropy and variance maps and mhex_agreement.csv (IoU, Dice "
                                   "of the Otsu regions and Pearson's r, paper 003 Table 1).")
    o.add_inputs(p)
    o.add_member(p, what=" of an MHEX+ member")
    o.add_output(p)
    p.add_argument("--ensemble", nargs="+", metavar="MEMBER", help="ensemble members for the reference maps")
    p.add_argument("--mc", type=int, default=0, help="MC-dropout samples per ensemble model (alone: of -m itself)")
    o.add_target_class(p, "whose CAMs and variance are shown")
    o.add_step(p)
    o.add_device(p)
    p.set_defaults(func=_mhex)


def _register_refine(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz import cli_options as o

    p = sub.add_parser("refine", help="ERNet heatmap-guided probability refinement inside the ROI (paper 001)",
                       description="Fit (on validation cases with labels) and apply ERNet's 2-5-1 network that "
                                   "refits the class probability from (probability, Grad-CAM heatmap weight of the "
                                   "last decoder block) inside the predicted foreground's bounding box + margin "
                                   "(paper 001 Algorithm 3). Voxels outside that box never change.")
    rsub = p.add_subparsers(dest="refine_command", metavar="fit|apply")
    rsub.required = True
    f = rsub.add_parser("fit", help="fit the refiner on labelled cases; writes its JSON")
    o.add_member(f)
    o.add_inputs(f, many=False, help="folder of images CASE_0000.ext (e.g. validation cases)")
    o.add_gt(f, "-l", required=True, help="folder of labels CASE.ext")
    o.add_output(f, help="refiner JSON to write")
    f.add_argument("--margin", type=int, default=5, help="ROI margin in voxels of the input image (default 5)")
    o.add_target_class(f, "to refine")
    f.add_argument("--roi", choices=("all", "largest"), default="all",
                   help="box every predicted voxel of the class (default) or only its largest connected component")
    f.add_argument("--layer", help="Grad-CAM block (default: the last decoder stage)")
    f.add_argument("--iterations", type=int, default=1000, help="gradient-descent iterations (default 1000)")
    f.add_argument("--gradients", dest="reduction", choices=("sum", "mean"), default="sum",
                   help="sum: Algorithm 3 verbatim, gradients summed over the ROI voxels (default; diverges on "
                        "large ROIs, with an error); mean: the faster variant of this package, mean gradients")
    f.add_argument("--learning-rate", type=float, default=None,
                   help="default 0.01 with --gradients sum (Algorithm 3), 0.5 with --gradients mean")
    o.add_seed(f, "of the U[0,1) initialisation")
    o.add_step(f)
    o.add_device(f)
    f.set_defaults(func=_refine_fit)
    a = rsub.add_parser("apply", help="refine a member's segmentations with a fitted refiner")
    o.add_member(a)
    o.add_inputs(a, many=False, help="folder of images CASE_0000.ext")
    a.add_argument("--refiner", type=Path, required=True, help="JSON written by `nnunet-kaz refine fit`")
    o.add_output(a, help="output folder: CASE.ext, CASE.npz (probabilities, roi)")
    o.add_gt(a, help="ground-truth folder: writes refinement_effect.csv (Dice, HD95)")
    o.add_step(a)
    o.add_device(a)
    a.set_defaults(func=_refine_apply)
