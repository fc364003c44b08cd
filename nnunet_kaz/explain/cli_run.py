"""Glue between a trained member (loaded and preprocessed as the predictor does) and layer-wise Grad-CAM."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nnunet_kaz.errors import KazError
from nnunet_kaz.input_checks import check_case_files


def _case_name(image: Path, ending: str) -> str:
    name = image.name
    if not name.endswith(ending) or not name[: -len(ending)].endswith("_0000"):
        raise KazError(f"{image}: expected nnU-Net naming CASE_0000{ending}")
    return name[: -len(ending) - 5]


def explain_images(images: Sequence[Path], member_spec: str, out_dir: Path, layers: Sequence[str] = ("all",),
                   target: str = "pred", gt: Path | None = None, target_class: int = 1,
                   device: str = "cpu") -> list[Path]:
    """Grad-CAM of every requested block for each image; returns the grid PNGs written."""
    from nnunet_kaz.explain.figures import save_gradcam_grid
    from nnunet_kaz.explain.gradcam import explain_case, resolve_layers, save_maps_npz
    from nnunet_kaz.inference import UncertaintyPredictor, parse_member
    from nnunet_kaz.inference.export import GeometryRestorer, write_map

    member = parse_member(member_spec)
    member.checkpoints = member.checkpoints[:1]
    predictor = UncertaintyPredictor([member], device=device, verbose=False)
    network = next(iter(predictor._networks.values()))
    network.load_state_dict(predictor.models[0].weights)
    names = resolve_layers(network, list(layers) if list(layers) != ["all"] else "all")  # lists valid names
    ending = predictor.dataset_json["file_ending"]
    three_d = len(predictor.configuration_manager.patch_size) == 3
    if target == "gt" and gt is None:
        raise KazError("--target gt needs --gt (a ground-truth folder or file)")
    jobs = []
    for image in map(Path, images):
        if not image.is_file():
            raise KazError(f"image {image} not found")
        case = _case_name(image, ending)
        check_case_files([image])  # a truncated image fails before the output folder is made
        gt_file = None
        if target == "gt":
            gt_file = Path(gt) / f"{case}{ending}" if Path(gt).is_dir() else Path(gt)
            if not gt_file.is_file():
                raise KazError(f"ground truth {gt_file} not found for {image}")
        jobs.append((image, case, gt_file))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image, case, gt_file in jobs:
        data, seg, props = _preprocess(predictor, image, gt_file)
        if three_d and data.shape[1] == 1:
            raise KazError(f"{member.folder.name} is a 3D model ({member.configuration}); {image} is a 2D image")
        mask = None if seg is None else (seg[0] == target_class)
        if not three_d:  # 2D network: explain the slice with the most target (or the middle one)
            index = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1))) if mask is not None and mask.any() \
                else data.shape[1] // 2
            tensor, mask = data[:, index], (None if mask is None else mask[index])
        else:
            tensor = data
        maps = explain_case(network, tensor, names, None if mask is None else torch.from_numpy(mask),
                            target_class, predictor.configuration_manager.patch_size, device=device)
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


def _preprocess(predictor, image: Path, gt_file: Path | None):
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    try:
        data, seg, props = preprocessor.run_case([str(image)], None if gt_file is None else str(gt_file),
                                                 predictor.plans_manager, predictor.configuration_manager,
                                                 predictor.dataset_json)
    except Exception as e:
        raise KazError(f"cannot read or preprocess {image}: {type(e).__name__}: {e}") from None
    seg = None if gt_file is None else np.asarray(seg)
    return torch.from_numpy(np.asarray(data, dtype=np.float32)), seg, props
