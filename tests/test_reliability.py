"""Reliability matrix (issue 9 item 2): every user-facing `nnunet-kaz` command, and the stock `nnUNetv2_train`
with our trainers, fed bad input (missing or empty folders, unreadable or truncated images, NaN probabilities,
a wrong dataset id, mismatched geometry, a corrupted checkpoint, a write error) ends with ONE message on stderr
(`nnunet-kaz CMD: error: ...`, naming the offending file or id, no Python traceback), a non-zero exit code and
nothing new or changed on disk (no output folder, no `.part` temporaries, nothing in the nnU-Net folders).
And an interrupted predict (frozen right after its first finished case, then SIGKILLed) resumes to outputs
identical to an uninterrupted run.

Every row runs the real CLI as a subprocess. Models come from the session's tiny phantom (`tiny_kaz`); one
trained member (XBoundNetTrainer_debug, which other tests train too) serves predict, explain and the resume.
Tests run as root, so a read-only folder would not block writes: the write errors use an output path under a
regular file. Row ids read `command-failure`; the messages they check are listed in ROWS.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_kaz.io_utils import TEMPORARY_NAME
from tests.conftest import BIN, KAZ, KAZ_ID, nnunet_env, run

pytestmark = pytest.mark.integration

MEMBER = "XBoundNetTrainer_debug"


def truncate(path: Path, keep: float | int = 0.5) -> Path:
    """Cut a file to `keep` bytes (int) or that fraction of its length."""
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


def write_nifti(arr: np.ndarray, path: Path, spacing_xyz=(0.78, 0.78, 3.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="module")
def bad(tiny_kaz, tmp_path_factory) -> SimpleNamespace:
    """Every bad input, built once: copies and truncations of the tiny phantom, synthetic predictions."""
    from nnunet_kaz.datasets import kits3d_case, write_kaz2d_bmp_folders

    root = tmp_path_factory.mktemp("bad")
    b = SimpleNamespace(root=root, tiny=tiny_kaz, out=root / "out", env=nnunet_env(root / "nn"))
    b.member = tiny_kaz.train(MEMBER)
    b.file = root / "a_file"  # write errors: outputs asked for under a regular file
    b.file.write_text("not a folder\n")
    b.empty = root / "empty"
    b.empty.mkdir()
    b.missing = root / "missing"

    # images: the tiny test images with one truncated
    b.images = root / "imagesTs"
    shutil.copytree(tiny_kaz.raw / "imagesTs", b.images)
    b.truncated_image = truncate(sorted(b.images.iterdir())[1], 100)

    # KAZ BMP folders with one truncated slice
    write_kaz2d_bmp_folders(root / "bmp", 2, 0, (40, 60), 3, False)
    b.truncated_bmp = truncate(sorted((root / "bmp" / "images").iterdir())[1], 200)

    # CT volumes: complete, truncated, and a mask on another grid; KiTS23 folders with both problems
    ct, seg = kits3d_case(4, 0, (10, 24, 24), (3.0, 0.78, 0.78))
    b.ct = write_nifti(ct, root / "ct" / "ct.nii.gz")
    b.ct_truncated = truncate(write_nifti(ct, root / "ct" / "ct_truncated.nii.gz"))
    b.mask_other_grid = write_nifti(seg[:, :20], root / "ct" / "mask_other_grid.nii.gz")
    b.kits = root / "kits"
    write_nifti(ct, b.kits / "case_00000" / "imaging.nii.gz")
    b.kits_mismatched = write_nifti(seg[:, :20], b.kits / "case_00000" / "segmentation.nii.gz")
    b.kits_truncated = truncate(write_nifti(ct, b.kits / "case_00001" / "imaging.nii.gz"))
    write_nifti(seg, b.kits / "case_00001" / "segmentation.nii.gz")

    # a raw dataset (own nnU-Net folders) with a truncated training image and a label of another size
    b.plan_env = nnunet_env(root / "nn_plan")
    raw = Path(b.plan_env["nnUNet_raw"]) / "Dataset996_Broken"
    shutil.copytree(tiny_kaz.raw, raw)
    b.plan_truncated = truncate(raw / "imagesTr" / "KAZ_P001_a060_0000.png", 100)
    b.plan_mismatched = raw / "labelsTr" / "KAZ_P002_a000.png"
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(b.plan_mismatched)

    # predictions as nnU-Net / predict write them: seg + (C, 1, H, W) softmax, built from the test labels
    b.gt = tiny_kaz.raw / "labelsTs"
    b.pred = root / "pred"
    b.pred.mkdir()
    for f in sorted(b.gt.iterdir()):
        lab = np.asarray(Image.open(f))
        p1 = np.clip(0.8 * lab + 0.1, 0, 1).astype(np.float32)
        np.savez_compressed(b.pred / f"{f.stem}.npz", probabilities=np.stack([1 - p1, p1])[:, None])
        shutil.copy(f, b.pred / f.name)
    cases = sorted(p.stem for p in b.gt.iterdir())
    b.pred_nan = root / "pred_nan"
    shutil.copytree(b.pred, b.pred_nan)
    probs = np.load(b.pred_nan / f"{cases[1]}.npz")["probabilities"]
    probs[1, 0, 5, 7] = np.nan
    b.nan_npz = b.pred_nan / f"{cases[1]}.npz"
    np.savez_compressed(b.nan_npz, probabilities=probs)
    b.pred_truncated = root / "pred_truncated"
    shutil.copytree(b.pred, b.pred_truncated)
    b.truncated_seg = truncate(b.pred_truncated / f"{cases[0]}.png", 60)
    b.truncated_npz = truncate(b.pred_truncated / f"{cases[2]}.npz", 300)
    b.gt_other_grid = root / "gt_other_grid"
    shutil.copytree(b.gt, b.gt_other_grid)
    b.mismatched_case = cases[2]
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(b.gt_other_grid / f"{cases[2]}.png")
    b.runs_yaml = root / "runs.yaml"
    b.runs_yaml.write_text(f"gt: {b.gt}\nruns:\n  - label: gone\n    pred: {b.missing}\n"
                           f"  - label: cut\n    pred: {b.pred}\n    probs: {b.pred_truncated}\n")
    b.good_yaml = root / "good.yaml"
    b.good_yaml.write_text(f"gt: {b.gt}\nruns:\n  - label: ok\n    pred: {b.pred}\n")

    # a copy of the trained member whose final checkpoint is truncated (stock resume and our predict/explain)
    b.results = root / "results"
    b.bad_member = b.results / KAZ / b.member.name
    shutil.copytree(b.member, b.bad_member)
    b.bad_checkpoint = truncate(b.bad_member / "fold_0" / "checkpoint_final.pth", 5000)

    # an RGB PNG for the one-channel dataset, named as nnU-Net names channel 0
    b.rgb_images = root / "rgb"
    b.rgb_images.mkdir()
    first = sorted((tiny_kaz.raw / "imagesTs").iterdir())[0]
    gray = np.asarray(Image.open(first))
    b.rgb_image = b.rgb_images / first.name
    Image.fromarray(np.stack([gray, 255 - gray, gray // 2], axis=-1).astype(np.uint8), "RGB").save(b.rgb_image)

    # a ground truth holding label 2, which the 0/1 dataset.json next to it does not declare
    b.gt_label2 = root / "raw_label2" / "labelsTs"
    shutil.copytree(b.gt, b.gt_label2)
    shutil.copy(tiny_kaz.raw / "dataset.json", b.gt_label2.parent)
    assert set(json.loads((tiny_kaz.raw / "dataset.json").read_text())["labels"].values()) == {0, 1}
    b.label2_case = cases[1]
    lab = np.asarray(Image.open(b.gt_label2 / f"{cases[1]}.png")).copy()
    lab[:4, :4] = 2
    Image.fromarray(lab).save(b.gt_label2 / f"{cases[1]}.png")

    # a user's SGDR subclass that sets T0 / eta but keeps the inherited sgdr_cycle_ends (which overrides them)
    b.ext_trainers = root / "ext_trainers"
    b.ext_trainers.mkdir()
    (b.ext_trainers / "kaz_user_sgdr.py").write_text(
        "import torch\n\nfrom nnunet_kaz.trainers import nnUNetTrainerSGDR\n\n\n"
        "class nnUNetTrainerSGDR_userT0(nnUNetTrainerSGDR):\n"
        "    sgdr_T0 = 5\n"
        "    sgdr_eta = 1.0\n"
        "    snapshot_window = 2\n\n"
        "    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):\n"
        "        super().__init__(plans, configuration, fold, dataset_json, device)\n"
        "        self.num_epochs = 10  # T0 = 5, eta = 1 tile it: cycles end at 5, 10\n")
    b.sgdr_results = root / "results_sgdr"
    b.sgdr_results.mkdir()
    from nnunet_kaz.paths import trainer_dir
    b.sgdr_env = dict(tiny_kaz.env, nnUNet_results=str(b.sgdr_results),
                      nnUNet_extTrainer=os.pathsep.join([str(b.ext_trainers), str(trainer_dir())]))
    return b


@dataclass
class Row:
    argv: list[str]
    mentions: list[str]  # each must appear in stderr (the offending files / ids)
    env: dict[str, str] | None = None  # default: the session's nnU-Net folders
    stdout_file: str | None = None
    prefix: str = ""  # the one error line's start; default `nnunet-kaz CMD: error:`
    own_traceback: bool = False  # nnU-Net's own message (not our code): a traceback is allowed

    def __post_init__(self):
        self.prefix = self.prefix or f"nnunet-kaz {self.argv[1]}: error:"


def kaz(*args) -> list[str]:
    """`nnunet-kaz ARGS` as strings."""
    return ["nnunet-kaz", *map(str, args)]


ROWS: dict[str, Callable[[SimpleNamespace], Row]] = {
    # data in
    "phantom-write_error": lambda b: Row(kaz("phantom", "--kind", "kaz2d", "-n", 2, "-o", b.file / "Dataset995_X"),
                                         [str(b.file)], b.env),
    "convert_kaz-missing_and_empty_folders": lambda b: Row(
        kaz("convert-kaz", "--images", b.empty, "--masks", b.missing, "--id", 501), [str(b.empty), str(b.missing)],
        b.env),
    "convert_kaz-truncated_image": lambda b: Row(
        kaz("convert-kaz", "--images", b.root / "bmp" / "images", "--masks", b.root / "bmp" / "masks", "--id", 501),
        [str(b.truncated_bmp)], b.env),
    "reslice-truncated_image": lambda b: Row(
        kaz("reslice", "--image", b.ct_truncated, "--axis-point", 9, 9, 13, "--axis-dir", 0, 0, 1, "-o", b.out),
        [str(b.ct_truncated)]),
    "reslice-mismatched_geometry": lambda b: Row(
        kaz("reslice", "--image", b.ct, "--mask", b.mask_other_grid, "--axis-from-mask", "-o", b.out),
        [str(b.mask_other_grid)]),
    "convert_kits23-truncated_image_and_mismatched_geometry": lambda b: Row(
        kaz("convert-kits23", "--kits", b.kits, "--id", 502), [str(b.kits_truncated), str(b.kits_mismatched)], b.env),
    "splits-wrong_dataset_id": lambda b: Row(kaz("splits", "-d", 777), ["777"]),
    "plan-truncated_image_and_mismatched_geometry": lambda b: Row(
        kaz("plan", "-d", 996, "-np", 1), [str(b.plan_truncated), str(b.plan_mismatched)], b.plan_env),
    # training
    "trainer_dir-write_error": lambda b: Row(kaz("trainer-dir"), ["No space left on device"], stdout_file="/dev/full"),
    "train_ensemble-misspelled_trainer": lambda b: Row(
        kaz("train-ensemble", "-d", KAZ_ID, "-c", "2d", "-tr", "XBoundNetTrainr", "--seeds", 0, "--folds", 0,
          "-p", "nnUNetTinyPlans", "-device", "cpu"), ["XBoundNetTrainr"]),
    "train_ensemble-wrong_dataset_id": lambda b: Row(
        kaz("train-ensemble", "-d", 777, "-c", "2d", "--seeds", 0, "--folds", 0, "-device", "cpu"), ["777"]),
    "nnUNetv2_train-misspelled_trainer": lambda b: Row(
        ["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", "XBoundNetTrainr_debug", "-p", "nnUNetTinyPlans",
         "-device", "cpu"], ["XBoundNetTrainr_debug"], prefix="RuntimeError: Could not find requested nnunet trainer",
        own_traceback=True),
    "nnUNetv2_train-corrupted_checkpoint": lambda b: Row(
        ["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", MEMBER, "-p", "nnUNetTinyPlans", "-device", "cpu", "--c"],
        [str(b.bad_checkpoint)], dict(b.tiny.env, nnUNet_results=str(b.results)), prefix="nnUNetv2_train: error:"),
    "nnUNetv2_train-sgdr_T0_eta_under_default_cycle_ends": lambda b: Row(
        ["nnUNetv2_train", str(KAZ_ID), "2d", "0", "-tr", "nnUNetTrainerSGDR_userT0", "-p", "nnUNetTinyPlans",
         "-device", "cpu"], ["sgdr_cycle_ends"], b.sgdr_env, prefix="nnUNetv2_train: error:"),
    # prediction and explanation
    "predict-truncated_image": lambda b: Row(kaz("predict", "-i", b.images, "-o", b.out, "-m", f"{b.member}:0"),
                                             [str(b.truncated_image)]),
    "predict-corrupted_checkpoint": lambda b: Row(
        kaz("predict", "-i", b.tiny.raw / "imagesTs", "-o", b.out, "-m", f"{b.bad_member}:0"), [str(b.bad_checkpoint)]),
    "predict-rgb_image_for_one_channel_dataset": lambda b: Row(
        kaz("predict", "-i", b.rgb_images, "-o", b.out, "-m", f"{b.member}:0"), [b.rgb_image.name]),
    "predict-write_error": lambda b: Row(
        kaz("predict", "-i", b.tiny.raw / "imagesTs", "-o", b.file / "pred", "-m", f"{b.member}:0"), [str(b.file)]),
    "explain-truncated_image": lambda b: Row(kaz("explain", "-i", b.truncated_image, "-m", f"{b.member}:0", "-o", b.out),
                                             [str(b.truncated_image)]),
    "explain-corrupted_checkpoint": lambda b: Row(
        kaz("explain", "-i", sorted((b.tiny.raw / "imagesTs").iterdir())[0], "-m", f"{b.bad_member}:0", "-o", b.out),
        [str(b.bad_checkpoint)]),
    # calibration, evaluation, comparison
    "calibrate-nan_probabilities": lambda b: Row(kaz("calibrate", "-p", b.pred_nan, "-l", b.gt, "-o", b.out / "c.json"),
                                                 [str(b.nan_npz)]),
    "calibrate-mismatched_geometry": lambda b: Row(
        kaz("calibrate", "-p", b.pred, "-l", b.gt_other_grid, "-o", b.out / "c.json"), [b.mismatched_case]),
    "calibrate-write_error": lambda b: Row(
        kaz("calibrate", "-p", b.pred, "-l", b.gt, "-o", b.file / "c.json", "--npz"), [str(b.file)]),
    "evaluate-nan_probabilities": lambda b: Row(
        kaz("evaluate", "--pred", b.pred_nan, "--probs", b.pred_nan, "--gt", b.gt, "-o", b.out), [str(b.nan_npz)]),
    "evaluate-truncated_segmentation": lambda b: Row(
        kaz("evaluate", "--pred", b.pred_truncated, "--gt", b.gt, "-o", b.out), [str(b.truncated_seg)]),
    "evaluate-mismatched_geometry": lambda b: Row(
        kaz("evaluate", "--pred", b.pred, "--gt", b.gt_other_grid, "-o", b.out), [b.mismatched_case]),
    "evaluate-undeclared_label_in_ground_truth": lambda b: Row(
        kaz("evaluate", "--pred", b.pred, "--gt", b.gt_label2, "-o", b.out), [b.label2_case, "2"]),
    "evaluate-write_error": lambda b: Row(kaz("evaluate", "--pred", b.pred, "--gt", b.gt, "-o", b.file / "ev"),
                                          [str(b.file)]),
    "compare-missing_folder_and_truncated_probabilities": lambda b: Row(
        kaz("compare", b.runs_yaml, "-o", b.out), [str(b.missing), str(b.truncated_npz)]),
    "compare-write_error": lambda b: Row(kaz("compare", b.good_yaml, "-o", b.file / "cmp"), [str(b.file)]),
}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file, and every folder, under the roots: any new, removed or rewritten entry shows
    (a folder's own mtime is left out: a temporary made and removed again changes it, and leaves nothing)."""
    found = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            found.update({os.path.join(dirpath, d): (0, 0) for d in dirs})
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                found[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.mark.parametrize("row_id", list(ROWS))
def test_bad_input_ends_with_one_clear_message_and_writes_nothing(bad, row_id):
    row = ROWS[row_id](bad)
    env = dict(row.env or bad.tiny.env)
    before = snapshot(bad.root, bad.tiny.root)
    exe = BIN / row.argv[0]
    if row.stdout_file:
        with open(row.stdout_file, "w") as out:
            proc = subprocess.run([str(exe), *row.argv[1:]], env=env, stdout=out, stderr=subprocess.PIPE, text=True)
    else:
        proc = run(row.argv, env, check=False)
    after = snapshot(bad.root, bad.tiny.root)
    err = proc.stderr
    assert proc.returncode != 0, f"{row_id}: exit code 0\n{err[-3000:]}"
    if not row.own_traceback:
        assert "Traceback" not in err, f"{row_id}: traceback\n{err[-3000:]}"
        assert err.count(row.prefix) == 1 and err.count(": error:") == 1, f"{row_id}: not one message\n{err[-3000:]}"
    else:
        assert row.prefix in err, err[-3000:]
    for m in row.mentions:
        assert m in err, f"{row_id}: message does not name {m}\n{err[-3000:]}"
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    removed = sorted(set(before) - set(after))
    assert not new and not changed and not removed, f"{row_id}: new {new}, changed {changed}, removed {removed}"


# --- an interrupted predict resumes to identical outputs -------------------------------------------------------
def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _assert_complete(path: Path) -> None:
    """A finished file: npz arrays load, images decode, json and csv parse."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            assert all(z[k].size for k in z.files), path
    elif path.suffix in (".png", ".bmp"):
        with Image.open(path) as im:
            im.load()
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".csv":
        pd.read_csv(path)


def _assert_same_outputs(a: Path, b: Path) -> None:
    assert _files(a) == _files(b)
    for name in sorted(_files(a)):
        fa, fb = a / name, b / name
        if name.endswith(".npz"):
            with np.load(fa) as za, np.load(fb) as zb:
                assert sorted(za.files) == sorted(zb.files), name
                for k in za.files:
                    np.testing.assert_array_equal(za[k], zb[k], err_msg=f"{name}[{k}]")
        elif name.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(fa)), np.asarray(Image.open(fb)), err_msg=name)
        elif name.endswith(".csv"):
            pd.testing.assert_frame_equal(pd.read_csv(fa), pd.read_csv(fb), check_exact=True)
        else:
            assert json.loads(fa.read_text()) == json.loads(fb.read_text()), name


# Stops the whole process group of a run right after the rename that finishes a file named in
# KAZ_TEST_STOP_AFTER (os.pathsep-separated names): every output goes through atomic_path's os.replace, so this is
# the moment a case is finished. Loaded through PYTHONPATH as `sitecustomize` (the venv has none), so it reaches
# the CLI and any worker process it starts, without a change to the package.
STOP_AFTER_HOOK = """
import os, signal
_names = set(filter(None, os.environ.get("KAZ_TEST_STOP_AFTER", "").split(os.pathsep)))
if _names:
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        if os.path.basename(os.fspath(dst)) in _names:
            os.killpg(os.getpgid(0), signal.SIGSTOP)

    os.replace = replace
"""


def _stopped(pid: int) -> bool:
    """The process is stopped (state T in /proc/PID/stat; the state follows the command name's last ')')."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def test_killed_predict_resumes_to_the_outputs_of_an_uninterrupted_run(bad, tmp_path):
    """predict is frozen (SIGSTOP, by the hook above) the moment its first case is finished and then SIGKILLed,
    so the kill lands at the same point on any machine: one finished case, the others not started or half done."""
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((bad.tiny.raw / "imagesTs").iterdir()) + sorted((bad.tiny.raw / "imagesTr").iterdir())[:3]:
        shutil.copy(f, images / f.name)
    cases = sorted(f.name[: -len("_0000.png")] for f in images.iterdir())
    env = bad.tiny.env

    def argv(out: Path) -> list[str]:
        return kaz("predict", "-i", images, "-o", out, "-m", f"{bad.member}:0", "--mc", 4, "--mc-batch", 2,
                   "-device", "cpu")

    whole = tmp_path / "whole"
    run(argv(whole), env)

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_AFTER_HOOK)
    stop_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
                    KAZ_TEST_STOP_AFTER=os.pathsep.join(f"{c}.png" for c in cases))
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([str(BIN / "nnunet-kaz"), *argv(resumed)[1:]], env=stop_env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not _stopped(proc.pid) and proc.poll() is None:  # waits for the hook, not for a moment in time
            time.sleep(0.05)
        assert proc.poll() is None, f"predict exited ({proc.returncode}) without finishing a case under the hook"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = [c for c in cases if (resumed / f"{c}.png").exists()]
    assert len(finished) == 1, f"the kill should leave exactly one finished case, found {finished}"
    unfinished = [c for c in cases if c not in finished]
    for p in resumed.iterdir():  # what a kill leaves: finished files, and at most temporaries
        if not TEMPORARY_NAME.match(p.name):
            _assert_complete(p)
    # what a kill during a write of an unfinished case leaves: a stale temporary (atomic_path cannot remove it on
    # SIGKILL) and a complete file of a case without segmentation
    (resumed / f".{unfinished[-1]}.npz.abcd1234.part.npz").write_bytes(b"PK\x03\x04 half")
    np.savez_compressed(resumed / f"{unfinished[-1]}_uncertainty.npz", entropy=np.zeros((1, 32, 32), np.float32))

    run(argv(resumed), env)  # the same command, without the hook
    assert not [p for p in _files(resumed) if TEMPORARY_NAME.match(p)]
    _assert_same_outputs(whole, resumed)
    assert len(pd.read_csv(resumed / "scores.csv")) == len(cases)


# --- the checks behind the truncated-image rows, in process -----------------------------------------------------
def test_input_checks_refuse_truncated_nifti_that_simpleitk_reads_as_zeros(tmp_path):
    from nnunet_kaz.errors import KazError
    from nnunet_kaz.input_checks import check_case_files, image_size

    vol = np.arange(10 * 24 * 24, dtype=np.int16).reshape(10, 24, 24)
    for name in ("ct.nii.gz", "ct.nii"):
        whole = write_nifti(vol, tmp_path / name)
        assert image_size(whole) == (24, 24, 10)
        cut = truncate(write_nifti(vol, tmp_path / f"cut_{name}"))
        assert (sitk.GetArrayFromImage(sitk.ReadImage(str(cut))) == 0).mean() > 0.4  # why the check exists
        with pytest.raises(KazError, match="truncated"):
            image_size(cut)
    vector = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.nii.gz"))
    assert image_size(tmp_path / "vector.nii.gz") == (6, 5, 4)
    with pytest.raises(KazError, match="differ in size"):
        check_case_files([tmp_path / "ct.nii.gz", tmp_path / "vector.nii.gz"])


def test_stale_temporaries_are_removed_only_for_the_given_targets(tmp_path):
    from nnunet_kaz.io_utils import atomic_path, remove_stale_temporaries

    with atomic_path(tmp_path / "kept.npz") as tmp:
        tmp.write_bytes(b"x")
    stale = [tmp_path / ".a.npz.abcd1234.part.npz", tmp_path / ".b.png.zz_9yy00.part.png"]
    for p in stale:
        p.write_bytes(b"half")
    (tmp_path / ".c.json.q1w2e3r4.part").mkdir()  # an atomic_dir temporary
    (tmp_path / ".hidden.part.txt").write_text("not ours")
    assert remove_stale_temporaries(tmp_path, {"a.npz"}) == [stale[0]]
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == [".b.png.zz_9yy00.part.png",
                                                                          ".c.json.q1w2e3r4.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.part.txt", "kept.npz"]


def test_evaluation_finds_a_nan_between_the_sampled_voxels_of_a_large_map(tmp_path):
    from nnunet_kaz.errors import KazError
    from nnunet_kaz.evaluation.cases import load_probabilities

    p1 = np.full((1, 500, 500), 0.3, np.float32)  # 250000 voxels: the range check samples every 2nd one
    p1[0, 0, 1] = np.nan
    np.savez_compressed(tmp_path / "case.npz", probabilities=np.stack([1 - p1, p1]))
    with pytest.raises(KazError, match="NaN"):
        load_probabilities(tmp_path / "case.npz", (500, 500))
