"""UncertaintyPredictor: folds x seeds x snapshots x MC-dropout samples in one streaming pass per case.

Per case: the image is read and preprocessed once (nnU-Net's preprocessor of the members' shared plans);
every model (member checkpoint) predicts `max(1, mc)` samples, in batches of `mc_batch`, with nnU-Net's
sliding window; each sample's probabilities (softmax, or sigmoid for regions: never logits) are added to
`StreamingStats` and dropped. Outputs go to the input's geometry; each file is written under a temporary
name and renamed, the segmentation last, so a case is finished exactly when its segmentation exists.
Every input file is checked (`nnunet_kaz.input_checks`) before anything is written; a rerun skips finished
cases and removes the temporaries a killed run left behind.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnunet_kaz.errors import KazError
from nnunet_kaz.inference.export import GeometryRestorer, save_npz, write_map, write_segmentation
from nnunet_kaz.inference.members import Member, check_compatible, load_checkpoint
from nnunet_kaz.inference.sliding_window import dropout_modules, predict_samples, set_mc_dropout
from nnunet_kaz.input_checks import check_case_files
from nnunet_kaz.io_utils import atomic_path, remove_stale_temporaries, write_json_atomic
from nnunet_kaz.trainers.seeding import derive_seed
from nnunet_kaz.uncertainty.measures import (
    binary_entropy,
    coefficient_of_variation,
    labelled_uncertainty,
    normalized_entropy,
    pooled_pairwise_dice,
    relunet_score,
)
from nnunet_kaz.uncertainty.streaming import AccumulatedStats, StreamingStats

SCORE_COLUMNS = ["case", "label", "mean_entropy", "relunet_score", "cv", "pairwise_dice", "labelled_uncertainty",
                 "n_members", "n_samples"]


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
class _Model:
    member: Member
    checkpoint: Path
    key: tuple  # networks are shared between checkpoints of one architecture
    weights: dict  # on the CPU, as nnU-Net keeps its folds' parameters


class UncertaintyPredictor:
    """Combine ensemble members (folds, seeds, snapshots) and MC-dropout samples by averaging probabilities.

    `mc=0` runs each model once with dropout off; `mc=N` samples each model N times with only the dropout
    modules in train mode (normalisation stays in eval mode). Samples are seeded per case (`seed`), so a run
    is reproducible and an interrupted run resumes to the same outputs.
    """

    def __init__(self, members: Sequence[Member], mc: int = 0, mirror: bool = False, tile_step_size: float = 0.5,
                 device: str | torch.device = "cpu", mc_batch: int = 8, seed: int = 0, verbose: bool = True,
                 calibration=None, postprocessing=None):
        if not members:
            raise KazError("no ensemble members given")
        if mc < 0 or mc_batch < 1:
            raise KazError(f"--mc must be >= 0 and the MC batch >= 1 (got {mc}, {mc_batch})")
        check_compatible(list(members))
        self.members, self.mc, self.mirror, self.step = list(members), mc, mirror, tile_step_size
        self.device = torch.device(device)
        self.mc_batch, self.seed, self.verbose = mc_batch, seed, verbose
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        ref = self.members[0]
        self.plans_manager = PlansManager(ref.plans)
        self.configuration_manager = self.plans_manager.get_configuration(ref.configuration)
        self.dataset_json = ref.dataset_json
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.regions = self.label_manager.has_regions
        self.calibration, self.postprocessing = calibration, postprocessing
        if calibration is not None and self.regions:
            raise KazError("calibration applies to softmax outputs; these members were trained on regions")
        self._networks: dict[tuple, torch.nn.Module] = {}
        self.models = self._load_models()

    # --- models ---------------------------------------------------------------------------------------
    def _load_models(self) -> list[_Model]:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        models = []
        for member in self.members:
            pm = PlansManager(member.plans)
            for path in member.checkpoints:
                ckpt = load_checkpoint(path)
                trainer_name = ckpt["trainer_name"]
                member.trainer_name = trainer_name
                configuration = ckpt["init_args"]["configuration"]
                key = (str(member.folder), trainer_name, configuration)
                if key not in self._networks:
                    cm = pm.get_configuration(configuration)
                    trainer = find_trainer_class(trainer_name)
                    n_in = determine_num_input_channels(pm, cm, member.dataset_json)
                    n_out = pm.get_label_manager(member.dataset_json).num_segmentation_heads
                    net = trainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
                    net.patch_size = list(cm.patch_size)
                    net.mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
                    self._networks[key] = net.to(self.device)
                try:
                    self._networks[key].load_state_dict(ckpt["network_weights"])
                except RuntimeError as e:
                    raise KazError(f"checkpoint {path} does not fit the network of {member.folder.name}: "
                                   f"{str(e).splitlines()[0]}") from None
                if self.mc > 0 and not dropout_modules(self._networks[key]):
                    raise KazError(f"--mc {self.mc} needs dropout, but {trainer_name} in {member.folder} has no "
                                   f"dropout modules (train an nnUNetTrainerDropout_* or XBoundNet trainer)")
                models.append(_Model(member, path, key, ckpt["network_weights"]))
        return models

    # --- one case -------------------------------------------------------------------------------------
    def preprocess(self, image_files: list[str]) -> tuple[torch.Tensor, dict]:
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        try:
            data, _, props = preprocessor.run_case(image_files, None, self.plans_manager,
                                                   self.configuration_manager, self.dataset_json)
        except Exception as e:
            raise KazError(f"cannot read or preprocess {image_files}: {type(e).__name__}: {e}") from None
        return torch.from_numpy(np.asarray(data, dtype=np.float32)), props

    def sample_case(self, data: torch.Tensor, case: str, progress: bool = False) -> AccumulatedStats:
        """Stream every model's samples of one preprocessed case into the accumulators."""
        n_heads = self.label_manager.num_segmentation_heads
        stats = StreamingStats(n_heads, tuple(data.shape[1:]), self.regions, self.device)
        n_per_model = max(1, self.mc)
        chunks = [min(self.mc_batch, n_per_model - i) for i in range(0, n_per_model, self.mc_batch)]
        bar = tqdm(total=len(self.models) * n_per_model, desc=f"  {case} samples", leave=False,
                   disable=not progress)
        case_seed = zlib.crc32(case.encode())
        for m_index, model in enumerate(self.models):
            net = self._networks[model.key]
            net.load_state_dict(model.weights)
            set_mc_dropout(net, self.mc > 0)
            torch.manual_seed(derive_seed(self.seed, case_seed, m_index))
            mirror_axes = net.mirror_axes if self.mirror else None
            for b in chunks:
                logits = predict_samples(net, data, net.patch_size, n_heads, b, self.step, mirror_axes, self.device)
                stats.add(self.probabilities(logits))
                bar.update(b)
        bar.close()
        return stats.result()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) logits of B samples -> each sample's probabilities with nnU-Net's own nonlinearity
        (softmax over the classes, or sigmoid for regions), one sample at a time."""
        return torch.stack([self.label_manager.apply_inference_nonlin(sample) for sample in logits])

    def finalize(self, stats: AccumulatedStats, props: dict) -> dict:
        """Maps in the input geometry and per-class scores."""
        geo = GeometryRestorer(self.plans_manager, self.configuration_manager, props)
        probs = geo.probabilities(stats.mean, self.regions)
        if self.calibration is not None:  # before thresholding, maps and scores (paper 000 section 2.3)
            from nnunet_kaz.postprocessing import apply_calibration

            probs = apply_calibration(probs, self.calibration)
        entropy = normalized_entropy(probs, self.regions).astype(np.float32)
        sample_entropy = geo.maps(stats.mean_entropy[None])[0]
        mi = np.clip(entropy - sample_entropy, 0.0, None)
        variance = geo.maps(stats.variance)
        u_sample = geo.maps(-stats.mean_plogp)  # paper 004's U(x) per class, nats
        ratio = geo.voxel_volume_ratio
        labels = self._foreground()
        rows = []
        for channel, label in labels:
            p = probs[channel]
            h_bits = binary_entropy(p)
            rows.append({"label": label, "mean_entropy": float(h_bits.mean()),
                         "relunet_score": relunet_score(p, h_bits),
                         "cv": coefficient_of_variation(stats.volumes[:, channel] * ratio),
                         "pairwise_dice": pooled_pairwise_dice(stats.counts[channel], stats.volumes[:, channel]),
                         "labelled_uncertainty": labelled_uncertainty(p, u_sample[channel]),
                         "n_members": len(self.models), "n_samples": stats.n_samples})
        return {"probabilities": probs, "entropy": entropy, "mutual_information": mi.astype(np.float32),
                "variance": variance, "scores": rows}

    def _foreground(self) -> list[tuple[int, str]]:
        """(channel, label name) of every foreground class or region."""
        if self.regions:
            names = [k for k in self.dataset_json["labels"] if k != "background"]
            return list(enumerate(names))
        inv = {v: k for k, v in self.dataset_json["labels"].items() if isinstance(v, int)}
        return [(c, inv.get(lab, str(lab))) for c, lab in enumerate(self.label_manager.all_labels) if lab != 0]

    # --- files ----------------------------------------------------------------------------------------
    def predict_folder(self, input_dir: Path, output_dir: Path, overwrite: bool = False, num_parts: int = 1,
                       part_id: int = 0) -> pd.DataFrame:
        """Predict every case of `input_dir` (nnU-Net naming CASE_XXXX.ext) into `output_dir`."""
        cases = list_cases(input_dir, self.dataset_json)
        if not 0 <= part_id < num_parts:
            raise KazError(f"--part-id must lie in 0..{num_parts - 1}, got {part_id}")
        mine = sorted(cases)[part_id::num_parts]
        ending = self.dataset_json["file_ending"]
        todo = [c for c in mine if overwrite or not (output_dir / f"{c}{ending}").exists()]
        # every input is checked before anything is written (a truncated image fails here, not mid-run)
        for case in tqdm(todo, desc="checking inputs", disable=not self.verbose or len(todo) < 20):
            check_case_files(cases[case])
        output_dir.mkdir(parents=True, exist_ok=True)
        # temporaries of a killed run (SIGKILL skips atomic_path's clean-up): all of them when this process is
        # the folder's only writer, else those of the cases it redoes
        stale = None if num_parts == 1 else {n for c in todo for n in self._case_files(c)}
        for folder in (output_dir, output_dir / "kaz_export"):
            remove_stale_temporaries(folder, stale)
        self._write_run_info(output_dir)
        if len(todo) < len(mine):
            print(f"{len(mine) - len(todo)} case(s) already predicted in {output_dir}, skipped (--overwrite redoes)")
        for case in tqdm(todo, desc="cases", disable=not self.verbose):
            self.predict_case(cases[case], output_dir / case, progress=self.verbose)
        return collect_scores(output_dir)

    def predict_case(self, image_files: list[str], out_stem: Path, progress: bool = False) -> dict:
        data, props = self.preprocess(image_files)
        result = self.finalize(self.sample_case(data, out_stem.name, progress), props)
        result["segmentation"], result["export"] = self.segment(result["probabilities"], image_files, props)
        self.write_case(result, props, out_stem)
        return result

    def segment(self, probs: np.ndarray, image_files: list[str], props: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """The segmentation in the input geometry: nnU-Net's argmax (or region order), or the post-processing
        chain without its resize step. With a resize step the whole chain also gives the export mask
        (e.g. a KAZ slice at its original 510 x 788), returned second."""
        dtype = np.uint8 if len(self.label_manager.foreground_labels) < 255 else np.uint16
        chain = self.postprocessing
        if chain is None:
            return np.asarray(self.label_manager.convert_probabilities_to_segmentation(probs), dtype=dtype), None
        from nnunet_kaz.postprocessing import PostprocessingChain, Resize

        image = None
        if any(getattr(st, "cyst_rule", None) == "intensity" for st in chain.steps):
            image, _ = self.plans_manager.image_reader_writer_class().read_images(image_files)
        spacing = [float(v) for v in props["spacing"]]
        in_geometry = PostprocessingChain([st for st in chain.steps if not isinstance(st, Resize)])
        seg = in_geometry.apply(probs, image, spacing).segmentation.astype(dtype)
        export = chain.apply(probs, image, spacing).segmentation if len(in_geometry.steps) < len(chain.steps) \
            else None
        return seg, export

    def _case_files(self, case: str) -> list[str]:
        """Names of the files `write_case` writes for a case (in the output folder and in kaz_export/)."""
        ending = self.dataset_json["file_ending"]
        return [f"{case}.npz", f"{case}_uncertainty.npz", f"{case}_entropy{ending}", f"{case}_mi{ending}",
                f"{case}_scores.json", f"{case}{ending}", f"{case}.bmp",
                *(f"{case}_prob_{label}{ending}" for _, label in self._foreground())]

    def write_case(self, result: dict, props: dict, out_stem: Path) -> None:
        ending = self.dataset_json["file_ending"]
        case = out_stem.name
        probs = result["probabilities"]
        save_npz(out_stem.with_name(f"{case}.npz"), probabilities=probs)
        save_npz(out_stem.with_name(f"{case}_uncertainty.npz"), entropy=result["entropy"],
                 mutual_information=result["mutual_information"], variance=result["variance"])
        for channel, label in self._foreground():
            write_map(probs[channel], out_stem.with_name(f"{case}_prob_{label}{ending}"), props)
        write_map(result["entropy"], out_stem.with_name(f"{case}_entropy{ending}"), props)
        write_map(result["mutual_information"], out_stem.with_name(f"{case}_mi{ending}"), props)
        rows = [{"case": case, **r} for r in result["scores"]]
        with atomic_path(out_stem.with_name(f"{case}_scores.json")) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
        if result.get("export") is not None:
            from nnunet_kaz.postprocessing import write_kaz_bmp

            write_kaz_bmp(result["export"], out_stem.parent / "kaz_export" / f"{case}.bmp")
        write_segmentation(self.plans_manager.image_reader_writer_class(), result["segmentation"],
                           out_stem.with_name(f"{case}{ending}"), props)

    def _write_run_info(self, output_dir: Path) -> None:
        if self.postprocessing is not None:
            self.postprocessing.save(output_dir / "postprocessing.json")
        if self.calibration is not None:
            from nnunet_kaz.postprocessing import save_calibrator

            save_calibrator(self.calibration, output_dir / "calibration.json")
        write_json_atomic(self.dataset_json, output_dir / "dataset.json")
        write_json_atomic(self.plans_manager.plans, output_dir / "plans.json")
        write_json_atomic({"members": [{"folder": str(m.folder), "checkpoints": [str(c) for c in m.checkpoints]}
                                       for m in self.members],
                           "mc": self.mc, "mirror": self.mirror, "tile_step_size": self.step, "seed": self.seed,
                           "n_models": len(self.models)}, output_dir / "predict_args.json")


def list_cases(input_dir: Path, dataset_json: dict) -> dict[str, list[str]]:
    """{case: [channel files]} with nnU-Net's naming (CASE_0000.ext ...); every missing channel is listed."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise KazError(f"input folder {input_dir} does not exist")
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    files = sorted(p.name for p in input_dir.iterdir() if p.name.endswith(ending))
    cases = sorted({f[: -len(ending) - 5] for f in files if len(f) > len(ending) + 5})
    if not cases:
        raise KazError(f"no images named CASE_0000{ending} in {input_dir}")
    out, missing = {}, []
    for c in cases:
        channel_files = [input_dir / f"{c}_{i:04d}{ending}" for i in range(n_channels)]
        missing += [str(p) for p in channel_files if not p.is_file()]
        out[c] = [str(p) for p in channel_files]
    if missing:
        raise KazError("missing input channel file(s): " + ", ".join(missing))
    return out


def collect_scores(output_dir: Path) -> pd.DataFrame:
    """Gather the per-case score files into `scores.csv` (rewritten whole, atomically)."""
    rows = []
    for f in sorted(Path(output_dir).glob("*_scores.json")):
        rows.extend(json.loads(f.read_text()))
    df = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    with atomic_path(Path(output_dir) / "scores.csv") as tmp:
        df.to_csv(tmp, index=False)
    return df
