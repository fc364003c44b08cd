"""UncertaintyPredictor: folds x seeds x snapshots x MC-dropout samples in one streaming pass per case.

Per case: the image is read and preprocessed once (nnU-Net's preprocessor of the members' shared plans);
every model (member checkpoint) predicts `max(1, mc)` samples, in batches of `mc_batch`, with nnU-Net's
sliding window; each sample's probabilities (softmax, or sigmoid for regions: never logits) are added to
`StreamingStats` and dropped. Outputs go to the input's geometry; each file is written under a temporary
name and renamed, the segmentation last, so a case is finished exactly when its segmentation exists.
Every input file is checked (`nnunet_kaz.input_checks`) before anything is written; a rerun skips finished
cases and removes the temporaries a killed run left behind.

Test-time augmentation as an uncertainty method (`tta=True`, `predict --tta`, issue 25): each of nnU-Net's mirror
flips (`sliding_window.tta_flips`: 4 in 2D, 8 in 3D) becomes a sample of its own, streamed into the same
accumulators as MC samples, so entropy, MI, variance and the scores of TTA mean the same as those of ensembles,
MC dropout and snapshots, and combine with them (members x MC samples x flips). nnU-Net's within-sample
mirroring (the logits of the flips averaged inside one sample, `mirror`) is then off: every flip is counted once,
as a sample. With MC dropout, flip f of sample k draws its masks from the key (seed, case, model, k, f) (f = 0, the
identity, keeps the key (seed, case, model, k) of plain MC sampling, so its passes are those of `--mc` alone).
"""
from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnunet_kaz.errors import KazError
from nnunet_kaz.inference.export import GeometryRestorer, save_npz, write_map, write_segmentation
from nnunet_kaz.inference.members import Member, load_models, parse_member
from nnunet_kaz.inference.sliding_window import LogitOverflowError, predict_samples, set_mc_dropout, tta_flips
from nnunet_kaz.cases import MemberInput, check_image_case, list_image_cases, n_input_channels
from nnunet_kaz.io_utils import atomic_path, remove_stale_temporaries, write_json_atomic
from nnunet_kaz.uncertainty.measures import by_slabs, normalized_entropy, slabs
from nnunet_kaz.uncertainty.scores import SCORE_COLUMNS, class_scores
from nnunet_kaz.uncertainty.streaming import AccumulatedStats, StreamingStats, accumulator_bytes_per_voxel

CONFORMAL_COLUMN = "conformal_volume"  # voxels of the conformal mask (input geometry), with --conformal


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: cuda when available, else cpu; anything else as torch names it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise KazError(f"unknown device {device!r}: {e}") from None


def default_mc_batch(device: torch.device) -> int:
    """MC samples predicted together per tile: 1 on CPU (faster there and no extra memory), 8 on GPU
    (benchmarks/README.md, bench_predictor)."""
    return 1 if torch.device(device).type == "cpu" else 8


def memory_budget(device: torch.device, device_memory: float | None = None, processes: int = 1) -> float:
    """Bytes one case of this process may use on `device`: `device_memory` if given, else on a GPU its free memory
    (`torch.cuda.mem_get_info`, plus what torch's caching allocator holds unused) divided by `processes`, the
    number of predict processes sharing the device (e.g. `--num-parts` jobs on one GPU), so that each takes its
    share instead of all of them placing on the device; an explicit `device_memory` is still capped by the free
    memory. Unlimited (inf) on the CPU without `device_memory`."""
    if processes < 1:
        raise KazError(f"the number of processes sharing the device (device_processes) must be >= 1, got "
                       f"{processes}", option="device_processes")
    budget = float("inf") if device_memory is None else float(device_memory)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        free = float(torch.cuda.mem_get_info(device)[0] + cached)
        budget = min(budget, free if device_memory is not None else free / processes)
    return budget


