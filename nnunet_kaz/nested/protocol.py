"""Paper 000's nested protocol after training (sections 2.3 and 3.1), one outer fold at a time, then pooled.

Outer fold k (nnU-Net fold k of a dataset whose splits_final.json holds the nested folds, `splits --nested`):
1. predict fold k's validation slices (val_k) with the members (S seeds of the trainer, fold k) x M MC-dropout
   samples, mirroring off (paper 000's Keras inference does not mirror);
2. fit the logistic calibration (section 2.3: pooled validation slices) on those raw probabilities, and conformal
   risk control on the calibrated ones (the test predictions are calibrated);
3. predict test_k with the same members x M samples (the paper's 5 x 50 = 250 predictions per slice), calibrated
   and post-processed (paper 000's chain: threshold 0.4, closing, largest component, ...), with the conformal masks;
4. evaluate test_k (`evaluate`: metrics.csv, calibration, uncertainty against error, conformal FNR).
Then per method one evaluation of the test predictions of all outer folds pooled (every patient is tested exactly
once) and Table 1 (`evaluation.table1`) with one row per method. Methods: the ensemble (S seeds x M MC) and, unless
switched off, the first seed's single model without MC (the paper's rows "+CombinedLoss" and "+Ensemble"), each with
its own calibration and conformal fit on val_k.

Before anything is computed every input is checked: the nested CV (`read_nested_cv`), every member's
checkpoint, and that no member saw test_k (its fold_k/split.json, written by XBoundNetTrainerPaper, must be
train_k / val_k; members of other trainers are checked against the installed splits_final.json). A rerun reuses
every finished step (a fold's step is done when its last output exists).

Layout of OUT: protocol.json; fold_{k}/images_{val,test}/ (links into imagesTr); fold_{k}/{method}/{val,
val_calibrated,test,evaluation}/ with calibration.json, conformal.json; pooled/{method}/{predictions,evaluation}/;
table1.csv, table1.md, table1.json.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_dir, write_json_atomic

POOLED_FILES = ("{case}{ending}", "{case}.npz", "{case}_uncertainty.npz")


@dataclass
class NestedSettings:
    """What `nnunet-kaz nested-cv evaluate` runs (flags in parentheses)."""
    dataset: str                                   # id or DatasetXXX_Name (-d)
    configuration: str = "2d"                      # (-c)
    trainer: str = "XBoundNetTrainerPaper"         # members TRAINER_seed{s} (-tr)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    outer_folds: list[int] | None = None           # None: every outer fold of nested_cv.json
    plans: str = "nnUNetPlans"                     # (-p)
    mc: int = 50                                   # MC-dropout samples per member (--mc)
    mc_batch: int | None = None
    device: str = "auto"
    seed: int = 0                                  # of the MC-dropout masks
    alpha: float | None = 0.1                      # conformal bound on the expected FNR; None: no conformal step
    calibration_method: str = "logistic"
    postprocessing: str | None = None              # chain JSON; None: PostprocessingChain.paper000 (see below)
    single_model: bool = True                      # also the first seed's single model without MC

    def check(self) -> None:
        if not self.seeds:
            raise KazError("no seeds given (seeds)", option="seeds")
        if self.mc < 0:
            raise KazError(f"the number of MC samples (mc) must be >= 0, got {self.mc}", option="mc")
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise KazError(f"alpha must lie in (0, 1), got {self.alpha}", option="alpha")


@dataclass
class Method:
    slug: str
    name: str
    seeds: list[int]
    mc: int


@dataclass
class Protocol:
    """Everything checked, ready to run (`prepare`)."""
    settings: NestedSettings
    out: Path
    dataset_name: str
    raw: Path
    dataset_json: dict
    nested: dict
    folds: list[int]
    methods: list[Method]
    chain_json: dict

    @property
    def ending(self) -> str:
        return self.dataset_json["file_ending"]

    def results(self, seed: int) -> Path:
        from nnunet_kaz.paths import nnunet_folder

        s = self.settings
        return nnunet_folder("nnUNet_results") / self.dataset_name / f"{s.trainer}_seed{seed}__{s.plans}__" \
                                                                     f"{s.configuration}"

    def members(self, method: Method, fold: int) -> list[str]:
        return [f"{self.results(s)}:{fold}" for s in method.seeds]

    def fold_dir(self, fold: int, method: Method | None = None) -> Path:
        base = self.out / f"fold_{fold}"
        return base / method.slug if method else base

    def cases(self, fold: int, role: str) -> list[str]:
        return list(self.nested["folds"][fold][role])


def methods_of(s: NestedSettings) -> list[Method]:
    """The ensemble (every seed x MC) and, unless switched off, the first seed's single model without MC."""
    samples = f"{len(s.seeds)} seeds x {s.mc} MC" if s.mc else f"{len(s.seeds)} seeds"
    out = [Method("ensemble", f"{s.trainer} ensemble ({samples}), calibrated + post-processed", list(s.seeds), s.mc)]
    if s.single_model and (len(s.seeds) > 1 or s.mc > 0):
        out.insert(0, Method(f"single_seed{s.seeds[0]}", f"{s.trainer} single model (seed {s.seeds[0]}), "
                             "calibrated + post-processed", [s.seeds[0]], 0))
    return out


