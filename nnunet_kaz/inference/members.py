"""Ensemble members: a results folder (trainer__plans__configuration) with a choice of folds and checkpoints.

Spec syntax (command line `-m`): `RESULTS_DIR[:FOLDS[:CHECKPOINTS]]`
- FOLDS: `0,1,2`, or `*` / empty for every `fold_X` folder that holds the checkpoints (default).
- CHECKPOINTS: comma list of `final` (checkpoint_final.pth, default), `best` (checkpoint_best.pth), `latest`,
  `snapshots` (every snapshot listed in the fold's snapshots.json, see XBoundNetTrainerSGDR) or a file name.
Example: `$nnUNet_results/Dataset501_KazPhantom/XBoundNetTrainerSGDR__nnUNetPlans__2d:0:snapshots`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nnunet_kaz.errors import KazError

CHECKPOINT_ALIASES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth",
                      "latest": "checkpoint_latest.pth"}


@dataclass
class Member:
    """One results folder with the checkpoint files to use from it (one model each)."""

    folder: Path
    checkpoints: list[Path]
    plans: dict = field(repr=False)
    dataset_json: dict = field(repr=False)
    configuration: str = ""
    trainer_name: str = ""

    @property
    def name(self) -> str:
        return self.folder.name


def parse_member(spec: str) -> Member:
    """Parse `RESULTS_DIR[:FOLDS[:CHECKPOINTS]]` and find its checkpoint files (clear errors otherwise)."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise KazError(f"member {spec!r}: expected RESULTS_DIR[:FOLDS[:CHECKPOINTS]]")
    folder = Path(parts[0]).expanduser()
    folds_text = parts[1] if len(parts) > 1 else ""
    chk_text = parts[2] if len(parts) > 2 else "final"
    for needed in ("plans.json", "dataset.json"):
        if not (folder / needed).is_file():
            raise KazError(f"member {spec!r}: {folder / needed} is missing; a member is an nnU-Net results folder "
                           f"such as $nnUNet_results/Dataset501_X/XBoundNetTrainer__nnUNetPlans__2d")
    try:
        configuration = folder.name.split("__")[2]
    except IndexError:
        raise KazError(f"member {spec!r}: folder name {folder.name!r} is not TRAINER__PLANS__CONFIGURATION") from None
    if folds_text in ("", "*"):
        fold_dirs = sorted(p for p in folder.glob("fold_*") if p.is_dir())
    else:
        fold_dirs = [folder / f"fold_{f.strip()}" for f in folds_text.split(",")]
    missing_folds = [str(d) for d in fold_dirs if not d.is_dir()]
    if missing_folds or not fold_dirs:
        raise KazError(f"member {spec!r}: fold folder(s) not found: {missing_folds or 'no fold_X folders'}")
    checkpoints: list[Path] = []
    missing: list[str] = []
    for fold_dir in fold_dirs:
        for token in chk_text.split(","):
            token = token.strip()
            if token == "snapshots":
                found = _snapshots(fold_dir)
                if not found:
                    missing.append(f"{fold_dir / 'snapshots.json'} (or it lists no snapshots)")
                checkpoints.extend(found)
                continue
            path = fold_dir / CHECKPOINT_ALIASES.get(token, token)
            (checkpoints if path.is_file() else missing).append(path if path.is_file() else str(path))
    if missing:
        raise KazError(f"member {spec!r}: missing checkpoint(s): {', '.join(map(str, missing))}")
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return Member(folder, checkpoints, plans, dataset_json, configuration)


def _snapshots(fold_dir: Path) -> list[Path]:
    manifest = fold_dir / "snapshots.json"
    if not manifest.is_file():
        return []
    entries = json.loads(manifest.read_text()).get("snapshots", [])
    return [fold_dir / e["file"] for e in sorted(entries, key=lambda e: (e["cycle"], e["epoch"]))]


def load_checkpoint(path: Path) -> dict:
    """torch.load on the CPU with a message naming the file when it is unreadable or not an nnU-Net checkpoint."""
    import torch  # here, so `nnunet-kaz --help` does not load torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupted files raise several different errors
        raise KazError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "trainer_name" not in ckpt:
        raise KazError(f"{path} is not an nnU-Net checkpoint (no network_weights / trainer_name)")
    return ckpt


PREPROCESSING_KEYS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                      "resampling_fn_data_kwargs", "resampling_fn_probabilities",
                      "resampling_fn_probabilities_kwargs")


