"""`nnunet-kaz conformal fit`: a threshold per label with a guaranteed expected miss rate (conformal risk control)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _fit(args: argparse.Namespace) -> int:
    from nnunet_kaz.conformal.folder_fit import fit_folder
    from nnunet_kaz.errors import KazError
    from nnunet_kaz.io_utils import write_json_atomic

    if args.o.is_dir():
        raise KazError(f"output {args.o} is a folder; give the file's name (e.g. conformal.json)")
    result = fit_folder(args.probs, args.gt, args.label, args.alpha, args.dataset_json, progress=not args.quiet)
    write_json_atomic(result, args.o)
    for x in result["labels"]:
        print(f"{x['name']}: lambda-hat {x['lambda_hat']:.6f}, mask p >= {x['threshold']:.6f}; validation mean FNR "
              f"{x['validation_risk']:.4f} over {x['n_cases']} cases ({x['n_cases_with_label']} with the label); "
              f"guarantee E[FNR] <= {result['alpha']}")
    print(f"written to {args.o}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from nnunet_kaz import cli_options as o

    p = sub.add_parser("conformal", help="conformal risk control: masks with a guaranteed expected miss rate",
                       description="Conformal risk control of the false-negative rate (Angelopoulos et al., ICLR "
                                   "2024). `fit` picks, per label, the smallest mask {p >= 1 - lambda} whose expected "
                                   "FNR on a new case exchangeable with the validation cases is at most alpha.")
    fit = p.add_subparsers(dest="conformal_command", metavar="STEP", required=True).add_parser(
        "fit", help="fit lambda-hat on validation probabilities and labels",
        description="Per case the FNR of {p >= 1 - lambda} against the label (0 when the label is absent); "
                    "lambda-hat = the smallest lambda with n/(n+1) * mean FNR + 1/(n+1) <= alpha, found exactly over "
                    "the distinct probability values. Probabilities: CASE.npz ('probabilities', (C, *spatial)) from "
                    "nnunet-kaz predict or nnU-Net's --save_probabilities / --npz; softmax or region-based.")
    o.add_probs(fit, "-p", required=True, help="folder of CASE.npz validation probabilities")
    o.add_gt(fit, "-l", required=True, help="folder of label images (e.g. labelsTr)")
    fit.add_argument("--label", nargs="+", required=True, metavar="NAME_OR_ID",
                     help="label(s) of dataset.json to control (names, or values for non-region datasets)")
    fit.add_argument("--alpha", type=float, default=0.1, help="bound on the expected FNR, in (0, 1) (default 0.1)")
    fit.add_argument("--dataset-json", type=Path, default=None,
                     help="dataset.json naming the labels (default: found next to --probs or --gt)")
    o.add_output(fit, "conformal file to write", metavar="CONFORMAL_JSON")
    o.add_quiet(fit)
    fit.set_defaults(func=_fit)
