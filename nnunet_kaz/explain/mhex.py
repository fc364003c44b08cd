"""MHEX+ explanations (paper 003 sections 3.3-3.5, Table 1): equivalent-kernel CAMs, collaboration-gradient
uncertainty, deep-ensemble variance / entropy maps, and the agreement between two uncertainty maps."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from nnunet_kaz.errors import KazError
from nnunet_kaz.networks.mhex import MHEXPlus


def _upsample(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, *s) -> (B, C, *size), (bi/tri)linear, align_corners=False."""
    if tuple(t.shape[2:]) == tuple(size):
        return t
    return F.interpolate(t, size=tuple(size), mode="bilinear" if t.ndim == 4 else "trilinear", align_corners=False)


def mhex_cams(model: MHEXPlus, x: torch.Tensor) -> list[np.ndarray]:
    """Equivalent-kernel class activation maps of every decoder stage (deepest first) from ONE forward pass,
    upsampled to the input: a list of (K, *spatial) float32 arrays for a (1, C, *spatial) input (paper 003 3.3)."""
    with torch.no_grad():
        model(x)
        cams = model.equivalent_cams()
    return [_upsample(c, x.shape[2:])[0].cpu().numpy().astype(np.float32) for c in cams]


def collaboration_uncertainty(model: MHEXPlus, x: torch.Tensor, target: torch.Tensor | np.ndarray | None = None,
                              eps: float = 1e-8) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Collaboration-gradient map of paper 003 section 3.5: U(i,j) = sum over adjacent head pairs (l, l+1) of
    cos(grad_l(i,j), grad_{l+1}(i,j)) = <g_l, g_{l+1}> / (|g_l| |g_{l+1}| + eps).

    Gradients: g_h = d(sum over pixels of head h's cross-entropy) / d X_l, taken for both heads of a pair with
    respect to the SAME tensor X_l, the input feature map of head l's Conv1 (C_l-vector per pixel of level l).
    The paper writes "with respect to the parameter C1": a per-pixel gradient with respect to a parameter needs one
    backward pass per pixel, and adjacent heads' Conv1 weights differ in shape, so we use Conv1's input, where head
    l's per-pixel loss gradient is exactly per-pixel (1x1 convolutions) and head l+1's arrives through the decoder.
    This costs one backward pass per head. Cross-entropy targets: `target` (label map over the input's spatial
    axes, e.g. the ground truth) or, by default, the model's full-resolution prediction; resampled to each head's
    resolution by nearest neighbour, as nnU-Net's deep-supervision targets.

    Returns {"pairs": per pair (deepest first) a (*spatial) cosine map upsampled to the input, "U": their sum
    (range [-(L-1), L-1]; high = heads agree)}. The model runs in eval mode with deep supervision on, restored after.
    """
    if len(model.heads) < 2:
        raise KazError("collaboration gradients need at least two MHEX+ heads (a network with >= 3 stages)")
    was_training, ds = model.training, model.decoder.deep_supervision
    model.eval()
    model.decoder.deep_supervision = True
    try:
        with torch.enable_grad():
            preds = model(x)[::-1]  # deepest first, like model.heads
            feats = list(model.stage_inputs)
            if target is None:
                target = preds[-1].argmax(1)
            target = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
            target = target.to(x.device).reshape(x.shape[0], *x.shape[2:]).float()
            grads = []  # grads[h] = (d L_h / d X_{h-1} or None, d L_h / d X_h)
            for h, p in enumerate(preds):
                t = F.interpolate(target[:, None], size=p.shape[2:], mode="nearest")[:, 0].long()
                loss = F.cross_entropy(p, t, reduction="sum")
                wrt = [feats[h - 1], feats[h]] if h > 0 else [feats[h]]
                g = torch.autograd.grad(loss, wrt, retain_graph=h < len(preds) - 1, allow_unused=True)
                grads.append((g[0] if h > 0 else None, g[-1]))
            pairs = []
            for l in range(len(preds) - 1):
                a, b = grads[l][1], grads[l + 1][0]
                if b is None:
                    b = torch.zeros_like(a)
                cos = (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True) + eps)
                pairs.append(_upsample(cos, x.shape[2:])[0, 0].cpu().numpy().astype(np.float32))
    finally:
        model.decoder.deep_supervision = ds
        model.train(was_training)
    return {"pairs": pairs, "U": np.sum(pairs, axis=0).astype(np.float32)}


def ensemble_variance(member_probs: np.ndarray, cls: int = 1) -> np.ndarray:
    """sigma^2(y=c|x) = (1/N) sum_m (P_m(y=c|x) - P(y=c|x))^2 over N members (paper 003 section 3.5).
    member_probs: (N, C, *spatial) softmax probabilities."""
    p = np.asarray(member_probs, dtype=np.float64)[:, cls]
    return p.var(axis=0)


def ensemble_entropy(member_probs: np.ndarray) -> np.ndarray:
    """H(y|x) = -sum_c P(y=c|x) log P(y=c|x) of the members' mean probabilities, natural log, 0 log 0 = 0
    (paper 003 section 3.5). member_probs: (N, C, *spatial)."""
    p = np.asarray(member_probs, dtype=np.float64).mean(axis=0)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=0)


def binarize(u: np.ndarray, threshold: str | float = "otsu") -> np.ndarray:
    """Uncertain region of a map: u > threshold; "otsu" = Otsu's threshold of the map's values (scikit-image),
    "mean" = the map's mean. A constant map has no uncertain region."""
    u = np.asarray(u, dtype=np.float64)
    if np.ptp(u) == 0:
        return np.zeros(u.shape, dtype=bool)
    if threshold == "otsu":
        from skimage.filters import threshold_otsu

        threshold = threshold_otsu(u)
    elif threshold == "mean":
        threshold = u.mean()
    return u > float(threshold)


def uncertainty_agreement(a: np.ndarray, b: np.ndarray, threshold: str | float = "otsu") -> dict[str, float]:
    """Agreement of two uncertainty maps as paper 003 Table 1: IoU and Dice of their uncertain regions (each map
    binarised by `binarize` with its own threshold; both empty -> 1.0) and Pearson's r of the raw values with its
    two-sided p-value (scipy; NaN when a map is constant)."""
    from scipy.stats import pearsonr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise KazError(f"uncertainty maps differ in shape: {a.shape} vs {b.shape}")
    ma, mb = binarize(a, threshold), binarize(b, threshold)
    inter, total = np.count_nonzero(ma & mb), np.count_nonzero(ma) + np.count_nonzero(mb)
    union = total - inter
    iou = inter / union if union else 1.0
    dice = 2 * inter / total if total else 1.0
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        r, p = float("nan"), float("nan")
    else:
        r, p = pearsonr(a.ravel(), b.ravel())
    return {"iou": float(iou), "dice": float(dice), "pearson": float(r), "p_value": float(p)}
