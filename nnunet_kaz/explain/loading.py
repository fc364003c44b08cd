"""Shared by `nnunet-kaz mhex` and `nnunet-kaz refine`: one trained member loaded the way the predictor loads it,
input images resolved with nnU-Net's naming, and per-tile maps stitched over nnU-Net's sliding-window grid."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from nnunet_kaz.errors import KazError


def load_member(spec: str, device: str = "cpu"):
    """(UncertaintyPredictor of the member's FIRST checkpoint, its network with those weights loaded).

    The network is rebuilt by the checkpoint's trainer class (`build_network_architecture`, deep supervision off),
    exactly as `nnunet-kaz predict` does, and put in eval mode. Label (softmax) datasets only: region-trained
    members are rejected."""
    from nnunet_kaz.inference import UncertaintyPredictor, parse_member

    member = parse_member(spec)
    member.checkpoints = member.checkpoints[:1]
    predictor = UncertaintyPredictor([member], device=device, verbose=False)
    if predictor.regions:
        raise KazError(f"{member.folder.name} was trained on regions (sigmoid outputs); this command needs a "
                       "label-based (softmax) dataset")
    network = next(iter(predictor._networks.values()))
    network.load_state_dict(predictor.models[0].weights)
    network.eval()
    return predictor, network


def resolve_images(inputs: Sequence[Path], dataset_json: dict) -> dict[str, list[str]]:
    """{case: channel files} from image files CASE_0000.ext (the other channels next to them) or folders of such
    files; every missing file is reported at once."""
    from nnunet_kaz.inference import list_cases

    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    cases: dict[str, list[str]] = {}
    problems = []
    for path in map(Path, inputs):
        if path.is_dir():
            cases.update(list_cases(path, dataset_json))
            continue
        name = path.name
        if not name.endswith(ending) or not name[: -len(ending)].endswith("_0000"):
            problems.append(f"{path}: expected a folder or nnU-Net naming CASE_0000{ending}")
            continue
        case = name[: -len(ending) - 5]
        files = [path.with_name(f"{case}_{i:04d}{ending}") for i in range(n_channels)]
        problems += [f"{f} not found" for f in files if not f.is_file()]
        cases[case] = [str(f) for f in files]
    if problems:
        raise KazError("bad input image(s):\n  " + "\n  ".join(problems))
    if not cases:
        raise KazError("no input images given")
    return cases


def network_views(predictor, data: torch.Tensor) -> list[tuple[tuple, torch.Tensor]]:
    """What the network sees of a preprocessed case (C, *spatial): for a 3D configuration the whole volume, for a
    2D one every slice along the first axis (nnU-Net's 2D layout (C, Z, Y, X)). A list of (index into the
    (*spatial) map, (C, *network spatial) tensor). A 2D image given to a 3D model is a KazError."""
    three_d = len(predictor.configuration_manager.patch_size) == 3
    if three_d:
        if data.shape[1] == 1:
            raise KazError(f"a 3D model ({predictor.members[0].configuration}) was given a 2D image "
                           f"(preprocessed shape {tuple(data.shape)})")
        return [((slice(None),) * (data.ndim - 1), data)]
    return [((z,), data[:, z]) for z in range(data.shape[1])]


def tiled_maps(fn: Callable[[torch.Tensor], np.ndarray], image: torch.Tensor, patch_size: Sequence[int],
               tile_step_size: float = 0.5) -> np.ndarray:
    """Apply `fn` to every tile of nnU-Net's sliding-window grid of `image` (C, *spatial) and stitch its
    (M, *patch) outputs with nnU-Net's Gaussian weights (sigma 1/8 of the tile): out = sum_t g_t f_t / sum_t g_t.

    The image is zero-padded to at least the patch size (as nnU-Net pads) and the padding cropped off again.
    Returns (M, *spatial) float32. Written here because nnU-Net's loop only stitches logits; this stitches any
    per-tile map (MHEX+ CAMs, collaboration maps) the same way."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    patch_size = tuple(int(p) for p in patch_size)
    data, revert = pad_nd_image(image, list(patch_size), "constant", {"value": 0}, True, None)
    shape = tuple(data.shape[1:])
    steps = compute_steps_for_sliding_window(shape, patch_size, tile_step_size)
    gaussian = compute_gaussian(patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu")).numpy()
    total, weight = None, np.zeros(shape, np.float32)
    for corner in np.stack(np.meshgrid(*steps, indexing="ij"), -1).reshape(-1, len(steps)):
        sl = tuple(slice(int(c), int(c) + p) for c, p in zip(corner, patch_size))
        out = np.asarray(fn(data[(slice(None), *sl)][None]), dtype=np.float32)
        if total is None:
            total = np.zeros((out.shape[0], *shape), np.float32)
        total[(slice(None), *sl)] += out * gaussian
        weight[sl] += gaussian
    return (total / weight)[(slice(None), *revert[1:])]