def check_compatible(members: list[Member]) -> None:
    """Members must share the label set and the preprocessing, so a case is read and preprocessed once."""
    ref = members[0]
    ref_cfg = ref.plans["configurations"][ref.configuration]
    problems = []
    for m in members[1:]:
        if m.dataset_json.get("labels") != ref.dataset_json.get("labels"):
            problems.append(f"{m.folder}: labels {m.dataset_json.get('labels')} differ from "
                            f"{ref.dataset_json.get('labels')} ({ref.folder})")
        if m.dataset_json.get("file_ending") != ref.dataset_json.get("file_ending"):
            problems.append(f"{m.folder}: file ending differs from {ref.folder}")
        cfg = m.plans["configurations"][m.configuration]
        diff = [k for k in PREPROCESSING_KEYS if cfg.get(k) != ref_cfg.get(k)]
        if m.plans.get("transpose_forward") != ref.plans.get("transpose_forward"):
            diff.append("transpose_forward")
        if m.plans.get("foreground_intensity_properties_per_channel") != \
                ref.plans.get("foreground_intensity_properties_per_channel"):
            diff.append("foreground_intensity_properties_per_channel")
        if diff:
            problems.append(f"{m.folder}: preprocessing differs from {ref.folder} in {diff}")
    if problems:
        raise KazError("members cannot be combined:\n  " + "\n  ".join(problems))


def find_trainer_class(name: str) -> type:
    """Our trainers directly; anything else through nnU-Net's lookup (its folder, then nnUNet_extTrainer)."""
    from nnunet_kaz import trainers

    if hasattr(trainers, name):
        return getattr(trainers, name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise KazError(f"trainer {name!r} (named in the checkpoint) is neither nnU-Net's nor ours; add its "
                       f"folder to nnUNet_extTrainer") from None


@dataclass
class LoadedModel:
    """One member checkpoint: its weights (on the CPU, as nnU-Net keeps its folds' parameters) and the network
    of its architecture (shared between the checkpoints of one architecture, on the target device)."""

    member: Member
    checkpoint: Path
    key: tuple
    weights: dict = field(repr=False)
    network: Any = field(repr=False)

    @property
    def patch_size(self) -> list[int]:
        return self.network.patch_size

    def ready(self):
        """The network with this checkpoint's weights, in eval mode, ready to run."""
        self.network.load_state_dict(self.weights)
        self.network.eval()
        return self.network


def load_models(members: Sequence[Member], device: Any = "cpu", mc: int = 0) -> list[LoadedModel]:
    """Members (folder, folds, checkpoints) -> one LoadedModel per checkpoint, with the same checks for every
    command: members combinable (`check_compatible`), each checkpoint readable and an nnU-Net checkpoint, its
    trainer found, its weights fitting the network the trainer builds (`build_network_architecture` from the
    member's plans, deep supervision off, exactly as nnU-Net's predictor), and dropout present when `mc` > 0."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not members:
        raise KazError("no ensemble members given")
    check_compatible(list(members))
    from nnunet_kaz.inference.sliding_window import dropout_modules

    networks: dict[tuple, torch.nn.Module] = {}
    models = []
    for member in members:
        pm = PlansManager(member.plans)
        for path in member.checkpoints:
            ckpt = load_checkpoint(path)
            trainer_name = ckpt["trainer_name"]
            member.trainer_name = trainer_name
            configuration = ckpt.get("init_args", {}).get("configuration", member.configuration)
            key = (str(member.folder), trainer_name, configuration)
            if key not in networks:
                cm = pm.get_configuration(configuration)
                trainer = find_trainer_class(trainer_name)
                n_in = determine_num_input_channels(pm, cm, member.dataset_json)
                n_out = pm.get_label_manager(member.dataset_json).num_segmentation_heads
                net = trainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
                net.patch_size = list(cm.patch_size)
                net.mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
                networks[key] = net.to(torch.device(device))
            try:
                networks[key].load_state_dict(ckpt["network_weights"])
            except RuntimeError as e:
                raise KazError(f"checkpoint {path} does not fit the network of {member.folder.name}: "
                               f"{str(e).splitlines()[0]}") from None
            if mc > 0 and not dropout_modules(networks[key]):
                raise KazError(f"MC dropout (mc = {mc} samples) needs dropout, but {trainer_name} in {member.folder} "
                               f"has no dropout modules (train an nnUNetTrainerDropout_* or XBoundNet trainer)",
                               option="mc")
            models.append(LoadedModel(member, path, key, ckpt["network_weights"], networks[key]))
    return models
