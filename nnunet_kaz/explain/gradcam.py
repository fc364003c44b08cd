"""Layer-wise Seg-Grad-CAM for every block of a segmentation network, from ONE backward pass per target.

Definitions (paper 000 section 2.2; paper 001 eq. 1; Selvaraju et al. 2017; Vinogradova et al. 2020 Seg-Grad-CAM):
- target y^c = sum over the voxels of a mask M of class c's logit (the network's raw output, before softmax);
  M is the predicted class-c region (argmax == c) unless a mask (e.g. the ground truth) is given;
- channel weights w_k^c = (1 / N) sum_u d y^c / d A_k(u), the spatial mean of the gradient over the N voxels of
  the layer's feature map A (paper 001 eq. 1);
- heatmap = ReLU(sum_k w_k^c A_k), upsampled to the input's size with (bi/tri)linear interpolation
  (align_corners=False). Maps are raw (not normalised): comparable across targets of one layer, not across layers.
  An empty mask gives all-zero maps.
All requested layers are hooked at once and `torch.autograd.grad` takes the gradients of the target with respect to
all of their outputs in a single backward pass (pytorch-grad-cam needs one forward + backward per layer for
separate maps). Given the plans' patch size, images are explained tile by tile on nnU-Net's sliding-window grid
(padded to the patch as nnU-Net pads, so any image size works) and the tile maps stitched with nnU-Net's Gaussian.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from nnunet_kaz.errors import KazError

Target = tuple[int, "torch.Tensor | None"]  # (class channel, mask over the input's spatial axes or None)


def network_dim(network: nn.Module) -> int:
    """Spatial dimensionality (2 or 3) of a network: that of its first convolution."""
    for m in network.modules():
        if isinstance(m, _ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            return convert_conv_op_to_dim(type(m))
    raise KazError(f"{type(network).__name__} has no convolution: cannot explain it with Grad-CAM")


def list_blocks(network: nn.Module) -> list[str]:
    """Module names of every convolutional block, in forward order.

    XBoundNet++: its `named_blocks()` (stem, encoder stages, bridge, attention gates, decoder blocks, head).
    dynamic-network-architectures U-Nets (PlainConvUNet, ResidualEncoderUNet): the encoder stem (if separate),
    every encoder stage, every decoder stage and the full-resolution segmentation layer. Other networks: every
    convolution module.
    """
    if hasattr(network, "named_blocks"):
        return list(network.named_blocks())
    encoder, decoder = getattr(network, "encoder", None), getattr(network, "decoder", None)
    if encoder is not None and decoder is not None and hasattr(encoder, "stages") and hasattr(decoder, "stages"):
        names = ["encoder.stem"] if getattr(encoder, "stem", None) is not None else []
        names += [f"encoder.stages.{i}" for i in range(len(encoder.stages))]
        names += [f"decoder.stages.{j}" for j in range(len(decoder.stages))]
        if hasattr(decoder, "seg_layers"):
            names.append(f"decoder.seg_layers.{len(decoder.seg_layers) - 1}")
        return names
    return [name for name, m in network.named_modules() if isinstance(m, _ConvNd)]


def resolve_layers(network: nn.Module, layers: str | Sequence[str] | None = "all") -> list[str]:
    """`"all"` / None -> `list_blocks(network)`; otherwise the given module names, checked.

    Any submodule name (`network.named_modules()`) is accepted; an unknown one raises KazError listing the blocks.
    """
    blocks = list_blocks(network)
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return blocks
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    known = dict(network.named_modules())
    unknown = [name for name in layers if name not in known or name == ""]
    if unknown:
        raise KazError(f"unknown layer name(s) {unknown} for {type(network).__name__}; valid blocks: "
                       f"{', '.join(blocks)} (or 'all', or any submodule name)")
    if not layers:
        raise KazError(f"no layer given; valid blocks: {', '.join(blocks)}")
    return list(layers)


class LayerGradCAM:
    """Seg-Grad-CAM for several layers at once (module docstring for the definitions).

    Usage: `maps = LayerGradCAM(net, ["encoder.stages.0", "bridge"])(x, [(1, None)])[0]` gives, for target class 1
    over its predicted region, one (B, *spatial) map per layer. Hooks live only during the call; the network's
    train/eval mode is left as it is (call `.eval()` first for deterministic maps).
    """

    def __init__(self, network: nn.Module, layers: str | Sequence[str] | None = "all"):
        self.network = network
        self.layers = resolve_layers(network, layers)
        self.dim = network_dim(network)

    @contextmanager
    def _hooked(self) -> Iterator[dict[str, torch.Tensor]]:
        acts: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(name: str):
            def hook(module, inputs, output):
                if not isinstance(output, torch.Tensor):
                    raise KazError(f"layer {name} returns {type(output).__name__}, not a tensor: pick a block")
                acts[name] = output
                # later in-place ops (e.g. LeakyReLU(inplace=True)) act on the clone, not on the kept activation
                return output.clone()
            return hook

        for name in self.layers:
            handles.append(self.network.get_submodule(name).register_forward_hook(make_hook(name)))
        try:
            yield acts
        finally:
            for h in handles:
                h.remove()

    def __call__(self, x: torch.Tensor, targets: Sequence[Target]) -> tuple[list[dict[str, torch.Tensor]],
                                                                            torch.Tensor]:
        """Maps for each (class, mask) target: a list (one per target) of {layer: (B, *spatial) tensor}, and the
        logits (B, C, *spatial). A mask is (*spatial) or (B, *spatial), bool or 0/1; None = predicted region."""
        if x.ndim != self.dim + 2:
            raise KazError(f"the network is {self.dim}D but the input has shape {tuple(x.shape)} "
                           f"(expected (B, C, {', '.join('xyz'[:self.dim])}))")
        spatial = tuple(x.shape[2:])
        mode = "bilinear" if self.dim == 2 else "trilinear"
        with torch.enable_grad(), self._hooked() as acts:
            out = self.network(x)
            logits = out[0] if isinstance(out, (list, tuple)) else out
            missing = [n for n in self.layers if n not in acts]
            if missing:
                raise KazError(f"layer(s) {missing} did not run in the forward pass of {type(self.network).__name__}")
            names = [n for n in self.layers if acts[n].requires_grad]
            results = []
            for t, (cls, mask) in enumerate(targets):
                if not 0 <= cls < logits.shape[1]:
                    raise KazError(f"target class {cls} out of range: the network has {logits.shape[1]} outputs")
                if mask is None:
                    mask = logits.argmax(1) == cls
                mask = torch.as_tensor(mask, device=logits.device).to(logits.dtype)
                if mask.shape[-self.dim:] != logits.shape[2:]:
                    raise KazError(f"target mask shape {tuple(mask.shape)} does not match the image {spatial}")
                score = (logits[:, cls] * mask).sum()
                grads = torch.autograd.grad(score, [acts[n] for n in names], retain_graph=t < len(targets) - 1,
                                            allow_unused=True) if score.requires_grad else [None] * len(names)
                grads = dict(zip(names, grads))
                maps = {}
                for name in self.layers:
                    a, g = acts[name].detach(), grads.get(name)
                    if g is None:  # layer does not influence the target (e.g. an unused deep-supervision head)
                        cam = a.new_zeros((a.shape[0], *a.shape[2:]))
                    else:
                        w = g.mean(dim=tuple(range(2, g.ndim)), keepdim=True)
                        cam = F.relu((w * a).sum(1))
                    if tuple(cam.shape[1:]) != spatial:
                        cam = F.interpolate(cam[:, None], size=spatial, mode=mode, align_corners=False)[:, 0]
                    maps[name] = cam
                results.append(maps)
        return results, logits.detach()


def _as_batch(image: torch.Tensor | np.ndarray, dim: int) -> torch.Tensor:
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    if image.ndim == dim + 1:
        image = image[None]
    if image.ndim != dim + 2 or image.shape[0] != 1:
        raise KazError(f"the network is {dim}D: expected an image of shape (C, {', '.join('xyz'[:dim])}), got "
                       f"{tuple(image.shape)}")
    return image


def sliding_window_gradcam(network: nn.Module, image: torch.Tensor, layers: Sequence[str],
                           targets: Sequence[Target], patch_size: Sequence[int], tile_step_size: float = 0.5,
                           device: torch.device | str | None = None, progress: bool = False
                           ) -> list[dict[str, np.ndarray]]:
    """Grad-CAM per tile of nnU-Net's sliding-window grid, stitched with nnU-Net's Gaussian weights
    (`nnunet_kaz.inference.tiling.stitch_tiles`, the predictor's tiling).

    image: (1, C, *spatial) of any size; masks in `targets` cover the whole image (None = each tile's own
    predicted region). The image is zero-padded to at least the patch size as nnU-Net pads (so the network always
    sees its patch size: an image smaller than the patch in some axis works) and the padding is cropped off
    again; the masks are padded with it (as extra channels of the tiled array). Each stitched map is
    sum_t g_t * map_t / sum_t g_t over the tiles t covering a voxel (g: Gaussian, sigma 1/8 of the tile). Tiles go
    to the network's device and dtype (`device` is accepted for compatibility and must be the network's).
    Returns one {layer: (*spatial) float32 array} per target.
    """
    from nnunet_kaz.inference.tiling import stitch_tiles

    cam = LayerGradCAM(network, layers)
    image = torch.as_tensor(image).float()
    spatial = tuple(image.shape[2:])
    channels = [image[0]]
    with_mask = []
    for _, mask in targets:
        if mask is not None:
            mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            if tuple(mask.shape) != spatial:
                raise KazError(f"target mask shape {tuple(mask.shape)} does not match the image {spatial}")
            channels.append(mask[None].float())
        with_mask.append(mask is not None)
    n_in = image.shape[1]

    def tile_maps(tile: torch.Tensor) -> torch.Tensor:
        masks = iter(range(n_in, tile.shape[1]))
        tile_targets = [(cls, tile[0, next(masks)] > 0.5 if has else None)
                        for (cls, _), has in zip(targets, with_mask)]
        results, _ = cam(tile[:, :n_in], tile_targets)
        return torch.stack([maps[n][0].detach() for maps in results for n in cam.layers])

    stitched = stitch_tiles(tile_maps, torch.cat(channels), patch_size, tile_step_size, network,
                            progress="Grad-CAM tiles" if progress else None).numpy()
    n = len(cam.layers)
    return [{name: stitched[t * n + i].astype(np.float32) for i, name in enumerate(cam.layers)}
            for t in range(len(targets))]


def explain_case(network: nn.Module, image_tensor: torch.Tensor | np.ndarray, layers: str | Sequence[str] = "all",
                 target_mask: np.ndarray | torch.Tensor | None = None, target_class: int = 1,
                 patch_size: Sequence[int] | None = None, tile_step_size: float = 0.5,
                 device: torch.device | str = "cpu", progress: bool = False) -> dict[str, np.ndarray]:
    """Layer-wise Grad-CAM maps of one preprocessed case: {layer name: (*spatial) float32 array >= 0}.

    image_tensor: (C, *spatial) (or (1, C, *spatial)) as the network sees it (nnU-Net-preprocessed).
    target_mask: (*spatial) region whose `target_class` logits are summed (e.g. the ground truth); None = the
    predicted `target_class` region. patch_size: the plans' patch size; when given, the case is explained on
    nnU-Net's sliding window (`sliding_window_gradcam`: padded to the patch, tiled, Gaussian-stitched), so images
    of any size, smaller or larger than the patch, work; without it, in one pass at its own size. The network is
    put in eval mode (dropout off) for the call and its deep supervision is switched off; both are restored.
    """
    dim = network_dim(network)
    image = _as_batch(image_tensor, dim)
    names = resolve_layers(network, layers)
    decoder = getattr(network, "decoder", None)
    ds = getattr(decoder, "deep_supervision", None)
    was_training = network.training
    network.eval()
    if ds is not None:
        decoder.deep_supervision = False
    try:
        if patch_size is not None:
            return sliding_window_gradcam(network, image, names, [(target_class, target_mask)], patch_size,
                                          tile_step_size, progress=progress)[0]
        from nnunet_kaz.inference.tiling import network_placement

        net_device, net_dtype = network_placement(network)
        mask = None
        if target_mask is not None:
            mask = torch.as_tensor(np.asarray(target_mask) if not isinstance(target_mask, torch.Tensor)
                                   else target_mask).to(net_device)
        results, _ = LayerGradCAM(network, names)(image.to(net_device, net_dtype), [(target_class, mask)])
        return {n: m[0].cpu().numpy().astype(np.float32) for n, m in results[0].items()}
    finally:
        if ds is not None:
            decoder.deep_supervision = ds
        network.train(was_training)


def save_maps_npz(maps: Mapping[str, np.ndarray], path) -> None:
    """All maps of a case in one compressed npz (keys = layer names), written atomically."""
    from nnunet_kaz.io_utils import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v, dtype=np.float32) for k, v in maps.items()})
