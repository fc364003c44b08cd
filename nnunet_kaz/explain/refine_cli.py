"""`nnunet-kaz refine fit / apply`: ERNet's heatmap-guided probability refinement (paper 001 section 3.2.4,
Algorithm 3) as a post-processing step of a trained member.

Per case (everything in the INPUT image's geometry, so the refined output differs from `nnunet-kaz predict`'s only
inside the region of interest):
- p: the member's softmax probabilities (its first checkpoint, nnU-Net's sliding window, no mirroring), restored
  to the input geometry like `nnunet-kaz predict` does; the unrefined segmentation is their argmax.
- heatmap: Seg-Grad-CAM (paper 001 eq. 1) of the target class over the member's predicted region, from the LAST
  CONVOLUTIONAL BLOCK, the last decoder stage `decoder.stages.{n-1}` whose output the 1x1 segmentation layer turns
  into the logits before the softmax (ERNet: "the last convolutional layer within the FCN"). Not the 1x1 layer
  itself: its Grad-CAM is |M|/N * ReLU(logit_c), a function of p only. Computed on the network's grid (tile by
  tile, slice by slice for 2D configurations) and resampled to the input geometry with nnU-Net's probability
  resampling. h = `heatmap_feature`: the heatmap inside the predicted class region (paper 001 eq. 2 with the
  prediction standing in for the label, at fitting and at application alike), divided by its per-case maximum.
- ROI = bounding box of the predicted target-class region enlarged by `margin` voxels per axis of the input
  array, clipped (`roi_from_mask`); no predicted voxel = no ROI = nothing changes. `roi="largest"` boxes only the
  largest connected component of that region (face connectivity; ties: the first in scan order), closer to
  ERNet's object boxes when the prediction has scattered false positives. The mode is fixed at fitting.
- fit: the (p, h) features and 0/1 labels of every case's ROI voxels are pooled and `HeatmapRefiner.fit` trains
  the 2-5-1 network, by default as Algorithm 3 (learning rate 0.01 on gradients summed over the voxels, U[0, 1)
  initialisation, 1000 iterations, MSE; `reduction="mean"`: the faster variant, learning rate 0.5 on mean
  gradients); the JSON holds its parameters plus the feature layout (`features`) that `apply` checks.
- apply: inside the ROI the target-class probability becomes the refiner's output and the other classes are
  rescaled to sum to 1 - p_new (their old proportions kept); inside the ROI the segmentation is the argmax of the
  refined probabilities, outside it every voxel keeps the unrefined label (copied, never recomputed).
- effect (`--gt`): Dice and HD95 of the target class before / after per case (`overlap_metrics`,
  `surface_metrics`; axes of length 1 dropped with their spacing, distances in the spacing's unit, HD95 NaN when
  exactly one mask is empty), and their means over the cases (NaNs left out of the means).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_path, write_json_atomic

FEATURE_LAYOUT = ["probability", "heatmap_weight"]
FEATURES_VERSION = 1
ROI_MODES = ("all", "largest")
EFFECT_COLUMNS = ["case", "dice_before", "dice_after", "hd95_before", "hd95_after", "roi_voxels",
                  "changed_voxels"]


def last_block(network: torch.nn.Module) -> str:
    """Module name of the last decoder stage (the last convolutional block before the segmentation layer), also
    inside an MHEX+ wrapper; KazError for networks without `decoder.stages`."""
    stages = getattr(getattr(network, "decoder", None), "stages", None)
    if stages is None or len(stages) == 0:
        raise KazError(f"{type(network).__name__} has no decoder.stages: name the Grad-CAM block to use (layer)",
                       option="layer")
    target = stages[len(stages) - 1]
    return next(name for name, m in network.named_modules() if m is target)


class CaseMaps:
    """Probabilities (C, *input), the heatmap feature h (*input), unrefined segmentation, ROI and properties."""

    def __init__(self, probs: np.ndarray, heat: np.ndarray, target_class: int, margin: int, props: dict,
                 roi: str = "all"):
        from nnunet_kaz.explain.refinement import heatmap_feature, roi_from_mask

        self.probs, self.props = probs, props
        self.seg = probs.argmax(0)
        self.foreground = self.seg == target_class
        self.h = heatmap_feature(heat, self.foreground).astype(np.float32)
        self.roi = roi_from_mask(largest_component(self.foreground) if roi == "largest" else self.foreground, margin)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a boolean mask (scipy.ndimage.label), empty for an empty mask."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def case_maps(predictor, network, block: str, files: list[str], case: str, target_class: int, margin: int,
              roi: str = "all", tile_step_size: float = 0.5) -> CaseMaps:
    """p and Grad-CAM heatmap of one case in the input geometry (module docstring)."""
    from nnunet_kaz.explain.gradcam import explain_case
    from nnunet_kaz.inference.export import GeometryRestorer

    data, props = predictor.preprocess(files)
    mean = predictor.sample_case(data, case).mean
    predicted = mean.argmax(0) == target_class
    heat = np.zeros(data.shape[1:], np.float32)
    patch = predictor.configuration_manager.patch_size
    # what the network sees: the volume for a 3D configuration, each slice for a 2D one (nnU-Net's layout)
    views = [((slice(None),) * (data.ndim - 1), data)] if len(patch) == data.ndim - 1 else \
        [((z,), data[:, z]) for z in range(data.shape[1])]
    for index, view in views:
        mask = predicted[index]
        if mask.any():
            heat[index] = explain_case(network, view, [block], torch.from_numpy(mask), target_class, patch,
                                       tile_step_size)[block]
    geo = GeometryRestorer(predictor.plans_manager, predictor.configuration_manager, props)
    return CaseMaps(geo.probabilities(mean, False), geo.maps(heat[None])[0], target_class, margin, props, roi)


def _read_label(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A label image (`nnunet_kaz.cases.read_segmentation`) in the layout of the case's maps `shape`."""
    from nnunet_kaz.cases import read_segmentation, squeeze_to

    return squeeze_to(read_segmentation(path)[0], tuple(shape), 0, path)


