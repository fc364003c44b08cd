"""Shared by `nnunet-kaz explain`, `mhex` and `refine`: what the network sees of a case, and per-tile maps
stitched over nnU-Net's sliding window (`nnunet_kaz.inference.tiling`, the predictor's own tiling).

Members are loaded by `nnunet_kaz.inference.load_member` and input images resolved by `nnunet_kaz.cases`;
both are re-exported here for the explain modules."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from nnunet_kaz.cases import resolve_images  # noqa: F401  (re-export)
from nnunet_kaz.inference.predictor import load_member  # noqa: F401  (re-export)


def tiled_maps(fn: Callable[[torch.Tensor], np.ndarray], image: torch.Tensor, patch_size: Sequence[int],
               tile_step_size: float = 0.5, network: torch.nn.Module | None = None) -> np.ndarray:
    """Apply `fn` to every tile (1, C, *patch) of nnU-Net's sliding window over `image` (C, *spatial), the tile
    on `network`'s device and dtype, and stitch its (M, *patch) outputs with nnU-Net's Gaussian weights:
    out = sum_t g_t f_t / sum_t g_t (`nnunet_kaz.inference.tiling.stitch_tiles`: padded to the patch as nnU-Net
    pads, the padding cropped off; a 2D patch on (C, Z, Y, X) tiles every slice). Returns (M, *spatial) float32."""
    from nnunet_kaz.inference.tiling import stitch_tiles

    return stitch_tiles(fn, image, patch_size, tile_step_size, network).numpy().astype(np.float32, copy=False)
