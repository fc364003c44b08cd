"""Data-in sub-commands of `nnunet-kaz`: phantom, convert-kaz, reslice, convert-kits23, splits."""
from __future__ import annotations

import argparse
from pathlib import Path


def _phantom(args: argparse.Namespace) -> int:
    from nnunet_kaz.datasets import make_kaz2d_dataset, make_kits3d_dataset
    from nnunet_kaz.errors import KazError

    if args.kind == "kaz2d":
        if args.format == "kits23":
            raise KazError("--format kits23 applies to kits3d only")
        size = tuple(args.size) if args.size else ((510, 788) if args.format == "bmp" else (128, 128))
        if len(size) == 1:
            size = (size[0], size[0])
        if len(size) != 2:
            raise KazError(f"--size for kaz2d takes H [W], got {args.size}")
        if args.format == "bmp":
            from nnunet_kaz.datasets import write_kaz2d_bmp_folders
            if args.test_patients:
                raise KazError("--test-patients applies to --format nnunet; convert-kaz splits BMP folders by patient")
            out = write_kaz2d_bmp_folders(args.o, args.n, args.seed, size, args.slices, args.overwrite)
        else:
            out = make_kaz2d_dataset(args.o, args.n, args.seed, size, args.slices, args.test_patients,
                                     args.overwrite)
    else:
        if args.test_patients or args.format == "bmp":
            raise KazError("--test-patients and --format bmp apply to kaz2d only")
        size = tuple(args.size) if args.size else (32, 64, 64)
        if len(size) != 3:
            raise KazError(f"--size for kits3d takes Z Y X, got {args.size}")
        if args.format == "kits23":
            from nnunet_kaz.datasets.phantom_kits3d import write_kits3d_kits23_folders
            out = write_kits3d_kits23_folders(args.o, args.n, args.seed, size, tuple(args.spacing), args.overwrite)
        else:
            out = make_kits3d_dataset(args.o, args.n, args.seed, size, tuple(args.spacing), args.overwrite)
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write a seeded synthetic nnU-Net raw dataset (kaz2d or kits3d)",
                       description="Synthetic phantoms as nnU-Net v2 raw datasets. kaz2d: radial CT slices "
                                   "(8-bit PNG) of a kidney with an ablation zone; labels are a perturbed "
                                   "annotation, truthTr/ holds the true zone. kits3d: NIfTI HU volumes with "
                                   "kidney 1, tumour 2, cyst 3 and anisotropic spacing.")
    p.add_argument("--kind", choices=("kaz2d", "kits3d"), required=True)
    p.add_argument("-o", type=Path, required=True, help="dataset folder named DatasetXXX_Name, "
                                                        "e.g. $nnUNet_raw/Dataset501_KAZPhantom (any folder "
                                                        "with --format bmp)")
    p.add_argument("--format", choices=("nnunet", "bmp", "kits23"), default="nnunet",
                   help="kaz2d: nnU-Net raw dataset (default) or KAZ-style images/ masks/ truth/ BMP folders "
                        "for convert-kaz (default size 510 788); kits3d: nnU-Net raw dataset (default) or the "
                        "KiTS23 layout case_XXXXX/{imaging,segmentation}.nii.gz + instances/ with three "
                        "raters' annotations, for convert-kits23")
    p.add_argument("-n", type=int, required=True, help="patients (kaz2d) or cases (kits3d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs="+", help="kaz2d: H [W] (default 128 128); kits3d: Z Y X "
                                                       "(default 32 64 64)")
    p.add_argument("--slices", type=int, default=12, help="kaz2d radial slices per patient (default 12)")
    p.add_argument("--test-patients", type=int, default=0, help="kaz2d: last K patients to imagesTs/labelsTs/truthTs")
    p.add_argument("--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8), metavar=("Z", "Y", "X"),
                   help="kits3d voxel spacing in mm (default 2.5 0.8 0.8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty dataset folder")
    p.set_defaults(func=_phantom)
    register_converters(sub)