def _image_cases(predictor, images_dir: Path, labels_dir: Path | None, what: str
                 ) -> tuple[dict[str, list[str]], dict[str, Path] | None]:
    """Every case of `images_dir` and its label in `labels_dir` (if given), all checked (complete, readable,
    one size per case, the dataset's channels, a dimensionality the member takes) before anything is written."""
    from nnunet_kaz.cases import check_image_case, list_image_cases, list_label_files, n_input_channels

    cases = list_image_cases(images_dir, predictor.dataset_json)
    labels = None
    if labels_dir is not None:
        found = list_label_files(labels_dir, what)
        missing = sorted(set(cases) - set(found))
        if missing:
            ending = predictor.dataset_json["file_ending"]
            raise KazError(f"missing {what} file(s): " + ", ".join(str(Path(labels_dir) / f"{c}{ending}")
                                                                   for c in missing))
        labels = {c: found[c] for c in cases}
    for case, files in cases.items():
        check_image_case(case, files, n_input_channels(predictor.dataset_json),
                         None if labels is None else labels[case], predictor.input_spec)
    return cases, labels


def _check_class(predictor, target_class: int) -> None:
    n = predictor.label_manager.num_segmentation_heads
    if not 1 <= target_class < n:
        raise KazError(f"target class {target_class} (target_class) out of range: the member has classes "
                       f"0..{n - 1}, 0 being the background", option="target_class")


