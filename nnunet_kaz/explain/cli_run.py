"""Glue between a trained member (loaded and preprocessed as the predictor does) and layer-wise Grad-CAM."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nnunet_kaz.errors import KazError


def explain_images(images: Sequence[Path], member_spec: str, out_dir: Path, layers: Sequence[str] = ("all",),
                   target: str = "pred", gt: Path | None = None, target_class: int = 1,
                   device: str = "auto", tile_step_size: float = 0.5) -> list[Path]:
    """Grad-CAM of every requested block for each image (of any size: explained on nnU-Net's sliding window);
    returns the grid PNGs written. Every input is checked before anything is written."""
    from nnunet_kaz.cases import check_image_case, n_input_channels, resolve_images
    from nnunet_kaz.explain.figures import save_gradcam_grid
    from nnunet_kaz.explain.gradcam import explain_case, resolve_layers, save_maps_npz
    from nnunet_kaz.inference import load_member
    from nnunet_kaz.inference.export import GeometryRestorer, write_map

    predictor, network = load_member(member_spec, device, tile_step_size=tile_step_size)
    names = resolve_layers(network, list(layers) if list(layers) != ["all"] else "all")  # lists valid names
    ending = predictor.dataset_json["file_ending"]
    three_d = len(predictor.configuration_manager.patch_size) == 3
    n_classes = predictor.label_manager.num_segmentation_heads
    if not 0 <= target_class < n_classes:
        raise KazError(f"target class {target_class} (target_class) out of range: the member has classes "
                       f"0..{n_classes - 1}", option="target_class")
    if target not in ("pred", "gt"):
        raise KazError(f"the target must be 'pred' or 'gt', got {target!r}")
    if target == "gt" and gt is None:
        raise KazError("a ground-truth target needs a ground-truth folder or file (gt)", option="gt")
    jobs = []
    for case, files in resolve_images(images, predictor.dataset_json).items():
        gt_file = None
        if target == "gt":
            gt_file = Path(gt) / f"{case}{ending}" if Path(gt).is_dir() else Path(gt)
            if not gt_file.is_file():
                raise KazError(f"ground truth {gt_file} not found for {files[0]}")
        # a truncated or colour image, or one the member's dimensionality does not take, fails before the
        # output folder is made
        check_image_case(case, files, n_input_channels(predictor.dataset_json), gt_file, predictor.input_spec)
        jobs.append((files, case, gt_file))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for files, case, gt_file in jobs:
        data, seg, props = _preprocess(predictor, files, gt_file)
        mask = None if seg is None else (seg[0] == target_class)
        if not three_d:  # 2D network: explain the slice with the most target (or the middle one)
            index = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1))) if mask is not None and mask.any() \
                else data.shape[1] // 2
            tensor, mask = data[:, index], (None if mask is None else mask[index])
        else:
            tensor = data
        maps = explain_case(network, tensor, names, None if mask is None else torch.from_numpy(mask),
                            target_class, predictor.configuration_manager.patch_size, tile_step_size)
        grid = out_dir / f"{case}_gradcam.png"
        save_gradcam_grid(tensor.numpy(), maps, grid, mask=mask, title=f"{case}: Grad-CAM of class {target_class} "
                          f"over the {'ground truth' if target == 'gt' else 'prediction'}")
        stacked = np.stack([maps[n] for n in names])
        if not three_d:  # back into the volume layout nnU-Net uses for 2D configurations
            full = np.zeros((len(names), *data.shape[1:]), np.float32)
            full[:, index] = stacked
            stacked = full
        restored = GeometryRestorer(predictor.plans_manager, predictor.configuration_manager, props).maps(stacked)
        save_maps_npz(dict(zip(names, restored)), out_dir / f"{case}_gradcam.npz")
        if "sitk_stuff" in props:
            for n, m in zip(names, restored):
                write_map(m, out_dir / f"{case}_gradcam_{n.replace('.', '_')}{ending}", props)
        written.append(grid)
    return written


def _preprocess(predictor, files: list[str], gt_file: Path | None):
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    try:
        data, seg, props = preprocessor.run_case(list(files), None if gt_file is None else str(gt_file),
                                                 predictor.plans_manager, predictor.configuration_manager,
                                                 predictor.dataset_json)
    except Exception as e:
        raise KazError(f"cannot read or preprocess {files}: {type(e).__name__}: {e}") from None
    seg = None if gt_file is None else np.asarray(seg)
    return torch.from_numpy(np.asarray(data, dtype=np.float32)), seg, props
