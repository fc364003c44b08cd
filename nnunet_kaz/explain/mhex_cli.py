"""`nnunet-kaz mhex`: MHEX+ equivalent-kernel CAMs and collaboration-gradient uncertainty of a member trained with
MHEX+ heads (paper 003 sections 3.3-3.5), and their agreement with an ensemble's entropy and variance (Table 1).

Definitions:
- CAM of decoder stage j (deepest first) for the target class c: sum_k W_equiv[c, k] X_j[k] (`mhex_cams`), signed,
  upsampled to the network input; the grid PNG shows its positive part (and the uncertainty maps from their
  minimum to their maximum), the npz keeps the signed maps.
- U = sum over adjacent head pairs of the cosine of their per-voxel loss gradients (`collaboration_uncertainty`,
  paper 003 section 3.5), in [-(L-1), L-1] for L heads. The paper names U "Uncertainty" but a high U means the
  heads' gradients agree; we also give the disagreement D = (L-1) - U >= 0 (high = uncertain) and report the
  agreement of both with the ensemble maps (Pearson's r of D is -r of U; IoU / Dice of the Otsu regions differ).
- Ensemble maps (`--ensemble` members and / or `--mc` dropout samples, streamed by the predictor): entropy of the
  mean probabilities H = -sum_c P_c ln P_c (`ensemble_entropy`) and the variance of class c's probability over the
  samples (`ensemble_variance`, population variance); with `--mc` alone the `-m` member itself is sampled.
- Agreement (`uncertainty_agreement`): IoU and Dice of the Otsu-thresholded maps and Pearson's r, computed on the
  network's grid (the preprocessed image: no resampling, no cropped-away border) over every voxel.
- Large images are processed tile by tile on nnU-Net's sliding-window grid and stitched with its Gaussian
  (`tiled_maps`); 2D configurations go slice by slice. The collaboration cross-entropy targets are each tile's own
  prediction. Maps in the npz are in the input image's geometry (`GeometryRestorer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_path

AGREEMENT_COLUMNS = ["case", "map", "reference", "iou", "dice", "pearson", "p_value", "n_samples"]


def _mhex_network(predictor, network):
    from nnunet_kaz.networks.mhex import MHEXPlus

    if not isinstance(network, MHEXPlus):
        trainer = predictor.models[0].member.trainer_name
        raise KazError(f"{predictor.members[0].folder.name} was trained with {trainer}, which has no MHEX+ heads; "
                       "train with XBoundNetTrainerMHEX or nnUNetTrainerMHEX (or their _debug / _demo variants)")
    return network


def mhex_tile_maps(model, tile: torch.Tensor, target_class: int) -> np.ndarray:
    """For one network input (1, C, *patch): the stages' CAMs of `target_class` (deepest first), the pairwise
    cosine maps, U and the full-resolution head's softmax probability of `target_class`: (2L + 1, *patch)."""
    from nnunet_kaz.explain.mhex import collaboration_uncertainty, mhex_cams

    cams = [c[target_class] for c in mhex_cams(model, tile)]
    collab = collaboration_uncertainty(model, tile)
    with torch.no_grad():
        prob = torch.softmax(model(tile), 1)[0, target_class].cpu().numpy()
    return np.stack([*cams, *collab["pairs"], collab["U"], prob])