def refine_fit(member_spec: str, images_dir: Path, labels_dir: Path, out_json: Path, margin: int = 5,
               target_class: int = 1, layer: str | None = None, roi: str = "all", iterations: int = 1000,
               learning_rate: float | None = None, seed: int = 0, device: str = "auto",
               tile_step_size: float = 0.5, reduction: str = "sum") -> dict:
    """Fit the heatmap refiner on the ROI voxels of every case of `images_dir` against `labels_dir`; write JSON."""
    from nnunet_kaz.explain.gradcam import resolve_layers
    from nnunet_kaz.explain.refinement import HeatmapRefiner, pool_roi_features
    from nnunet_kaz.inference import load_member

    if margin < 0:
        raise KazError(f"the ROI margin (margin) must be >= 0, got {margin}", option="margin")
    if roi not in ROI_MODES:
        raise KazError(f"the ROI mode (roi) must be one of {ROI_MODES}, got {roi!r}", option="roi")
    predictor, network = load_member(member_spec, device, tile_step_size=tile_step_size)
    _check_class(predictor, target_class)
    block = resolve_layers(network, [layer])[0] if layer else last_block(network)
    cases, labels = _image_cases(predictor, images_dir, labels_dir, "label")
    refiner = HeatmapRefiner(iterations=iterations, learning_rate=learning_rate, reduction=reduction,
                             seed=seed)  # checks the arguments before any case is read
    pooled, summary = [], []
    for case, files in tqdm(sorted(cases.items()), desc="refine fit: cases"):
        m = case_maps(predictor, network, block, files, case, target_class, margin, roi, tile_step_size)
        y = _read_label(labels[case], m.seg.shape) == target_class
        pooled.append((m.probs[target_class], m.h, y, m.roi))
        summary.append({"case": case, "roi_voxels": 0 if m.roi is None else int(m.seg[m.roi].size)})
    X, y = pool_roi_features(pooled)
    refiner.fit(X, y)
    model = predictor.models[0]
    d = refiner.to_dict()
    d["features"] = {"layout": FEATURE_LAYOUT, "version": FEATURES_VERSION, "block": block,
                     "target_class": target_class, "margin": margin, "roi": roi, "heatmap_mask": "prediction",
                     "space": "input image geometry"}
    d["member"] = {"folder": str(model.member.folder), "checkpoint": str(model.checkpoint),
                   "trainer": model.member.trainer_name, "configuration": model.member.configuration}
    d["fit"] = {"cases": summary, "n_voxels": int(len(y)), "foreground_fraction": float(y.mean()),
                "initial_loss": refiner.loss_history[0], "final_loss": refiner.loss_history[-1]}
    write_json_atomic(d, out_json)
    return d


