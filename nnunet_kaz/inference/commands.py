"""`nnunet-kaz predict`: the streaming ensemble x MC-dropout predictor."""
from __future__ import annotations

import argparse
from pathlib import Path


def _predict(args: argparse.Namespace) -> int:
    from nnunet_kaz.inference import UncertaintyPredictor, parse_member

    members = [parse_member(m) for m in args.m]
    calibration = chain = None
    if args.calibration is not None:
        from nnunet_kaz.postprocessing import load_calibrator

        calibration = load_calibrator(args.calibration, labels=members[0].dataset_json["labels"])
    if args.postprocessing is not None:
        from nnunet_kaz.postprocessing import PostprocessingChain

        chain = PostprocessingChain.load(args.postprocessing)
    conformal = None
    if args.conformal is not None:
        from nnunet_kaz.conformal import ConformalMasks

        conformal = ConformalMasks.load(args.conformal)
    predictor = UncertaintyPredictor(members, mc=args.mc, mirror=not args.disable_tta,
                                     tile_step_size=args.tile_step_size,
                                     device=args.device, mc_batch=args.mc_batch, seed=args.seed,
                                     calibration=calibration, postprocessing=chain,
                                     calibrated_entropy=args.calibrated_entropy, conformal=conformal,
                                     device_memory=None if args.device_memory is None else args.device_memory * 2**30,
                                     device_processes=args.device_processes,
                                     pairwise_dice=not args.no_pairwise_dice, verbose=not args.quiet, tta=args.tta)
    scores = predictor.predict_folder(args.i, args.o, args.overwrite, args.num_parts, args.part_id)
    flips = f" x {len(predictor.flips(0))} test-time flips" if args.tta else ""
    print(f"{len(predictor.models)} model(s) x {max(1, args.mc)} sample(s){flips}; outputs and scores.csv "
          f"({len(scores)} rows) in {args.o}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz import cli_options as o
    from nnunet_kaz.inference.members import __doc__ as member_doc

    p = sub.add_parser("predict", help="ensemble x MC-dropout prediction with uncertainty maps and scores",
                       description="Average the probabilities of every member checkpoint and MC-dropout sample, "
                                   "streaming, and write per case: segmentation, CASE.npz (probabilities), "
                                   "CASE_uncertainty.npz (entropy, mutual_information, variance), probability, "
                                   "entropy and MI images, CASE_scores.json; and scores.csv. Every uncertainty "
                                   "output comes from the uncalibrated samples; --calibration changes only the "
                                   "probabilities and the segmentation.\n\n" + member_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_inputs(p, many=False, help="input folder, nnU-Net naming (CASE_0000.ext)")
    o.add_output(p)
    o.add_member(p, many=True)
    p.add_argument("--mc", type=int, default=0, help="MC-dropout samples per model (0: dropout off)")
    p.add_argument("--mc-batch", type=int, default=None,
                   help="samples predicted together per tile (default: 1 on CPU, 8 on GPU; on a GPU bounded by "
                        "the memory a case may use)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                   help="GiB one case may use on the device (default: the GPU's free memory divided by "
                        "--device-processes); accumulators that do not fit go to CPU memory")
    p.add_argument("--device-processes", type=int, default=1, metavar="P",
                   help="how many predict processes share this device, e.g. P when --num-parts P jobs run on one "
                        "GPU: each takes 1/P of its free memory by default (default 1)")
    p.add_argument("--no-pairwise-dice", action="store_true",
                   help="do not keep the samples' masks for the exact pairwise Dice: less memory and time, the "
                        "pairwise_dice and pairwise_dice_pooled scores are NaN")
    p.add_argument("--disable-tta", action="store_true",
                   help="no test-time mirroring. By default each sample is, as in nnUNetv2_predict, the mean of the "
                        "logits over every flip of the axes its member was trained to mirror (nnU-Net's within-sample "
                        "mirroring; 4 forward passes per tile for a 2D member, 8 for 3D); nnU-Net's --disable_tta")
    o.add_retired_switch(p, "--mirror", "test-time mirroring is the default; --disable-tta turns it off")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation as an uncertainty method: each of nnU-Net's mirror flips (4 in 2D, 8 "
                        "in 3D) is a sample of its own, streamed like MC samples (entropy, MI, variance and scores "
                        "over members x --mc samples x flips); replaces the default within-sample mirroring (which "
                        "averages the flips' logits inside one sample)")
    o.add_step(p)
    p.add_argument("--num-parts", type=int, default=1, help="split the cases into this many parts")
    p.add_argument("--part-id", type=int, default=0, help="which part this process predicts")
    p.add_argument("--overwrite", action="store_true", help="redo cases that are already predicted")
    o.add_seed(p, "of the MC-dropout masks")
    p.add_argument("--calibration", type=Path, help="calibration JSON from `nnunet-kaz calibrate`, applied to the "
                                                    "mean probabilities (and so the segmentation) only")
    p.add_argument("--calibrated-entropy", action="store_true",
                   help="with --calibration, also write the entropy of the calibrated probabilities "
                        "(CASE_calibrated_entropy.ext, key calibrated_entropy)")
    p.add_argument("--postprocessing", type=Path, help="post-processing chain JSON (threshold, closing, largest "
                                                       "component, optional resize for KAZ BMP export)")
    p.add_argument("--conformal", type=Path, help="conformal.json from `nnunet-kaz conformal fit`: also write "
                                                  "CASE_conformal_LABEL.ext, the mask with a guaranteed expected "
                                                  "miss rate, from the output probabilities (calibrated with "
                                                  "--calibration: fit it on the same kind of probabilities)")
    o.add_device(p)
    o.add_quiet(p)
    p.set_defaults(func=_predict)
