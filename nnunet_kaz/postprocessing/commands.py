"""`nnunet-kaz calibrate`: fit a probability calibrator on validation predictions."""
from __future__ import annotations

import argparse
from pathlib import Path


def _calibrate(args: argparse.Namespace) -> int:
    from nnunet_kaz.errors import KazError
    from nnunet_kaz.io_utils import atomic_dir
    from nnunet_kaz.postprocessing.calibration import CALIBRATORS, save_calibrator
    from nnunet_kaz.postprocessing.folder_fit import ValidationSet, fit_on_validation, write_calibrated

    if args.method not in CALIBRATORS:
        raise KazError(f"unknown method '{args.method}'")
    if args.o.exists() and args.o.is_dir():
        raise KazError(f"output {args.o} is a folder; give the calibration file's name (e.g. calib.json)")
    npz_dir = args.o.with_name(args.o.name.split(".")[0] + "_calibrated") if args.npz else None
    vs = ValidationSet.from_folders(args.probs, args.gt, args.dataset_json)
    print(f"{len(vs.cases)} validation case(s); classes {', '.join(c['name'] for c in vs.classes)}"
          + (f" (from {vs.dataset_json})" if vs.dataset_json else " (no dataset.json found: named by channel)"))
    cal, ece = fit_on_validation(vs, args.method, args.max_voxels_per_class, args.seed, progress=not args.quiet)
    if npz_dir is not None:
        with atomic_dir(npz_dir) as tmp:
            write_calibrated(vs, cal, tmp, progress=not args.quiet)
    save_calibrator(cal, args.o)
    params = cal.to_dict()["parameters"]
    shown = "isotonic step functions" if args.method == "isotonic" else params
    print(f"{args.method} calibration {shown}; pooled-sample ECE {ece['before']:.4f} -> {ece['after']:.4f} "
          f"(in-sample); written to {args.o}" + (f"; calibrated npz in {npz_dir}" if npz_dir else ""))
    for note in cal.notes_:
        print(f"note: {note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="fit a probability calibrator (logistic / platt / temperature / isotonic) on validation npz",
        description="Fit a calibrator on validation probabilities (CASE.npz with 'probabilities' (C, *spatial) "
                    "in the image geometry: nnU-Net's fold_X/validation after training with --npz, or "
                    "nnunet-kaz predict's output) against the label images (CASE.nii.gz / .png / .bmp ...). "
                    "Voxels are pooled with a seeded class-stratified subsample (at most --max-voxels-per-class "
                    "per class, importance-weighted back to the true class frequencies). Paper 000 section 2.3 "
                    "uses 1-D logistic calibration on p (--method logistic).")
    from nnunet_kaz import cli_options as o

    o.add_probs(p, "-p", required=True, help="folder of CASE.npz validation probability files")
    o.add_gt(p, "-l", required=True, help="folder of label images (e.g. labelsTr)")
    p.add_argument("-o", type=Path, required=True, metavar="CALIB_JSON", help="calibration file to write")
    p.add_argument("--method", default="logistic", choices=["logistic", "platt", "temperature", "isotonic"],
                   help="logistic: paper 000's 1-D logistic regression on p (sklearn liblinear, C=1, as the "
                        "authors; default); platt: logistic regression on logit p; temperature; isotonic")
    p.add_argument("--npz", action="store_true",
                   help="also write the calibrated validation probabilities to <CALIB>_calibrated/CASE.npz")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="dataset.json naming the classes (default: found next to --probs or --gt)")
    p.add_argument("--max-voxels-per-class", type=int, default=200_000,
                   help="voxels kept per true class in the pooled sample (default 200000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voxel subsample (default 0)")
    o.add_quiet(p)
    p.set_defaults(func=_calibrate)