def load_refiner(path: Path, network: torch.nn.Module, predictor):
    """(HeatmapRefiner, features dict) from a `refine fit` JSON, checked against this member (clear errors for a
    missing file, another feature layout, a block the network lacks, a class it does not have)."""
    from nnunet_kaz.explain.gradcam import resolve_layers
    from nnunet_kaz.explain.refinement import HeatmapRefiner

    path = Path(path)
    if not path.is_file():
        raise KazError(f"refiner file {path} not found (write one with `nnunet-kaz refine fit`)")
    refiner = HeatmapRefiner.load(path)
    d = json.loads(path.read_text())
    features = d.get("features")
    if not isinstance(features, dict):
        raise KazError(f"{path} holds no feature layout: it was not written by `nnunet-kaz refine fit`")
    if features.get("layout") != FEATURE_LAYOUT or features.get("version") != FEATURES_VERSION:
        raise KazError(f"{path} was fitted on features {features.get('layout')} (version {features.get('version')}); "
                       f"this version computes {FEATURE_LAYOUT} (version {FEATURES_VERSION}): refit it")
    try:
        features["block"] = resolve_layers(network, [features["block"]])[0]
        features["target_class"], features["margin"] = int(features["target_class"]), int(features["margin"])
        if features["roi"] not in ROI_MODES:
            raise ValueError(f"roi {features['roi']!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise KazError(f"{path}: bad feature layout entry {e}") from None
    except KazError as e:
        raise KazError(f"{path} was fitted on block {features['block']!r}, which this member's network lacks: "
                       f"{e}") from None
    _check_class(predictor, features["target_class"])
    return refiner, features


def refine_probabilities(refiner, m: CaseMaps, target_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(refined probabilities, refined segmentation) of one case; outside the ROI both equal the input."""
    probs, seg = m.probs.copy(), m.seg.copy()
    if m.roi is None:
        return probs, seg
    roi = (slice(None), *m.roi)
    new = refiner.refine(m.probs[target_class], m.h, m.roi)[m.roi]
    rest = m.probs[roi].copy()
    rest[target_class] = 0.0
    mass = rest.sum(0)
    scale = np.where(mass > 1e-8, (1.0 - new) / np.maximum(mass, 1e-8), 0.0)
    rest *= scale
    if target_class != 0:  # all old mass was on the target: what it loses goes to the background
        rest[0] += np.where(mass > 1e-8, 0.0, 1.0 - new)
    rest[target_class] = new
    probs[roi] = rest
    seg[m.roi] = rest.argmax(0)
    return probs, seg


def effect_row(case: str, before: np.ndarray, after: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
               roi_voxels: int) -> dict:
    """Dice and HD95 of one class mask before / after refinement against the ground truth (module docstring)."""
    from nnunet_kaz.cases import drop_singletons
    from nnunet_kaz.evaluation import overlap_metrics, surface_metrics

    row = {"case": case}
    for tag, pred in (("before", before), ("after", after)):
        p, sp = drop_singletons(pred, spacing)
        g, _ = drop_singletons(gt, spacing)
        row[f"dice_{tag}"] = overlap_metrics(p, g)["dice"]
        row[f"hd95_{tag}"] = surface_metrics(p, g, sp)["hd95"]
    row["roi_voxels"], row["changed_voxels"] = roi_voxels, int(np.count_nonzero(before != after))
    return row


def refine_apply(member_spec: str, images_dir: Path, refiner_json: Path, out_dir: Path, gt_dir: Path | None = None,
                 device: str = "auto", tile_step_size: float = 0.5) -> pd.DataFrame | None:
    """Refined segmentations CASE.ext and CASE.npz (probabilities, roi) in `out_dir`; with `gt_dir` also
    refinement_effect.csv (returned). Every input is checked before anything is written."""
    from nnunet_kaz.inference import load_member
    from nnunet_kaz.inference.export import save_npz, write_segmentation

    predictor, network = load_member(member_spec, device, tile_step_size=tile_step_size)
    refiner, features = load_refiner(refiner_json, network, predictor)
    cls, margin, block, roi_mode = features["target_class"], features["margin"], features["block"], features["roi"]
    ending = predictor.dataset_json["file_ending"]
    cases, gts = _image_cases(predictor, images_dir, gt_dir, "ground-truth")
    rw = predictor.plans_manager.image_reader_writer_class()
    dtype = np.uint8 if predictor.label_manager.num_segmentation_heads < 255 else np.uint16
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case, files in tqdm(sorted(cases.items()), desc="refine apply: cases"):
        m = case_maps(predictor, network, block, files, case, cls, margin, roi_mode, tile_step_size)
        gt = _read_label(gts[case], m.seg.shape) if gts is not None else None
        probs, seg = refine_probabilities(refiner, m, cls)
        roi = np.array([[s.start, s.stop] for s in m.roi], dtype=np.int64) if m.roi is not None \
            else np.zeros((0, 2), np.int64)
        save_npz(out_dir / f"{case}.npz", probabilities=probs.astype(np.float32), roi=roi)
        write_segmentation(rw, seg.astype(dtype), out_dir / f"{case}{ending}", m.props)
        if gt is not None:
            rows.append(effect_row(case, m.seg == cls, seg == cls, gt == cls, m.props["spacing"],
                                   0 if m.roi is None else int(m.seg[m.roi].size)))
    if gts is None:
        return None
    table = pd.DataFrame(rows, columns=EFFECT_COLUMNS)
    means = table.drop(columns="case").mean(numeric_only=True)
    table = pd.concat([table, pd.DataFrame([{"case": "mean", **means.to_dict()}])], ignore_index=True)
    with atomic_path(out_dir / "refinement_effect.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table
