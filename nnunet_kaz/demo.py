"""`nnunet-kaz demo` / `make demo`: the main job end to end on a generated KAZ-like phantom.

Every step runs the real command a user would type (printed before it runs), inside `OUT/`:
`OUT/nnUNet_raw`, `OUT/nnUNet_preprocessed`, `OUT/nnUNet_results` are the nnU-Net folders. A step whose
outputs exist is skipped, so a second run reuses finished work (`--fresh` starts over).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID:03d}_KazPhantom"
CONFIG = "2d"
TRAINER = "XBoundNetTrainer_demo"
PLANS = "nnUNetPlans"


def _bin(name: str) -> str:
    """nnU-Net's and our console scripts sit next to the running interpreter (the .venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Demo:
    def __init__(self, out: Path, n_patients: int, n_test_patients: int, image_size: int, seed: int):
        self.out = out.resolve()
        self.n_patients, self.n_test, self.size, self.seed = n_patients, n_test_patients, image_size, seed
        self.raw = self.out / "nnUNet_raw"
        self.pre = self.out / "nnUNet_preprocessed"
        self.res = self.out / "nnUNet_results"
        self.t0 = time.time()

    # --- plumbing -------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        from nnunet_kaz.paths import trainer_dir

        env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                   nnUNet_results=str(self.res), nnUNet_extTrainer=str(trainer_dir()), nnUNet_compile="f",
                   nnUNet_def_n_proc="1")
        env.setdefault("nnUNet_n_proc_DA", "1")
        return env

    def step(self, title: str, done: Path | None = None) -> bool:
        """Announce a step; return False (and say so) when `done` already exists."""
        elapsed = time.time() - self.t0
        if done is not None and done.exists():
            print(f"\n[{elapsed:6.0f}s] {title}: already done ({done.relative_to(self.out)}), reusing", flush=True)
            return False
        print(f"\n[{elapsed:6.0f}s] {title}", flush=True)
        return True

    def run(self, cmd: list[str], **env_overrides: str) -> None:
        print("  $ " + " ".join(cmd), flush=True)
        proc = subprocess.run([_bin(cmd[0]), *cmd[1:]], env=dict(self.env, **env_overrides))
        if proc.returncode != 0:
            raise SystemExit(f"demo: step failed (exit {proc.returncode}): {' '.join(cmd)}")

    # --- steps ----------------------------------------------------------------------------------------
    def make_data(self) -> None:
        from nnunet_kaz.datasets import make_kaz2d_dataset

        target = self.raw / DATASET
        if self.step("1. Generate a KAZ-like phantom (radial CT slices, rough annotations)", target / "dataset.json"):
            make_kaz2d_dataset(target, n_patients=self.n_patients, seed=self.seed,
                               image_size=(self.size, self.size), n_test_patients=self.n_test)
            print(f"  wrote {target}")

    def plan(self) -> None:
        if self.step("2. Plan and preprocess (stock nnU-Net)", self.pre / DATASET / f"{PLANS}.json"):
            # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it must be >= 1 here
            self.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIG, "-np", "2",
                      "--verify_dataset_integrity"], nnUNet_n_proc_DA="1")

    def train(self, fold: int = 0, trainer: str = TRAINER) -> Path:
        folder = self.res / DATASET / f"{trainer}__{PLANS}__{CONFIG}" / f"fold_{fold}"
        if self.step(f"3. Train XBoundNet++ on the CPU ({trainer}, fold {fold})", folder / "checkpoint_final.pth"):
            self.run(["nnUNetv2_train", str(DATASET_ID), CONFIG, str(fold), "-tr", trainer, "-device", "cpu"],
                     nnUNet_n_proc_DA="0")
        return folder

    def predict(self, fold: int = 0, trainer: str = TRAINER) -> Path:
        out = self.out / "predictions" / trainer
        if self.step("4. Predict the held-out patients (stock nnUNetv2_predict)", out / "plans.json"):
            self.run(["nnUNetv2_predict", "-i", str(self.raw / DATASET / "imagesTs"), "-o", str(out),
                      "-d", str(DATASET_ID), "-c", CONFIG, "-f", str(fold), "-tr", trainer, "-p", PLANS,
                      "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"])
        return out

    def report_dice(self, predictions: Path) -> float:
        import numpy as np

        from nnunet_kaz.evaluation import overlap_metrics
        from nnunet_kaz.evaluation.cases import read_segmentation

        self.step("5. Dice per held-out case against the annotation")
        labels = self.raw / DATASET / "labelsTs"
        scores = []
        for gt_file in sorted(labels.glob("*.png")):
            pred_file = predictions / gt_file.name
            if not pred_file.exists():
                raise SystemExit(f"demo: no prediction for {gt_file.name}")
            d = overlap_metrics(read_segmentation(pred_file)[0] == 1, read_segmentation(gt_file)[0] == 1)["dice"]
            scores.append(d)
            print(f"  {gt_file.stem:<20} Dice {d:.3f}")
        mean = float(np.mean(scores))
        print(f"  mean Dice over {len(scores)} held-out slices: {mean:.3f}")
        return mean

    def run_all(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.make_data()
        self.plan()
        self.train()
        predictions = self.predict()
        self.report_dice(predictions)
        print(f"\nDemo finished in {time.time() - self.t0:.0f}s; everything is under {self.out}")


def _demo(args: argparse.Namespace) -> int:
    if args.fresh and args.o.exists():
        shutil.rmtree(args.o)
    Demo(args.o, args.patients, args.test_patients, args.size, args.seed).run_all()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole job on a generated phantom (what `make demo` runs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    p.add_argument("--patients", type=int, default=10, help="phantom patients, 12 radial slices each (default 10)")
    p.add_argument("--test-patients", type=int, default=2, help="of which held out for testing (default 2)")
    p.add_argument("--size", type=int, default=64, help="slice size in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing finished steps")
    p.set_defaults(func=_demo)