def device_bytes(n_channels: int, n_voxels: int, window_voxels: int, n_samples: int, mc_batch: int,
                 input_channels: int = 1, regions: bool = False, on_device: bool = True,
                 image_itemsize: int = 4) -> int:
    """Peak bytes one case puts on the network's device, from what `sample_case` allocates there (listed per voxel
    in benchmarks/README.md; tests/test_gpu_paths.py counts them against what torch allocates). `n_voxels`: the
    preprocessed volume's; `window_voxels`: those of the stitching window, a slab of the patch's depth (one slice
    for a 2D patch) across the (padded) volume (`tiling.stitch_tiles`).

    - always, while a batch is stitched: the padded image, moved to the network's device for the batch
      (float32 per input channel, `image_itemsize`);
    - accumulators on the device (`on_device`): the stitching window, float16 logits of the batch's samples and
      float16 weights (2 C per sample of the batch + 2 bytes per window voxel; its final rows go into the
      accumulators as they are done, so no batch's logits exist whole), and for several samples the dense
      accumulators (`accumulator_bytes_per_voxel`: 12 C per voxel, + 4 for regions); one sample's mean is made in
      CPU memory, where it is exported (nnU-Net's predictor holds its whole float16 logits on the device instead:
      2 C + 2 + 4 bytes per voxel);
    - accumulators in CPU memory (not `on_device`): the image only.
    Network activations are per tile and not counted."""
    image = image_itemsize * input_channels * n_voxels
    if not on_device:
        return image
    window = (2 * n_channels * mc_batch + 2) * window_voxels
    accumulators = 0 if n_samples == 1 else accumulator_bytes_per_voxel(n_channels, n_samples, regions) * n_voxels
    return image + window + accumulators


