"""Data-in sub-commands of `nnunet-kaz`: `phantom` (synthetic raw datasets)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _phantom(args: argparse.Namespace) -> int:
    from nnunet_kaz.datasets import make_kaz2d_dataset, make_kits3d_dataset
    from nnunet_kaz.errors import KazError

    if args.kind == "kaz2d":
        size = tuple(args.size) if args.size else (128, 128)
        if len(size) == 1:
            size = (size[0], size[0])
        if len(size) != 2:
            raise KazError(f"--size for kaz2d takes H [W], got {args.size}")
        out = make_kaz2d_dataset(args.o, args.n, args.seed, size, args.slices, args.test_patients, args.overwrite)
    else:
        if args.test_patients:
            raise KazError("--test-patients applies to kaz2d only")
        size = tuple(args.size) if args.size else (32, 64, 64)
        if len(size) != 3:
            raise KazError(f"--size for kits3d takes Z Y X, got {args.size}")
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
                                                        "e.g. $nnUNet_raw/Dataset501_KAZPhantom")
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
