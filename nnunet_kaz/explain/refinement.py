"""Heatmap-guided probability refinement (ERNet, paper 001 section 3.2.4, Algorithm 3), restricted to a region of
interest so that nothing outside it ever changes.

Definitions:
- per-voxel features (p, h): p = the class probability (softmax), h = the Seg-Grad-CAM heatmap weight of that
  class (paper 001 eq. 1-2: the heatmap inside the class mask, 0 elsewhere) scaled to [0, 1] per case by its
  maximum (`heatmap_feature`), because raw Grad-CAM magnitudes vary between cases;
- ROI = bounding box of the predicted foreground enlarged by `margin` voxels per axis and clipped to the image
  (`roi_from_mask`), standing in for ERNet's Mask R-CNN boxes; an empty prediction has no ROI (nothing refined);
- the 2-5-1 network of Algorithm 3: Z = W [p, h]^T + B, X = sigmoid(Z), y = w X + b (linear output), trained by
  full-batch gradient descent on Loss = sum (Y - y)^2 / 2 with the literal updates of lines 10-15, parameters
  initialised U[0, 1) (Rand: W, B, w, b drawn in that order) from `seed`, 1000 iterations. By default
  (`reduction="sum"`, learning rate 0.01) this is Algorithm 3 verbatim: the gradients are summed over the N RoI
  voxels, so the step grows with N and gradient descent diverges once 0.01 N is more than a few (a few hundred
  voxels): the fit then stops with an error naming the faster variant. `reduction="mean"` (`refine fit
  --gradients mean`, ours, not the paper's) divides the gradients by N and uses learning rate 0.5 (with averaged
  gradients 0.01 barely moves in 1000 iterations; 0.3-0.5 converged on every seed we tried, 1.0 starts to
  oscillate);
- the refined probability is y clipped to [0, 1]; voxels outside the ROI keep their input value bit for bit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import write_json_atomic

FORMAT = "nnunet_kaz.heatmap_refiner"


def roi_from_mask(mask: np.ndarray, margin: int | Sequence[int] = 5) -> tuple[slice, ...] | None:
    """Bounding box of `mask != 0` enlarged by `margin` voxels on each side (per axis if a sequence), clipped to
    the array; None when the mask is empty."""
    mask = np.asarray(mask)
    if not mask.any():
        return None
    margins = [int(margin)] * mask.ndim if np.isscalar(margin) else [int(m) for m in margin]
    if len(margins) != mask.ndim or min(margins) < 0:
        raise KazError(f"margin must be >= 0 and give one value per axis ({mask.ndim}), got {margin}")
    slices = []
    for axis, m in enumerate(margins):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(0, idx[0] - m), min(mask.shape[axis], idx[-1] + 1 + m)))
    return tuple(slices)


def heatmap_feature(heatmap: np.ndarray, class_mask: np.ndarray | None = None) -> np.ndarray:
    """h of paper 001 eq. 2 scaled to [0, 1]: the heatmap inside `class_mask` (all of it when None), 0 outside,
    divided by its maximum (an all-zero heatmap stays 0).

    Use the same kind of mask when fitting and when applying: at test time only the prediction exists, so fitting
    with the prediction too (not the ground truth) avoids teaching the network that h > 0 means foreground."""
    h = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    if class_mask is not None:
        h = np.where(np.asarray(class_mask) != 0, h, 0.0)
    peak = h.max() if h.size else 0.0
    return h / peak if peak > 0 else h


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # paper 001 eq. 3, overflow-free


REDUCTIONS = {"sum": 0.01, "mean": 0.5}  # gradient reduction -> its default learning rate (module docstring)


class HeatmapRefiner:
    """ERNet's 2-5-1 probability-resetting network (paper 001 Algorithm 3) with scikit-learn's fit / transform and a
    JSON form. X is (N, 2) = (probability, heatmap weight) per voxel, y is (N,) in {0, 1}. Defaults are Algorithm
    3's: 5 sigmoid hidden units, U[0, 1) initialisation, learning rate 0.01 on gradients summed over the voxels,
    1000 iterations; `reduction="mean"` is the faster variant (learning rate 0.5 on mean gradients)."""

    def __init__(self, n_hidden: int = 5, learning_rate: float | None = None, iterations: int = 1000,
                 reduction: str = "sum", seed: int = 0, max_voxels: int = 200_000):
        if reduction not in REDUCTIONS:
            raise KazError(f"the gradient reduction (reduction) must be one of {tuple(REDUCTIONS)}, got {reduction!r}",
                           option="reduction")
        learning_rate = REDUCTIONS[reduction] if learning_rate is None else learning_rate
        if not learning_rate > 0 or int(iterations) < 1:
            raise KazError(f"need a learning rate > 0 and >= 1 iterations, got {learning_rate} and {iterations}")
        self.n_hidden, self.learning_rate, self.iterations = int(n_hidden), float(learning_rate), int(iterations)
        self.reduction, self.seed, self.max_voxels = reduction, int(seed), int(max_voxels)
        self.W = self.B = self.w = self.b = None
        self.loss_history: list[float] = []

    def initial_parameters(self) -> dict[str, np.ndarray]:
        """Algorithm 3 lines 2-3: W (H, 2), B (H, 1), w (1, H), b (1, 1), all Rand = U[0, 1) from `seed`."""
        rng = np.random.default_rng(self.seed)
        return {"W": rng.random((self.n_hidden, 2)), "B": rng.random((self.n_hidden, 1)),
                "w": rng.random((1, self.n_hidden)), "b": rng.random((1, 1))}

    @staticmethod
    def _check_X(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != 2:
            raise KazError(f"features must be (N, 2) = (probability, heatmap weight), got shape {X.shape}")
        return X

    def fit(self, X: np.ndarray, y: np.ndarray) -> "HeatmapRefiner":
        """Algorithm 3 lines 5-16 on the voxels (a seeded subsample of `max_voxels` when there are more)."""
        X, y = self._check_X(X), np.asarray(y, dtype=np.float64).reshape(-1)
        if len(X) != len(y) or len(X) == 0:
            raise KazError(f"need as many labels as feature rows (> 0), got {len(X)} features and {len(y)} labels")
        if len(X) > self.max_voxels:
            keep = np.random.default_rng(self.seed + 1).choice(len(X), self.max_voxels, replace=False)
            X, y = X[keep], y[keep]
        p = self.initial_parameters()
        W, B, w, b = p["W"], p["B"], p["w"], p["b"]
        inp, Y = X.T, y[None]  # (2, N), (1, N): one column per voxel, as in the algorithm
        scale = 1.0 / len(y) if self.reduction == "mean" else 1.0
        self.loss_history = []
        with np.errstate(over="ignore", invalid="ignore"):
            for it in range(self.iterations):
                Z = W @ inp + B                                     # line 6
                Xh = _sigmoid(Z)                                    # line 7
                out = w @ Xh + b                                    # line 8
                self.loss_history.append(float(((Y - out) ** 2).sum() / 2 * scale))  # line 9
                if not math.isfinite(self.loss_history[-1]):
                    self._diverged(it, len(y))
                dy = out - Y                                        # line 10
                dh = (w.T @ dy) * Xh * (1 - Xh)                     # line 11, Derivative(Z) = s(Z)(1 - s(Z)), eq. 4
                lr = self.learning_rate * scale
                W, w = W - lr * dh @ inp.T, w - lr * dy @ Xh.T      # lines 12-13
                B, b = B - lr * dh.sum(1, keepdims=True), b - lr * dy.sum(1, keepdims=True)  # lines 14-15
        if not all(np.isfinite(a).all() for a in (W, B, w, b)):
            self._diverged(self.iterations, len(y))
        self.W, self.B, self.w, self.b = W, B, w, b
        return self

    def _diverged(self, iteration: int, n: int) -> None:
        what = (f"Algorithm 3's gradient descent (learning rate {self.learning_rate:g} on gradients summed over "
                f"{n} voxels, a step of {self.learning_rate * n:.3g} x the mean gradient)"
                if self.reduction == "sum" else
                f"gradient descent (learning rate {self.learning_rate:g} on mean gradients)")
        raise KazError(f"{what} diverged after {iteration} iterations; use the faster variant, mean gradients with "
                       f"learning rate 0.5 (reduction), or a smaller learning rate", option="reduction")

    def _check_fitted(self) -> None:
        if self.W is None:
            raise KazError("the heatmap refiner is not fitted: call fit() or load a JSON file")

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Refined probabilities clip(w sigmoid(W x + B) + b, 0, 1) for (N, 2) features: (N,)."""
        self._check_fitted()
        X = self._check_X(X)
        return np.clip((self.w @ _sigmoid(self.W @ X.T + self.B) + self.b)[0], 0.0, 1.0)

    def refine(self, probability: np.ndarray, heat: np.ndarray, roi: tuple[slice, ...] | None) -> np.ndarray:
        """A copy of a class-probability map with the voxels inside `roi` replaced by `transform((p, h))`; `heat`
        is the `heatmap_feature` map. Outside the ROI (everything when roi is None) the input is kept unchanged."""
        probability = np.asarray(probability)
        if np.shape(heat) != probability.shape:
            raise KazError(f"probability map {probability.shape} and heatmap {np.shape(heat)} differ in shape")
        out = probability.copy()
        if roi is None:
            return out
        p, h = probability[roi], np.asarray(heat)[roi]
        out[roi] = self.transform(np.stack([p.ravel(), h.ravel()], 1)).reshape(p.shape).astype(out.dtype)
        return out

    def to_dict(self) -> dict:
        self._check_fitted()
        return {"format": FORMAT, "paper": "ERNet (paper 001) Algorithm 3",
                "hyperparameters": {"n_hidden": self.n_hidden, "learning_rate": self.learning_rate,
                                    "iterations": self.iterations, "reduction": self.reduction, "seed": self.seed,
                                    "max_voxels": self.max_voxels},
                "W": self.W.tolist(), "B": self.B.tolist(), "w": self.w.tolist(), "b": self.b.tolist(),
                "final_loss": self.loss_history[-1] if self.loss_history else None}

    @classmethod
    def from_dict(cls, d: dict, source: str = "refiner JSON") -> "HeatmapRefiner":
        if d.get("format") != FORMAT:
            raise KazError(f"{source} is not a heatmap-refiner file (format {d.get('format')!r}, expected {FORMAT})")
        try:
            r = cls(**d["hyperparameters"])
            r.W, r.B = np.asarray(d["W"], dtype=np.float64), np.asarray(d["B"], dtype=np.float64)
            r.w, r.b = np.asarray(d["w"], dtype=np.float64), np.asarray(d["b"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise KazError(f"{source} is malformed: {e}") from None
        if r.W.shape != (r.n_hidden, 2) or r.B.shape != (r.n_hidden, 1) or r.w.shape != (1, r.n_hidden) \
                or r.b.shape != (1, 1):
            raise KazError(f"{source}: parameter shapes do not match a 2-{r.n_hidden}-1 network")
        return r

    def save(self, path: str | Path) -> None:
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "HeatmapRefiner":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise KazError(f"cannot read heatmap refiner {path}: {e}") from None
        return cls.from_dict(d, str(path))


def pool_roi_features(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[slice, ...] | None]]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Pool (p, h) features and 0/1 labels of the ROI voxels of several cases, each given as
    (probability map, heatmap_feature map, binary label map, roi); cases without ROI contribute nothing."""
    feats, labels = [], []
    for prob, heat, label, roi in cases:
        if roi is None:
            continue
        feats.append(np.stack([np.asarray(prob)[roi].ravel(), np.asarray(heat)[roi].ravel()], 1))
        labels.append((np.asarray(label)[roi] != 0).ravel().astype(np.float64))
    if not feats:
        raise KazError("no case has a region of interest (every prediction is empty): nothing to fit")
    return np.concatenate(feats), np.concatenate(labels)