def case_placement(n_channels: int, n_voxels: int, n_samples: int, mc_batch: int, budget: float,
                   input_channels: int = 1, regions: bool = False, window_voxels: int = 0) -> tuple[bool, int]:
    """(accumulators and stitching fit on the device, MC batch that fits) for one case (issue 15.2):
    `device_bytes` against `budget`. When even one sample does not fit, the accumulators and the stitching go to
    CPU memory, as nnU-Net's predictor moves its logits there, and only the tiles run on the device, one sample
    at a time (the smallest footprint, for a case that is short of memory already). Otherwise the batch is the
    largest that fits, at most `mc_batch`."""
    def need(batch: int) -> float:
        return device_bytes(n_channels, n_voxels, window_voxels, n_samples, batch, input_channels, regions)

    if need(1) > budget:
        return False, 1
    if not np.isfinite(budget):
        return True, mc_batch
    per_sample = need(2) - need(1)  # 2 C bytes per window voxel and sample of a batch
    room = budget - need(1)
    return True, int(max(1, min(mc_batch, 1 + room // per_sample))) if per_sample > 0 else mc_batch


# torch's out-of-memory error: torch.OutOfMemoryError since torch 2.5, torch.cuda.OutOfMemoryError before (issue 23.2)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_out_of_memory(error: BaseException, network_on_cuda: bool) -> bool:
    """Whether `sample_or_retry` redoes a case after `error`: torch's out-of-memory error on any device
    (`torch.OutOfMemoryError`, torch >= 2.5; `torch.cuda.OutOfMemoryError` before), and, while the network runs
    on CUDA, any RuntimeError, as nnU-Net's predictor catches it (`predict_sliding_window_return_logits`):
    cuDNN reports a workspace it cannot allocate as a plain RuntimeError (CUDNN_STATUS_NOT_ENOUGH_WORKSPACE,
    CUDNN_STATUS_ALLOC_FAILED, "cuDNN error: ..."), as do some CUDA allocations made outside torch's allocator."""
    if isinstance(error, OUT_OF_MEMORY):
        return True
    return network_on_cuda and isinstance(error, RuntimeError) and not isinstance(error, LogitOverflowError)



class UncertaintyPredictor:
    """Combine ensemble members (folds, seeds, snapshots) and MC-dropout samples by averaging probabilities.

    `mc=0` runs each model once with dropout off; `mc=N` samples each model N times with only the dropout
    modules in train mode (normalisation stays in eval mode). Sample k of model m on case c draws its dropout
    masks on tile t from a generator seeded by (seed, crc32(c), m, k, t) (`sliding_window.per_sample_dropout`),
    so a run is reproducible, an interrupted run resumes to the same outputs, and `mc_batch` does not change
    the samples on a given device. `mirror` (default True, as `nnUNetv2_predict` and `nnunet-kaz predict`):
    each sample's logits are averaged over every flip of the axes its checkpoint was trained to mirror
    (`inference_allowed_mirroring_axes`), nnU-Net's test-time mirroring; False is `--disable-tta`.
    """

    def __init__(self, members: Sequence[Member], mc: int = 0, mirror: bool = True, tile_step_size: float = 0.5,
                 device: str | torch.device = "auto", mc_batch: int | None = None, seed: int = 0,
                 verbose: bool = True, calibration=None, postprocessing=None, calibrated_entropy: bool = False,
                 conformal=None, device_memory: float | None = None, device_processes: int = 1,
                 pairwise_dice: bool = True, tta: bool = False):
        self.device = resolve_device(device)
        self.device_memory = device_memory  # bytes a case may use on the device (`memory_budget`); None: its share
        self.device_processes = device_processes  # predict processes sharing the device (`memory_budget`)
        if device_processes < 1:
            raise KazError(f"the number of processes sharing the device (device_processes) must be >= 1, got "
                           f"{device_processes}", option="device_processes")
        self.pairwise_dice = pairwise_dice  # False: no sample masks kept, pairwise_dice(_pooled) scores NaN
        if self.device.type == "cuda":  # as nnUNetPredictor.__init__: cuDNN picks the fastest kernels per shape
            torch.backends.cudnn.benchmark = True
        mc_batch = default_mc_batch(self.device) if mc_batch is None else mc_batch
        if mc < 0:
            raise KazError(f"the number of MC samples (mc) must be >= 0, got {mc}", option="mc")
        if mc_batch < 1:
            raise KazError(f"the MC batch (mc_batch) must be >= 1, got {mc_batch}", option="mc_batch")
        if not 0 < tile_step_size <= 1:
            raise KazError(f"the tile step (tile_step_size) must lie in (0, 1], got {tile_step_size}",
                           option="tile_step_size")
        # TTA makes every flip a sample of its own: the within-sample mirroring (which would average them) is off
        self.members, self.mc, self.mirror, self.step = list(members), mc, bool(mirror) and not tta, tile_step_size
        self.tta = tta
        self.calibrated_entropy = calibrated_entropy
        self.mc_batch, self.seed, self.verbose = mc_batch, seed, verbose
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        ref = self.members[0]
        self.plans_manager = PlansManager(ref.plans)
        self.configuration_manager = self.plans_manager.get_configuration(ref.configuration)
        self.dataset_json = ref.dataset_json
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self.regions = self.label_manager.has_regions
        others = f" and {len(self.members) - 1} more" if len(self.members) > 1 else ""
        # what the inputs must fit (`check_image_case`): the members share spacing and transpose (check_compatible)
        self.input_spec = MemberInput.from_plans(f"{ref.folder.parent.name}/{ref.folder.name}{others}",
                                                 self.plans_manager, self.configuration_manager)
        self.calibration, self.postprocessing = calibration, postprocessing
        if calibration is not None and self.regions:
            raise KazError("calibration applies to softmax outputs; these members were trained on regions")
        self.conformal = conformal
        if conformal is not None:
            self._check_conformal(conformal)
        self.models = load_models(self.members, self.device, mc)

    def _check_conformal(self, conformal) -> None:
        """The conformal file's labels must be these members' classes (or regions), on the same channels."""
        ours = {label: channel for channel, label in self._foreground()}
        wrong = [t.name for t in conformal.targets if ours.get(t.name) != t.channel or t.region != self.regions]
        if wrong:
            raise KazError(f"the conformal file's label(s) {wrong} are not {'regions' if self.regions else 'classes'} "
                           f"of these members on the same channels ({ours}) (conformal)", option="conformal")

    def network(self, index: int = 0) -> torch.nn.Module:
        """Model `index`'s network with its weights, in eval mode (dropout off), ready to run."""
        return self.models[index].ready()

    # --- one case -------------------------------------------------------------------------------------
    def preprocess(self, image_files: list[str]) -> tuple[torch.Tensor, dict]:
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        try:
            data, _, props = preprocessor.run_case(image_files, None, self.plans_manager,
                                                   self.configuration_manager, self.dataset_json)
        except Exception as e:
            raise KazError(f"cannot read or preprocess {image_files}: {type(e).__name__}: {e}") from None
        return torch.from_numpy(np.asarray(data, dtype=np.float32)), props

    def flips(self, model_index: int = 0) -> list[tuple[int, ...] | None]:
        """The test-time flips of a model, each a sample (`tta`): its mirror axes' `tta_flips`; [None] without
        TTA (one pass per sample, mirrored inside it when `mirror`)."""
        if not self.tta:
            return [None]
        return tta_flips(getattr(self.models[model_index].network, "mirror_axes", None))

    def sample_case(self, data: torch.Tensor, case: str, progress: bool = False,
                    on_cpu: bool = False) -> AccumulatedStats:
        """Stream every model's samples (x its test-time flips with `tta`) of one preprocessed case into the
        accumulators.

        The accumulators and the stitched logits live on the device when they fit the memory budget
        (`case_placement`, `memory_budget`), else (or with `on_cpu`, the retry after an out-of-memory error) in
        CPU memory, with the samples predicted one at a time; on the device the MC batch is the largest that
        fits, at most `mc_batch`. Precision does not depend on the placement (README, "On a GPU: placement,
        precision and memory"): the network runs under autocast whenever it is on CUDA, the logits are stitched in
        float16 and the probabilities accumulated in float32 wherever the accumulators are."""
        n_heads = self.label_manager.num_segmentation_heads
        n_per_model = max(1, self.mc)
        flips = [self.flips(m) for m in range(len(self.models))]
        n_total = n_per_model * sum(len(f) for f in flips)
        fits, mc_batch = case_placement(n_heads, int(np.prod(data.shape[1:])), n_total, self.mc_batch,
                                        memory_budget(self.device, self.device_memory, self.device_processes),
                                        int(data.shape[0]), self.regions, self.window_voxels(data.shape[1:]))
        if on_cpu:
            fits, mc_batch = False, 1
        results_device = self.device if fits else torch.device("cpu")
        self.case_mc_batch, self.case_device = mc_batch, results_device  # what this case runs with
        # one sample: stitched on the device, its probabilities (the mean) made slab by slab in CPU memory, where
        # it is exported: the device holds the image and the stitching window only (`device_bytes`)
        stats = StreamingStats(n_heads, tuple(data.shape[1:]), self.regions,
                               torch.device("cpu") if n_total == 1 else results_device, max_samples=n_total,
                               pairwise_channels=None if self.pairwise_dice else ())
        bar = tqdm(total=n_total, desc=f"  {case} samples", leave=False, disable=not progress)
        for net, b, mirror_axes, keys, flip in self.sample_batches(case, mc_batch):
            # the stitched logits go into the accumulators slab by slab as they become final (probabilities made
            # slab by slab): neither the batch's logits nor its probabilities ever exist whole (issues 15, 23.7)
            batch = stats.batch(b, self.probabilities)
            predict_samples(net, data, net.patch_size, n_heads, b, self.step, mirror_axes, results_device,
                            sample_keys=keys, flip=flip, emit=batch.slab)
            batch.end()
            bar.update(b)
        bar.close()
        return stats.result()

    def window_voxels(self, spatial_shape) -> int:
        """Voxels of the stitching window for an image of `spatial_shape` (`tiling.stitch_tiles`): the patch's
        depth (one slice for a 2D patch) across the image's other axes, padded to the patch; the largest over
        the models."""
        n = len(spatial_shape)
        sizes = [1]
        for patch in {tuple(int(p) for p in m.patch_size) for m in self.models}:
            depth = patch[0] if len(patch) == n else 1
            sizes.append(depth * int(np.prod([max(int(s), q) for s, q in zip(spatial_shape[1:], patch[1 - n:])])))
        return max(sizes)

    def sample_batches(self, case: str, mc_batch: int):
        """The batches `sample_case` predicts, in order: (network ready to run, batch size, mirror axes, the
        batch's sample keys or None, the test-time flip or None). Sample k of model m (and flip f >= 1 with
        `tta`) draws its masks from its own stream (seed, crc32(case), m, k[, f]), whatever the batch (class
        docstring). Also what benchmarks time the forward passes alone with (`predict_samples(..., stitch=False)`)."""
        n_per_model = max(1, self.mc)
        flips = [self.flips(m) for m in range(len(self.models))]
        case_seed = zlib.crc32(case.encode())
        for m_index, model in enumerate(self.models):
            net = model.ready()
            set_mc_dropout(net, self.mc > 0)
            mirror_axes = net.mirror_axes if self.mirror else None
            for f_index, flip in enumerate(flips[m_index]):
                for start in range(0, n_per_model, mc_batch):
                    b = min(mc_batch, n_per_model - start)
                    keys = [(self.seed, case_seed, m_index, k, *((f_index,) if f_index else ()))
                            for k in range(start, start + b)] if self.mc > 0 else None
                    yield net, b, mirror_axes, keys, flip

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) logits of B samples -> each sample's probabilities with nnU-Net's own nonlinearity
        (softmax over the classes, or sigmoid for regions), float32.

        Written slab by slab of the first spatial axis into one output: nnU-Net's nonlinearity converts its
        whole input to float32 and returns a new array, and stacking the samples copies them once more (three
        float32 copies of the batch at once, most of the single-member peak on a 3D volume, issue 15). The
        nonlinearity acts on each voxel's classes alone, so the slabs give the same values."""
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for s in range(logits.shape[0]):
            for sl in slabs(logits.shape[2:], StreamingStats.SLAB_VOXELS):
                out[s, :, sl] = self.label_manager.apply_inference_nonlin(logits[s, :, sl])
        return out

    def finalize(self, stats: AccumulatedStats, props: dict) -> dict:
        """Maps in the input geometry and per-class scores.

        Every uncertainty output (entropy, mutual information, variance, the scores, their maps) comes from the
        UNcalibrated samples, as paper 000 (section 2.3) and paper 002 compute them: MI = H(mean) - mean_s H(p_s)
        on the same (uncalibrated) probabilities. Calibration changes only the output probabilities and so the
        segmentation; `calibrated_entropy` adds the entropy of the calibrated mean as its own, named map.

        `stats` is consumed: each of its dense arrays is released (set to None) once it is exported, so the
        preprocessed-space statistics and the input-geometry maps are not all alive at once (issue 15); paper
        004's U(x) is exported one class at a time, for that class's score only."""
        geo = GeometryRestorer(self.plans_manager, self.configuration_manager, props)
        single = stats.n_samples == 1  # then MI and the variance are 0 by definition (one sample is its own mean)
        n_channels = stats.mean.shape[0]
        # the mean is overwritten by the output probabilities where nothing is resampled (no copy): several
        # samples' U(x) comes from mean_plogp; one sample's from the mean as clipped and renormalised there (the
        # softmax's own values within float32 rounding)
        raw = geo.probabilities(stats.mean, self.regions, consume=True)
        sample_entropy = None if single else geo.maps(stats.sample_entropy()[None], consume=True)[0]
        stats.mean_entropy = None
        if not single:
            stats.mean = None
        ratio = geo.voxel_volume_ratio
        # each class's U(x), nats, in place of its p ln p and not copied where nothing is resampled (issue 23.7)
        rows = [{"label": label, **class_scores(stats, channel, raw[channel],
                                                geo.maps(stats.u_sample(channel, consume=True)[None],
                                                         consume=True)[0], ratio),
                 "n_members": len(self.models), "n_samples": stats.n_samples}
                for channel, label in self._foreground()]
        stats.mean = stats.mean_plogp = None  # (one sample: U(x) and the entropy came from the mean)
        entropy = by_slabs(lambda p: normalized_entropy(p, self.regions), raw, axis=1).astype(np.float32, copy=False)
        # one sample: zeros made in the output geometry, which take no memory until written (issue 15)
        if single:
            mi = geo.zeros(1)[0]
        else:  # in place of the sample entropy
            mi = np.subtract(entropy, sample_entropy, out=sample_entropy)
            np.clip(mi, 0.0, None, out=mi)
        del sample_entropy
        variance = geo.zeros(n_channels) if single else geo.maps(stats.variance, consume=True)
        stats.var = None
        result = {"probabilities": raw, "entropy": entropy, "mutual_information": mi.astype(np.float32, copy=False),
                  "variance": variance, "scores": rows}
        if self.calibration is not None:  # the output probabilities, before thresholding (paper 000 section 2.3)
            from nnunet_kaz.postprocessing import apply_calibration

            result["probabilities"] = apply_calibration(raw, self.calibration)
            if self.calibrated_entropy:
                result["calibrated_entropy"] = by_slabs(lambda p: normalized_entropy(p, self.regions),
                                                        result["probabilities"], axis=1).astype(np.float32)
        if self.conformal is not None:  # on the output probabilities (calibrated with --calibration), as fitted
            result["conformal"] = self.conformal.masks(result["probabilities"])
            for row in rows:
                mask = result["conformal"].get(row["label"])
                row[CONFORMAL_COLUMN] = int(mask.sum()) if mask is not None else float("nan")
        return result

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
        if num_parts < 1 or not 0 <= part_id < num_parts:
            raise KazError(f"the part id (part_id) must lie in 0..{num_parts - 1} for {num_parts} part(s), got "
                           f"{part_id}", option="part_id")
        cases = list_image_cases(input_dir, self.dataset_json)
        mine = sorted(cases)[part_id::num_parts]
        ending = self.dataset_json["file_ending"]
        todo = [c for c in mine if overwrite or not (output_dir / f"{c}{ending}").exists()]
        # every input is checked before anything is written (a truncated image, or one whose dimensionality does
        # not fit the member, fails here, not mid-run)
        n_channels = n_input_channels(self.dataset_json)
        for case in tqdm(todo, desc="checking inputs", disable=not self.verbose or len(todo) < 20):
            check_image_case(case, cases[case], n_channels, member=self.input_spec)
        output_dir.mkdir(parents=True, exist_ok=True)
        # temporaries of a killed run (SIGKILL skips atomic_path's clean-up): all of them when this process is
        # the folder's only writer, else those of the cases it redoes
        stale = None if num_parts == 1 else {n for c in todo for n in self._case_files(c)}
        for folder in (output_dir, output_dir / "kaz_export"):
            remove_stale_temporaries(folder, stale)
        self._write_run_info(output_dir)
        if len(todo) < len(mine):
            print(f"{len(mine) - len(todo)} case(s) already predicted in {output_dir}, skipped (--overwrite redoes)")
        from nnunetv2.utilities.helpers import empty_cache

        for case in tqdm(todo, desc="cases", disable=not self.verbose):
            self.predict_case(cases[case], output_dir / case, progress=self.verbose)
            empty_cache(self.device)  # nnU-Net's helper: frees the case's cached GPU blocks (no-op on the CPU)
        return collect_scores(output_dir)

    def predict_case(self, image_files: list[str], out_stem: Path, progress: bool = False) -> dict:
        data, props = self.preprocess(image_files)
        stats = self.sample_or_retry(data, out_stem.name, progress)
        del data  # the preprocessed image is not needed for the export
        result = self.finalize(stats, props)
        del stats
        result["segmentation"], result["export"] = self.segment(result["probabilities"], image_files, props)
        self.write_case(result, props, out_stem)
        return result

    def sample_or_retry(self, data: torch.Tensor, case: str, progress: bool = False) -> AccumulatedStats:
        """`sample_case`; an out-of-memory error while sampling (`is_out_of_memory`: what nnU-Net's predictor
        catches) redoes the case once, with one warning, with the accumulators and the stitching in CPU memory
        and one sample at a time (`on_cpu`), the network still on its device under the same autocast, instead of
        ending the run (issues 15.2, 23.1). An attempt that had nothing to give up (already in CPU memory at MC
        batch 1) is not repeated. Nothing of the case is written before its samples are complete."""
        try:
            return self.sample_case(data, case, progress)
        except Exception as error:
            if not is_out_of_memory(error, self.device.type == "cuda") or (
                    self.case_device.type == "cpu" and self.case_mc_batch == 1):
                raise
            first = f"{self.case_device.type}, MC batch {self.case_mc_batch}"
        # outside the except block: the failed attempt's tensors, held by the traceback, are freed by now
        from nnunetv2.utilities.helpers import empty_cache

        empty_cache(self.device)
        warnings.warn(f"{case}: out of memory on {self.device} (accumulators on {first}); predicting this case "
                      "again with its accumulators in CPU memory, one sample at a time", stacklevel=2)
        return self.sample_case(data, case, progress, on_cpu=True)

    def segment(self, probs: np.ndarray, image_files: list[str], props: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """The segmentation in the input geometry: nnU-Net's argmax (or region order), or the post-processing
        chain without its resize step. With a resize step the whole chain also gives the export mask
        (e.g. a KAZ slice at its original 510 x 788), returned second."""
        dtype = np.uint8 if len(self.label_manager.foreground_labels) < 255 else np.uint16
        chain = self.postprocessing
        if chain is None:  # slab by slab into `dtype`: nnU-Net's argmax gives int64, 8 bytes per voxel at once
            seg = np.empty(probs.shape[1:], dtype=dtype)
            for sl in slabs(probs.shape[1:], StreamingStats.SLAB_VOXELS):
                seg[sl] = self.label_manager.convert_probabilities_to_segmentation(probs[:, sl])
            return seg, None
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
                f"{case}_calibrated_entropy{ending}",
                f"{case}_scores.json", f"{case}{ending}", f"{case}.bmp",
                *(f"{case}_prob_{label}{ending}" for _, label in self._foreground()),
                *(f"{case}_conformal_{label}{ending}" for _, label in self._foreground())]

    def write_case(self, result: dict, props: dict, out_stem: Path) -> None:
        ending = self.dataset_json["file_ending"]
        case = out_stem.name
        probs = result["probabilities"]
        save_npz(out_stem.with_name(f"{case}.npz"), probabilities=probs)
        extra = {"calibrated_entropy": result["calibrated_entropy"]} if "calibrated_entropy" in result else {}
        save_npz(out_stem.with_name(f"{case}_uncertainty.npz"), entropy=result["entropy"],
                 mutual_information=result["mutual_information"], variance=result["variance"], **extra)
        for channel, label in self._foreground():
            write_map(probs[channel], out_stem.with_name(f"{case}_prob_{label}{ending}"), props)
        write_map(result["entropy"], out_stem.with_name(f"{case}_entropy{ending}"), props)
        write_map(result["mutual_information"], out_stem.with_name(f"{case}_mi{ending}"), props)
        if "calibrated_entropy" in result:
            write_map(result["calibrated_entropy"], out_stem.with_name(f"{case}_calibrated_entropy{ending}"), props)
        writer = self.plans_manager.image_reader_writer_class()
        for label, mask in result.get("conformal", {}).items():
            write_segmentation(writer, mask.astype(np.uint8), out_stem.with_name(f"{case}_conformal_{label}{ending}"),
                               props)
        rows = [{"case": case, **r} for r in result["scores"]]
        with atomic_path(out_stem.with_name(f"{case}_scores.json")) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
        if result.get("export") is not None:
            from nnunet_kaz.postprocessing import write_kaz_bmp

            write_kaz_bmp(result["export"], out_stem.parent / "kaz_export" / f"{case}.bmp")
        write_segmentation(writer, result["segmentation"], out_stem.with_name(f"{case}{ending}"), props)

    def _write_run_info(self, output_dir: Path) -> None:
        if self.postprocessing is not None:
            self.postprocessing.save(output_dir / "postprocessing.json")
        if self.calibration is not None:
            from nnunet_kaz.postprocessing import save_calibrator

            save_calibrator(self.calibration, output_dir / "calibration.json")
        if self.conformal is not None:
            self.conformal.save(output_dir / "conformal.json")
        write_json_atomic(self.dataset_json, output_dir / "dataset.json")
        write_json_atomic(self.plans_manager.plans, output_dir / "plans.json")
        write_json_atomic({"members": [{"folder": str(m.folder), "checkpoints": [str(c) for c in m.checkpoints]}
                                       for m in self.members],
                           "mc": self.mc, "mc_batch": self.mc_batch, "mirror": self.mirror, "tta": self.tta,
                           "tta_flips": [list(f) for f in self.flips(0)] if self.tta else None,
                           "device_memory": self.device_memory, "device_processes": self.device_processes,
                           "tile_step_size": self.step, "seed": self.seed, "n_models": len(self.models),
                           "uncertainty_from": "uncalibrated samples",
                           "calibrated_entropy": self.calibrated_entropy and self.calibration is not None,
                           "pairwise_dice": self.pairwise_dice}, output_dir / "predict_args.json")


def collect_scores(output_dir: Path) -> pd.DataFrame:
    """Gather the per-case score files into `scores.csv` (rewritten whole, atomically)."""
    rows = []
    for f in sorted(Path(output_dir).glob("*_scores.json")):
        rows.extend(json.loads(f.read_text()))
    df = pd.DataFrame(rows, columns=SCORE_COLUMNS + ([CONFORMAL_COLUMN] if any(CONFORMAL_COLUMN in r for r in rows)
                                                    else []))
    with atomic_path(Path(output_dir) / "scores.csv") as tmp:
        df.to_csv(tmp, index=False)
    return df


def load_member(spec: str, device: str | torch.device = "auto", softmax_only: bool = True,
                tile_step_size: float = 0.5) -> tuple[UncertaintyPredictor, torch.nn.Module]:
    """One member for the per-network commands (explain, mhex, refine): (a predictor of the member's FIRST
    checkpoint, for its preprocessing, geometry and sampling, without test-time mirroring, as their heatmaps are
    computed; that checkpoint's network, eval mode, on `device`). Loaded by `load_models` with the predictor's
    checks; `softmax_only` refuses region-trained members."""
    member = parse_member(spec)
    member.checkpoints = member.checkpoints[:1]
    predictor = UncertaintyPredictor([member], mirror=False, device=device, tile_step_size=tile_step_size,
                                     verbose=False)
    if softmax_only and predictor.regions:
        raise KazError(f"{member.folder.name} was trained on regions (sigmoid outputs); this command needs a "
                       "label-based (softmax) dataset")
    return predictor, predictor.network(0)