def default_chain(dataset_json: dict, raw: Path) -> dict:
    """Paper 000's chain (threshold 0.4, closing, largest component, holes, minimum size); when the dataset's
    `kaz_meta.json` gives every slice the same original size, the cleaned mask is also resized to it for the BMP
    export (kaz_export/), as section 2.3."""
    from nnunet_kaz.postprocessing import PostprocessingChain

    size = None
    meta = raw / "kaz_meta.json"
    if meta.is_file():
        sizes = {tuple(c["original_size"]) for c in json.loads(meta.read_text())["cases"].values()}
        if len(sizes) == 1:
            size = list(sizes.pop())
    return PostprocessingChain.paper000(size=size, labels=dataset_json["labels"]).to_dict()


def prepare(settings: NestedSettings, out: Path) -> Protocol:
    """Check every input (module docstring) and return the protocol; nothing is written."""
    from nnunet_kaz.datasets.splits import read_nested_cv
    from nnunet_kaz.inference import parse_member
    from nnunet_kaz.paths import nnunet_folder
    from nnunet_kaz.trainers.paper_trainer import SPLIT_FILE

    settings.check()
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(settings.dataset)
    except (RuntimeError, ValueError):
        raise KazError(f"no dataset {settings.dataset!r} in nnUNet_raw / nnUNet_preprocessed / "
                       "nnUNet_results") from None
    raw = nnunet_folder("nnUNet_raw") / name
    pre = nnunet_folder("nnUNet_preprocessed") / name
    for needed in (raw / "dataset.json", raw / "imagesTr", raw / "labelsTr"):
        if not needed.exists():
            raise KazError(f"{needed} not found: the nested protocol predicts the raw training images")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    nested = read_nested_cv(pre, require_installed=False)
    n_outer = len(nested["folds"])
    folds = list(range(n_outer)) if settings.outer_folds is None else sorted(set(settings.outer_folds))
    bad = [k for k in folds if not 0 <= k < n_outer]
    if bad:
        raise KazError(f"outer fold(s) {bad} do not exist; {pre / 'nested_cv' / 'nested_cv.json'} has {n_outer}",
                       option="outer_folds")
    if settings.postprocessing:
        from nnunet_kaz.postprocessing import PostprocessingChain

        chain = PostprocessingChain.load(settings.postprocessing).to_dict()  # checked before any prediction
    else:
        chain = default_chain(dataset_json, raw)
    proto = Protocol(settings, Path(out), name, raw, dataset_json, nested, folds, methods_of(settings), chain)
    missing, leaks, unchecked = [], [], []
    for k in folds:
        fold = nested["folds"][k]
        for seed in settings.seeds:
            fold_dir = proto.results(seed) / f"fold_{k}"
            if not (fold_dir / "checkpoint_final.pth").is_file():
                missing.append(str(fold_dir))
                continue
            split = fold_dir / SPLIT_FILE
            if not split.is_file():
                unchecked.append(str(fold_dir))
                continue
            used = json.loads(split.read_text())
            if set(used["train"]) != set(fold["train"]) or set(used["val"]) != set(fold["val"]):
                leaks.append(f"{fold_dir} trained on other cases than outer fold {k}'s train / val "
                             f"({len(set(used['train']) & set(fold['test']))} of its training cases are in test_{k})")
    if missing:
        raise KazError(f"{len(missing)} member run(s) not trained (no checkpoint_final.pth): {', '.join(missing[:6])}"
                       f"{' ...' if len(missing) > 6 else ''}; the job list: nnunet-kaz nested-cv jobs")
    if leaks:
        raise KazError("; ".join(leaks[:4]) + "; retrain them on the nested splits (nnunet-kaz splits --nested)")
    if unchecked:  # other trainers do not record their split: the installed splits must be the nested ones
        read_nested_cv(pre, require_installed=True)
    for k in folds:
        for m in proto.methods:
            [parse_member(spec) for spec in proto.members(m, k)]
    return proto


