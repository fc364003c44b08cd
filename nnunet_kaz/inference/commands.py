"""`nnunet-kaz predict`: the streaming ensemble x MC-dropout predictor."""
from __future__ import annotations

import argparse
from pathlib import Path


def _predict(args: argparse.Namespace) -> int:
    import torch

    from nnunet_kaz.inference import UncertaintyPredictor, parse_member

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mc_batch is None:  # batching samples pays on GPUs; on CPUs one at a time is faster and leaner
        args.mc_batch = 1 if args.device == "cpu" else 8  # (benchmarks/README.md, bench_predictor)

    members = [parse_member(m) for m in args.m]
    calibration = chain = None
    if args.calibration is not None:
        from nnunet_kaz.postprocessing import load_calibrator

        calibration = load_calibrator(args.calibration, labels=members[0].dataset_json["labels"])
    if args.postprocessing is not None:
        from nnunet_kaz.postprocessing import PostprocessingChain

        chain = PostprocessingChain.load(args.postprocessing)
    predictor = UncertaintyPredictor(members, mc=args.mc, mirror=args.mirror, tile_step_size=args.step_size,
                                     device=args.device, mc_batch=args.mc_batch, seed=args.seed,
                                     calibration=calibration, postprocessing=chain)
    scores = predictor.predict_folder(args.i, args.o, args.overwrite, args.num_parts, args.part_id)
    print(f"{len(predictor.models)} model(s) x {max(1, args.mc)} sample(s); outputs and scores.csv "
          f"({len(scores)} rows) in {args.o}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz.inference.members import __doc__ as member_doc

    p = sub.add_parser("predict", help="ensemble x MC-dropout prediction with uncertainty maps and scores",
                       description="Average the probabilities of every member checkpoint and MC-dropout sample, "
                                   "streaming, and write per case: segmentation, CASE.npz (probabilities), "
                                   "CASE_uncertainty.npz (entropy, mutual_information, variance), probability, "
                                   "entropy and MI images, CASE_scores.json; and scores.csv.\n\n" + member_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", type=Path, required=True, help="input folder, nnU-Net naming (CASE_0000.ext)")
    p.add_argument("-o", type=Path, required=True, help="output folder")
    p.add_argument("-m", nargs="+", required=True, metavar="MEMBER", help="RESULTS_DIR[:FOLDS[:CHECKPOINTS]]")
    p.add_argument("--mc", type=int, default=0, help="MC-dropout samples per model (0: dropout off)")
    p.add_argument("--mc-batch", type=int, default=None,
                   help="samples predicted together per tile (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring as nnU-Net (off by default)")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window tile step (default 0.5)")
    p.add_argument("--num-parts", type=int, default=1, help="split the cases into this many parts")
    p.add_argument("--part-id", type=int, default=0, help="which part this process predicts")
    p.add_argument("--overwrite", action="store_true", help="redo cases that are already predicted")
    p.add_argument("--seed", type=int, default=0, help="seed for the MC-dropout masks (default 0)")
    p.add_argument("--calibration", type=Path, help="calibration JSON from `nnunet-kaz calibrate`, applied to the "
                                                    "mean probabilities before thresholding, maps and scores")
    p.add_argument("--postprocessing", type=Path, help="post-processing chain JSON (threshold, closing, largest "
                                                       "component, optional resize for KAZ BMP export)")
    p.add_argument("-device", "--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.set_defaults(func=_predict)