def _size(values, what: str):
    from nnunet_kaz.errors import KazError
    if values is None:
        return None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise KazError(f"{what} takes N or H W, got {values}")
    return tuple(values)


def _convert_kaz(args: argparse.Namespace) -> int:
    from nnunet_kaz.datasets.kaz_convert import DEFAULT_PATTERN, convert_kaz

    out = convert_kaz(args.images, args.masks, args.id, args.name, args.pattern or DEFAULT_PATTERN, _size(args.resize, "--resize"),
                      args.truth, n_folds=args.folds, seed=args.seed, overwrite=args.overwrite,
                      test_patients=args.test_patients, nested=args.nested, normalization=args.normalization)
    print(f"wrote {out} and patient-wise splits in $nnUNet_preprocessed/{out.name}/ "
          f"(splits_final.json{' = the nested outer folds' if args.nested else ''}, nested_cv/)")
    return 0


def _reslice(args: argparse.Namespace) -> int:
    from nnunet_kaz.datasets.reslice import reslice_to_bmp

    files = reslice_to_bmp(args.image, args.o, args.mask, args.axis_point, args.axis_dir, args.axis_from_mask,
                           args.step, _size(args.size, "--size"), args.pixel, args.patient,
                           (args.window[0], args.window[1]), args.overwrite)
    print(f"wrote {len(files)} BMP slices to {args.o}")
    return 0