def mhex_images(inputs: Sequence[Path], member_spec: str, out_dir: Path, ensemble: Sequence[str] = (), mc: int = 0,
                target_class: int = 1, device: str = "auto", tile_step_size: float = 0.5) -> list[Path]:
    """Write per case CASE_mhex.png and CASE_mhex.npz (and, with an ensemble, mhex_agreement.csv); returns the
    PNGs. Every input is checked before anything is written."""
    from nnunet_kaz.explain.figures import save_gradcam_grid
    from nnunet_kaz.cases import check_image_case, n_input_channels, resolve_images
    from nnunet_kaz.explain.loading import load_member, tiled_maps
    from nnunet_kaz.explain.mhex import ensemble_entropy, uncertainty_agreement
    from nnunet_kaz.explain.gradcam import save_maps_npz
    from nnunet_kaz.inference import UncertaintyPredictor, parse_member
    from nnunet_kaz.inference.export import GeometryRestorer, write_map
    from nnunet_kaz.inference.members import check_compatible

    predictor, network = load_member(member_spec, device, tile_step_size=tile_step_size)
    model = _mhex_network(predictor, network)
    n_heads = len(model.heads)
    if n_heads < 2:
        raise KazError("collaboration gradients need at least two MHEX+ heads (a network with >= 3 stages)")
    n_classes = predictor.label_manager.num_segmentation_heads
    if not 0 <= target_class < n_classes:
        raise KazError(f"target class {target_class} (target_class) out of range: the member has classes "
                       f"0..{n_classes - 1}", option="target_class")
    ens = None
    if ensemble or mc:
        members = [parse_member(s) for s in ensemble] if ensemble else [parse_member(member_spec)]
        check_compatible([predictor.members[0], *members])
        ens = UncertaintyPredictor(members, mc=mc, mirror=False, device=device, tile_step_size=tile_step_size,
                                   verbose=False)  # as the members' CAMs: no test-time mirroring
    cases = resolve_images(inputs, predictor.dataset_json)
    for case, files in cases.items():
        check_image_case(case, files, n_input_channels(predictor.dataset_json), member=predictor.input_spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    ending = predictor.dataset_json["file_ending"]
    patch = predictor.configuration_manager.patch_size
    rows, written = [], []
    for case, files in tqdm(sorted(cases.items()), desc="cases", disable=len(cases) < 2):
        data, props = predictor.preprocess(files)
        # a 2D patch on (C, Z, Y, X) tiles every slice; any size, smaller or larger than the patch
        maps = tiled_maps(lambda t: mhex_tile_maps(model, t, target_class), data, patch, tile_step_size, model)
        cams, pairs, u, prob = maps[:n_heads], maps[n_heads:2 * n_heads - 1], maps[2 * n_heads - 1], maps[-1]
        disagreement = (n_heads - 1) - u
        named = {**{f"cam_stage{j}": cams[j] for j in range(n_heads)},
                 **{f"collaboration_pair{j}": pairs[j] for j in range(n_heads - 1)},
                 "collaboration_U": u, "collaboration_disagreement": disagreement}
        panels = {f"stage {j} CAM{' (deepest)' if j == 0 else ''}": np.clip(cams[j], 0, None)
                  for j in range(n_heads)}
        panels["collab. disagreement D"] = disagreement
        if ens is not None:
            stats = ens.sample_case(data, case)
            named["ensemble_entropy"] = ensemble_entropy(stats.mean[None]).astype(np.float32)
            named["ensemble_variance"] = stats.variance[target_class].astype(np.float32)
            panels["ensemble entropy"], panels["ensemble variance"] = named["ensemble_entropy"], \
                named["ensemble_variance"]
            for map_name in ("collaboration_U", "collaboration_disagreement"):
                for ref in ("ensemble_entropy", "ensemble_variance"):
                    agree = uncertainty_agreement(named[map_name], named[ref])
                    rows.append({"case": case, "map": map_name, "reference": ref, **agree,
                                 "n_samples": stats.n_samples})
        for name in list(panels)[n_heads:]:  # uncertainty panels shown from their minimum to their maximum
            panels[name] = panels[name] - panels[name].min()
        grid = out_dir / f"{case}_mhex.png"
        save_gradcam_grid(data.numpy(), panels, grid, mask=prob > 0.5,
                          title=f"{case}: MHEX+ CAMs of class {target_class}, collaboration disagreement")
        restored = GeometryRestorer(predictor.plans_manager, predictor.configuration_manager, props).maps(
            np.stack(list(named.values())))
        save_maps_npz(dict(zip(named, restored)), out_dir / f"{case}_mhex.npz")
        if "sitk_stuff" in props:
            write_map(restored[list(named).index("collaboration_U")], out_dir / f"{case}_collaboration{ending}",
                      props)
        written.append(grid)
    if rows:
        table = pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)
        with atomic_path(out_dir / "mhex_agreement.csv") as tmp:
            table.to_csv(tmp, index=False)
        means = table.groupby(["map", "reference"])[["iou", "dice", "pearson"]].agg(["mean", "std"])
        print(f"agreement of the collaboration maps with the ensemble ({len(cases)} case(s)), paper 003 Table 1:")
        print(means.round(4).to_string())
    return written