def link_images(cases: list[str], raw: Path, folder: Path, ending: str) -> Path:
    """`folder` with links CASE_0000{ending} -> imagesTr (predict's input; one channel per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        for src in sorted((raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            link = folder / src.name
            if not link.exists():
                link.symlink_to(src.resolve())
    return folder


def _predict(proto: Protocol, method: Method, fold: int, images: Path, out: Path, calibration=None,
             conformal=None, progress: bool = True) -> None:
    from nnunet_kaz.inference import UncertaintyPredictor, parse_member
    from nnunet_kaz.postprocessing import PostprocessingChain

    s = proto.settings
    chain = PostprocessingChain.from_dict(proto.chain_json) if calibration is not None else None
    predictor = UncertaintyPredictor([parse_member(m) for m in proto.members(method, fold)], mc=method.mc,
                                     mirror=False,  # paper 000's Keras inference does not mirror
                                     device=s.device, mc_batch=s.mc_batch, seed=s.seed, verbose=progress,
                                     calibration=calibration, postprocessing=chain, conformal=conformal)
    predictor.predict_folder(images, out)


def run_fold(proto: Protocol, fold: int, method: Method, progress: bool = True) -> Path:
    """Steps 1-4 of the module docstring for one outer fold and method; returns the test evaluation folder."""
    from nnunet_kaz.conformal import ConformalMasks
    from nnunet_kaz.conformal.folder_fit import fit_folder, foreground_labels
    from nnunet_kaz.evaluation.evaluate import EvaluationSettings, evaluate_folder
    from nnunet_kaz.postprocessing import load_calibrator, save_calibrator
    from nnunet_kaz.postprocessing.folder_fit import ValidationSet, fit_on_validation, write_calibrated

    s, ending, labels_dir = proto.settings, proto.ending, proto.raw / "labelsTr"
    base, work = proto.fold_dir(fold), proto.fold_dir(fold, method)
    evaluation = work / "evaluation"
    if (evaluation / "evaluation.json").is_file():
        return evaluation
    say = print if progress else (lambda *a, **k: None)
    say(f"outer fold {fold}, {method.name}")
    val_images = link_images(proto.cases(fold, "val"), proto.raw, base / "images_val", ending)
    test_images = link_images(proto.cases(fold, "test"), proto.raw, base / "images_test", ending)
    val = work / "val"
    _predict(proto, method, fold, val_images, val, progress=progress)
    calib_file = work / "calibration.json"
    if not calib_file.is_file():
        vs = ValidationSet.from_folders(val, labels_dir)
        cal, ece = fit_on_validation(vs, s.calibration_method, progress=progress)
        with atomic_dir(work / "val_calibrated") as tmp:
            write_calibrated(vs, cal, tmp, progress=progress)
        save_calibrator(cal, calib_file)
        say(f"  calibration ({s.calibration_method}) on {len(vs.cases)} validation slices: pooled ECE "
            f"{ece['before']:.4f} -> {ece['after']:.4f}")
    calibration = load_calibrator(calib_file, labels=proto.dataset_json["labels"])
    conformal = None
    if s.alpha is not None:
        conformal_file = work / "conformal.json"
        if not conformal_file.is_file():
            names = [name for name, _ in foreground_labels(proto.dataset_json["labels"])]
            write_json_atomic(fit_folder(work / "val_calibrated", labels_dir, names, s.alpha,
                                         proto.raw / "dataset.json", progress=progress), conformal_file)
        conformal = ConformalMasks.load(conformal_file)
    test = work / "test"
    _predict(proto, method, fold, test_images, test, calibration, conformal, progress)
    evaluate_folder(test, labels_dir, evaluation, test, EvaluationSettings(pred_subset=True, figure_cases=0),
                    uncertainty_dir=test, scores_csv=test / "scores.csv", progress=progress,
                    conformal_dir=test if conformal is not None else None)
    return evaluation


def pool(proto: Protocol, method: Method, progress: bool = True) -> Path:
    """One evaluation of the test predictions of every outer fold (links to their files; scores.csv joined)."""
    from nnunet_kaz.evaluation.evaluate import EvaluationSettings, evaluate_folder

    target = proto.out / "pooled" / method.slug
    with atomic_dir(target / "predictions") as tmp:
        frames = []
        for k in proto.folds:
            test = proto.fold_dir(k, method) / "test"
            for case in proto.cases(k, "test"):
                for pattern in POOLED_FILES:
                    name = pattern.format(case=case, ending=proto.ending)
                    os.symlink((test / name).resolve(), tmp / name)
            frames.append(pd.read_csv(test / "scores.csv").assign(outer_fold=k))
        pd.concat(frames, ignore_index=True).to_csv(tmp / "scores.csv", index=False)
        write_json_atomic(proto.dataset_json, tmp / "dataset.json")
    preds = target / "predictions"
    evaluate_folder(preds, proto.raw / "labelsTr", target / "evaluation", preds,
                    EvaluationSettings(pred_subset=True, figure_cases=0), uncertainty_dir=preds,
                    scores_csv=preds / "scores.csv", progress=progress)
    return target / "evaluation"


def run(proto: Protocol, progress: bool = True) -> pd.DataFrame:
    """Every outer fold and method, the pooled evaluations and Table 1; returns Table 1."""
    from nnunet_kaz.evaluation.table1 import distance_unit, table1, write_table1

    proto.out.mkdir(parents=True, exist_ok=True)
    s = proto.settings
    write_json_atomic({"settings": asdict(s), "dataset": proto.dataset_name, "outer_folds": proto.folds,
                       "methods": [asdict(m) for m in proto.methods],
                       "members": {m.slug: {k: proto.members(m, k) for k in proto.folds} for m in proto.methods},
                       "cases": {k: {r: proto.cases(k, r) for r in ("train", "val", "test")} for k in proto.folds},
                       "postprocessing": proto.chain_json, "mirror": False}, proto.out / "protocol.json")
    with warnings.catch_warnings():
        warnings.simplefilter("once")  # every member load repeats the same network warnings: show each once
        for k in proto.folds:
            for m in proto.methods:
                run_fold(proto, k, m, progress)
        pooled = {m.name: pool(proto, m, progress) for m in proto.methods}
    table = table1({name: pd.read_csv(folder / "metrics.csv") for name, folder in pooled.items()})
    write_table1(table, proto.out, distance_unit(proto.ending), {name: str(f) for name, f in pooled.items()})
    return table


__all__ = ["NestedSettings", "Protocol", "Method", "prepare", "run", "run_fold", "pool", "methods_of",
           "default_chain", "link_images"]