def _convert_kits23(args: argparse.Namespace) -> int:
    from nnunet_kaz.datasets.kits23 import convert_kits23

    out = convert_kits23(args.kits, args.id, args.name, args.regions, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _splits(args: argparse.Namespace) -> int:
    from nnunet_kaz.datasets.splits import write_dataset_splits

    out = write_dataset_splits(args.d, args.pattern, args.folds, args.seed, overwrite=args.overwrite,
                               nested=args.nested)
    what = " (the nested CV's outer folds: nnUNetv2_train D C k trains outer fold k)" if args.nested else ""
    print(f"wrote {out['splits_final']}{what} and {out['nested_cv'].parent}/")
    return 0


def register_converters(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz.cli_options import add
    p = sub.add_parser("convert-kaz", help="KAZ BMP slices + masks -> nnU-Net raw 2D dataset with patient-wise splits",
                       description="Pair slices and masks by patient and angle (--pattern), check them all, write "
                                   "$nnUNet_raw/DatasetXXX_Name (PNG, labels 0/1, kaz_meta.json with original "
                                   "sizes) and $nnUNet_preprocessed/DatasetXXX_Name/splits_final.json (patient-wise "
                                   "folds) plus nested_cv/ (5 outer folds, 64/16/20 train/val/test patients).")
    p.add_argument("--images", type=Path, required=True, help="folder of grayscale slices (.bmp/.png/.tif)")
    p.add_argument("--masks", type=Path, required=True, help="folder of masks, 0/255 or 0/1")
    p.add_argument("--truth", type=Path, help="optional folder of true zones (phantoms), written to truthTr/")
    add(p, "-d", "--id", dest="id", type=int, required=True, help="dataset id, e.g. 501")
    p.add_argument("--name", default="KAZ", help="dataset name (default KAZ): DatasetXXX_NAME, case prefix")
    p.add_argument("--pattern", default=None, help="regex with groups (?P<patient>) and (?P<angle>) matched at the "
                                                   "start of file stems (default: '(?P<patient>.+?)_a(?P<angle>\\d+)')")
    p.add_argument("--resize", type=int, nargs="+", metavar="N", help="resize slices to N x N (or H W); "
                                                                      "paper 000 uses 256")
    p.add_argument("--folds", type=int, default=5, help="patient-wise folds (default 5)")
    p.add_argument("--test-patients", type=int, default=0, help="hold the last K patients out as imagesTs/labelsTs")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient shuffling (default 0)")
    p.add_argument("--nested", action="store_true",
                   help="splits_final.json = the nested CV's outer folds (paper 000: 64/16/20 %% train/val/test "
                        "patients), so nnUNetv2_train D 2d k trains outer fold k and never sees its test patients")
    p.add_argument("--normalization", choices=("zscore", "rgb_to_0_1"), default="zscore",
                   help="nnU-Net channel name: zscore (per-image z-score, default) or rgb_to_0_1 (x / 255, paper "
                        "000's [0, 1] scaling as its authors' code)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset and its splits")
    p.set_defaults(func=_convert_kaz)

    p = sub.add_parser("reslice", help="radial reslicing of a CT volume around an axis into BMP slices",
                       description="Planes through an axis every --step degrees over 180 degrees, resampled in "
                                   "physical coordinates (linear for the image, nearest for the mask), CT-windowed "
                                   "to 8-bit BMP in DIR/images and DIR/masks, ready for convert-kaz.")
    p.add_argument("--image", type=Path, required=True, help="CT volume (e.g. .nii.gz) in HU")
    p.add_argument("--mask", type=Path, help="mask on the same grid")
    p.add_argument("--axis-point", type=float, nargs=3, metavar=("X", "Y", "Z"), help="a point of the axis (mm, "
                                                                                      "world coordinates)")
    p.add_argument("--axis-dir", type=float, nargs=3, metavar=("DX", "DY", "DZ"), help="axis direction (world)")
    p.add_argument("--axis-from-mask", action="store_true", help="axis = the mask's principal axis through its "
                                                                 "centroid")
    p.add_argument("--step", type=float, default=15.0, help="degrees between planes (default 15: 12 planes)")
    p.add_argument("--size", type=int, nargs="+", metavar="N", help="output H W (default: square, covering the volume)")
    p.add_argument("--pixel", type=float, help="output pixel size in mm (default: smallest input spacing)")
    p.add_argument("--patient", help="patient id in the file names (default: image file name)")
    p.add_argument("--window", type=float, nargs=2, default=(40.0, 400.0), metavar=("LEVEL", "WIDTH"),
                   help="CT window in HU (default 40 400)")
    p.add_argument("-o", type=Path, required=True, help="output folder (images/, masks/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing slices of this patient")
    p.set_defaults(func=_reslice)

    p = sub.add_parser("convert-kits23", help="KiTS23 case folders -> nnU-Net raw 3D dataset",
                       description="Copy case_XXXXX/imaging.nii.gz and segmentation.nii.gz to "
                                   "$nnUNet_raw/DatasetXXX_Name with labels kidney 1, tumour 2, cyst 3, or with "
                                   "--regions the nested regions kidney+masses (1,2,3), masses (2,3), tumour (2). "
                                   "Cases with two or more raters under instances/ also get their per-voxel "
                                   "rater-disagreement map in raterDisagreementTr/ (for evaluate --raters).")
    p.add_argument("--kits", type=Path, required=True, help="folder holding case_XXXXX/ folders")
    add(p, "-d", "--id", dest="id", type=int, required=True, help="dataset id, e.g. 220")
    p.add_argument("--name", default="KiTS23", help="dataset name (default KiTS23)")
    p.add_argument("--regions", action="store_true", help="region-based dataset.json (challenge's nested regions)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert_kits23)

    p = sub.add_parser("splits", help="patient-wise splits_final.json and nested CV for an existing raw dataset",
                       description="Group cases by patient (kaz_meta.json, or --pattern on case names; default "
                                   "reads KAZ_P003_a045 as P003) and write splits_final.json and nested_cv/ into "
                                   "$nnUNet_preprocessed/DatasetXXX_Name.")
    p.add_argument("-d", type=int, required=True, help="dataset id")
    p.add_argument("--pattern", help="regex with a group (?P<patient>...) matched at the start of case names")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nested", action="store_true",
                   help="splits_final.json = the nested CV's outer folds (train_k / val_k; test_k only in "
                        "nested_cv/nested_cv.json), so nnUNetv2_train D C k trains outer fold k")
    p.add_argument("--overwrite", action="store_true", help="replace an existing splits_final.json")
    p.set_defaults(func=_splits)
