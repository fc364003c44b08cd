"""Probability calibrators fitted on pooled validation voxels, with scikit-learn's fit / transform and a JSON form.

Conventions:
- Inputs are softmax probabilities: per case (C, *spatial) with C >= 2 channels summing to 1, channel c
  belonging to the c-th class of `classes` (nnU-Net's order: label values sorted, channel = label value).
  Region-based (sigmoid) outputs, whose channels overlap, are refused.
- `fit(X, y, sample_weight)` takes pooled voxels: X (N, C) probabilities, y (N,) channel indices of the true
  class, weights (see pooling.VoxelPool: importance weights undo the class-stratified subsample).
  `transform(X)` maps (N, C) probabilities to calibrated ones; `apply_calibration` does it for a (C, *spatial)
  map. Outputs are clipped to [0, 1] and sum to 1 over channels.
- Binary models (C = 2) are calibrated on the foreground channel and the background gets 1 - q; multi-class
  models are calibrated one-vs-rest per channel and renormalised (logistic, platt, isotonic) or jointly (temperature).
- Probabilities are clipped to [EPS, 1 - EPS] before logits or logarithms are taken.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, logit, softmax
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import write_json_atomic
from nnunet_kaz.postprocessing.pooling import pool_cases

EPS = 1e-7
SUM_TOLERANCE = 1e-2  # softmax outputs stored as float32 (or float16) may sum to 1 +- a little
RANGE_TOLERANCE = 1e-5
CHUNK = 1 << 20  # voxels transformed at a time: bounds the temporaries for large 3D maps
FORMAT = "nnunet_kaz.calibrator"


# ----------------------------------------------------------------------------------------------- classes / labels
def classes_from_labels(labels: Mapping[str, Any]) -> list[dict]:
    """The channel order of a dataset.json `labels` dict: [{"name", "label"}] sorted by label value.

    The `ignore` label is not a channel. Region-based label sets (lists of labels) are refused."""
    out = []
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            raise KazError(f"label '{name}' is a region {list(value)}: region-based (sigmoid) models are not "
                           "supported by the calibrators")
        if int(value) < 0:
            raise KazError(f"label '{name}' has the negative value {value}")
        out.append({"name": str(name), "label": int(value)})
    return sorted(out, key=lambda c: c["label"])


def default_classes(n_channels: int) -> list[dict]:
    """Classes named by their channel index, for when no dataset.json is at hand."""
    return [{"name": str(c), "label": c} for c in range(n_channels)]


def _describe(classes: list[dict]) -> str:
    return ", ".join(f"{c['label']}={c['name']}" for c in classes)


def labels_to_channels(label_map: np.ndarray, classes: list[dict], ignore_label: int | None = None,
                       name: str = "label map") -> tuple[np.ndarray, np.ndarray | None]:
    """Integer label map -> (channel indices, ignore mask or None); unknown label values raise KazError."""
    values = np.unique(label_map) if label_map.size == 0 or label_map.min() < 0 or label_map.max() >= 1 << 16 \
        else np.flatnonzero(np.bincount(label_map.ravel()))  # bincount: much faster than unique on 3D maps
    known = {c["label"] for c in classes} | ({ignore_label} if ignore_label is not None else set())
    unknown = [int(v) for v in values if int(v) not in known]
    if unknown:
        raise KazError(f"{name} holds label values {unknown} that are not in the label set ({_describe(classes)})")
    lut = np.zeros(max(known) + 1, dtype=np.uint8 if len(classes) <= 255 else np.int32)
    for channel, c in enumerate(classes):
        lut[c["label"]] = channel
    channels = lut[label_map]  # label values are all known (>= 0) here
    ignore = None if ignore_label is None else label_map == ignore_label
    return channels, (ignore if ignore is not None and ignore.any() else None)


def check_probabilities(probabilities: np.ndarray, name: str = "probabilities", channel_axis: int = 0) -> np.ndarray:
    """Validate softmax probabilities (finite, within [0, 1], >= 2 channels summing to 1) and return them
    clipped to [0, 1] as float32; KazError names `name` otherwise."""
    p = np.asarray(probabilities)
    if p.ndim < 2 or p.shape[channel_axis] < 2:
        raise KazError(f"{name}: expected softmax probabilities with >= 2 channels, got shape {p.shape} "
                       "(single-channel or region-based sigmoid outputs are not supported)")
    if not np.issubdtype(p.dtype, np.floating):
        raise KazError(f"{name}: probabilities must be floating point, got {p.dtype}")
    lo, hi = float(p.min()), float(p.max())  # NaN propagates through min / max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise KazError(f"{name}: {int((~np.isfinite(p)).sum())} probabilities are NaN or infinite")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise KazError(f"{name}: probabilities must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}] "
                       "(logits instead of probabilities?)")
    worst = float(np.abs(p.sum(axis=channel_axis, dtype=np.float32) - 1.0).max())
    if worst > SUM_TOLERANCE:
        raise KazError(f"{name}: channels do not sum to 1 (off by up to {worst:.3g}); softmax probabilities are "
                       "expected (region-based sigmoid outputs are not supported)")
    if p.dtype == np.float32 and lo >= 0.0 and hi <= 1.0:
        return p  # no copy for the common case (large 3D maps)
    return np.clip(p, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------- calibrators
class Calibrator(TransformerMixin, BaseEstimator):
    """Base class: validation, JSON form, chunked transform. Subclasses implement `_fit` and `_transform`
    on float64 (N, C) arrays and `_params` / `_set_params` for the JSON form."""

    method: ClassVar[str] = ""

    def __init__(self, classes: list[dict] | None = None):
        self.classes = classes

    # --- sklearn interface
    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> "Calibrator":
        """Fit on pooled voxels: X (N, C) probabilities, y (N,) channel indices, optional weights (N,)."""
        X = check_probabilities(X, "calibration fit set", channel_axis=1).astype(np.float64)
        y = np.asarray(y).astype(np.int64)
        n, c = X.shape
        if y.shape != (n,) or (n and (y.min() < 0 or y.max() >= c)):
            raise KazError(f"calibration fit set: need {n} class indices in 0..{c - 1}")
        w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        classes = self.classes if self.classes is not None else default_classes(c)
        if len(classes) != c:
            raise KazError(f"the label set has {len(classes)} classes ({_describe(classes)}) but the probabilities "
                           f"have {c} channels")
        self.classes_ = [dict(k) for k in classes]
        self.n_channels_ = c
        self.fit_set_ = {"n_voxels": int(n), "n_voxels_per_class": np.bincount(y, minlength=c).tolist()}
        self.notes_: list[str] = []
        self._fit(X, y, w)
        return self

    def fit_cases(self, cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                  cap_per_class: int = 200_000, seed: int = 0) -> "Calibrator":
        """Fit on a stream of cases (probabilities (C, *spatial), channel indices (*spatial), ignore mask or
        None), pooled with a seeded class-stratified subsample (pooling.VoxelPool) one case at a time."""
        pool = pool_cases(cases, cap_per_class, seed)
        X, y, w = pool.sample()
        self.fit(X, y, w)
        self.fit_set_ = pool.summary()
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Calibrate (N, C) probabilities; float32 output in [0, 1], rows summing to 1."""
        self._check_fitted()
        X = check_probabilities(X, "probabilities to calibrate", channel_axis=1)
        self._check_channels(X.shape[1])
        return self._calibrate(X)

    def _calibrate(self, X: np.ndarray) -> np.ndarray:
        """`transform` without the input checks, chunked over voxels."""
        out = np.empty(X.shape, dtype=np.float32)
        for s in range(0, X.shape[0], CHUNK):
            out[s:s + CHUNK] = self._calibrate_rows(X[s:s + CHUNK])
        return out

    def _calibrate_rows(self, X: np.ndarray) -> np.ndarray:
        q = np.clip(self._transform(X.astype(np.float64)), 0.0, 1.0)
        return q / np.clip(q.sum(axis=1, keepdims=True), 1e-12, None)

    # --- helpers for subclasses
    def _check_fitted(self) -> None:
        if not hasattr(self, "n_channels_"):
            raise KazError(f"the {self.method} calibrator is not fitted")

    def _check_channels(self, c: int) -> None:
        if c != self.n_channels_:
            raise KazError(f"the calibrator was fitted for {self.n_channels_} classes ({_describe(self.classes_)}) "
                           f"but the probabilities have {c} channels")

    def _targets(self) -> list[int]:
        """Channels calibrated one-vs-rest: the foreground only for binary models, every channel otherwise."""
        return [1] if self.n_channels_ == 2 else list(range(self.n_channels_))

    @staticmethod
    def _complete(q: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Binary: background = 1 - foreground. (Multi-class rows are renormalised by `transform`.)"""
        if X.shape[1] == 2:
            q[:, 0] = 1.0 - q[:, 1]
        return q

    # --- JSON form
    def to_dict(self) -> dict:
        """method, parameters, classes, fit-set summary, package version (all plain JSON types)."""
        from nnunet_kaz import __version__

        self._check_fitted()
        return {"format": FORMAT, "method": self.method, "parameters": self._params(), "classes": self.classes_,
                "fit_set": self.fit_set_, "notes": list(self.notes_), "nnunet_kaz_version": __version__}

    def save(self, path: str | Path) -> None:
        """Write the JSON form to `path` (atomically); read it back with `load_calibrator`."""
        save_calibrator(self, path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibrator":
        obj = cls(classes=[dict(k) for k in d["classes"]])
        obj.classes_ = [dict(k) for k in d["classes"]]
        obj.n_channels_ = len(obj.classes_)
        obj.fit_set_ = dict(d.get("fit_set", {}))
        obj.notes_ = list(d.get("notes", []))
        obj._set_params(d["parameters"])
        return obj

    def _fit(self, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        raise NotImplementedError

    def _transform(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _params(self) -> dict:
        raise NotImplementedError

    def _set_params(self, params: Mapping[str, Any]) -> None:
        raise NotImplementedError


class LogisticCalibrator(Calibrator):
    """Paper 000's calibrator (section 2.3: "a one-dimensional logistic-regression calibrator" fitted on the
    pooled raw validation predictions), fitted as the authors' code fits it (AUTHORS_CODE.md): scikit-learn's
    `LogisticRegression(solver="liblinear")` with its default L2 penalty, C = 1, on the probability p itself
    as the single feature: q_c = sigmoid(a_c * p_c + b_c), weighted by the pooling's importance weights (which
    sum to the voxels seen, so C = 1 weighs against the whole validation set as in the authors' fit on every
    pixel). Binary: the foreground channel only, q_0 = 1 - q_1. Multi-class: one-vs-rest per channel, then
    q / sum(q). A channel whose class is absent (or everywhere) in the fit set keeps q_c = p_c, noted in
    `notes`. (Logistic regression on logit p is `PlattCalibrator`, method "platt".)"""

    method = "logistic"
    C: ClassVar[float] = 1.0

    def _fit(self, X, y, w):
        self.slopes_, self.intercepts_ = np.zeros(self.n_channels_), np.zeros(self.n_channels_)
        self.fitted_ = [False] * self.n_channels_
        for c in self._targets():
            target = (y == c).astype(int)
            if target.min() == target.max():
                self.notes_.append(f"class {self.classes_[c]['name']}: one outcome only in the fit set, identity")
                continue
            lr = LogisticRegression(solver="liblinear", C=self.C).fit(X[:, [c]], target, sample_weight=w)
            self.slopes_[c], self.intercepts_[c] = float(lr.coef_[0, 0]), float(lr.intercept_[0])
            self.fitted_[c] = True

    def _transform(self, X):
        q = X.copy()
        for c in np.flatnonzero(self.fitted_):
            q[:, c] = expit(X[:, c] * self.slopes_[c] + self.intercepts_[c])
        return self._complete(q, X)

    def _params(self):
        return {"feature": "p", "C": self.C, "slopes": self.slopes_.tolist(),
                "intercepts": self.intercepts_.tolist(), "fitted": [bool(f) for f in self.fitted_]}

    def _set_params(self, params):
        self.slopes_ = np.asarray(params["slopes"], dtype=np.float64)
        self.intercepts_ = np.asarray(params["intercepts"], dtype=np.float64)
        self.fitted_ = [bool(f) for f in params["fitted"]]


class PlattCalibrator(Calibrator):
    """Platt scaling on the logit of p (not paper 000's feature; see `LogisticCalibrator`):
    q_c = sigmoid(a_c * logit(p_c) + b_c), fitted by weighted maximum likelihood (unpenalised logistic
    regression) of 1[y = c] on logit(p_c); identity at a = 1, b = 0. Binary: the foreground channel only,
    q_0 = 1 - q_1. Multi-class: one-vs-rest per channel, then q / sum(q). A channel whose class is absent (or
    everywhere) in the fit set keeps the identity, noted in `notes`. Calibration files written as "logistic"
    before the paper's calibrator took that name (parameters without "feature") are read as this."""

    method = "platt"

    def _fit(self, X, y, w):
        self.slopes_, self.intercepts_ = np.ones(self.n_channels_), np.zeros(self.n_channels_)
        for c in self._targets():
            target = (y == c).astype(int)
            if target.min() == target.max():
                self.notes_.append(f"class {self.classes_[c]['name']}: one outcome only in the fit set, identity")
                continue
            z = logit(np.clip(X[:, c], EPS, 1 - EPS))[:, None]
            lr = LogisticRegression(C=np.inf, max_iter=1000).fit(z, target, sample_weight=w)
            self.slopes_[c], self.intercepts_[c] = float(lr.coef_[0, 0]), float(lr.intercept_[0])

    def _transform(self, X):
        z = logit(np.clip(X, EPS, 1 - EPS))
        return self._complete(expit(z * self.slopes_ + self.intercepts_), X)

    def _params(self):
        return {"slopes": self.slopes_.tolist(), "intercepts": self.intercepts_.tolist()}

    def _set_params(self, params):
        self.slopes_ = np.asarray(params["slopes"], dtype=np.float64)
        self.intercepts_ = np.asarray(params["intercepts"], dtype=np.float64)


class TemperatureCalibrator(Calibrator):
    """Temperature scaling (Guo et al. 2017): q = softmax(log(p) / T) with one T > 0 for all channels, fitted
    by minimising the weighted negative log-likelihood over log T in [-5, 5] (scipy's bounded scalar search).
    softmax(log p / T) = softmax(logits / T), so this equals scaling the network's logits. Binary:
    q_1 = sigmoid(logit(p_1) / T)."""

    method = "temperature"

    def _fit(self, X, y, w):
        logp = np.log(np.clip(X, EPS, 1.0))
        wn = w / w.sum()

        def nll(log_t: float) -> float:
            return float(-(wn * log_softmax(logp / np.exp(log_t), axis=1)[np.arange(len(y)), y]).sum())

        res = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-6})
        self.temperature_ = float(np.exp(res.x))

    def _transform(self, X):
        return softmax(np.log(np.clip(X, EPS, 1.0)) / self.temperature_, axis=1)

    def _params(self):
        return {"temperature": self.temperature_}

    def _set_params(self, params):
        self.temperature_ = float(params["temperature"])


class IsotonicCalibrator(Calibrator):
    """Isotonic regression (scikit-learn's IsotonicRegression, increasing, clipped to [0, 1]) of 1[y = c] on
    p_c, weighted; binary: foreground only, q_0 = 1 - q_1; multi-class: one-vs-rest, then q / sum(q) (voxels
    where every q_c is 0 keep their input probabilities). The JSON form stores the fitted step function's
    thresholds; transform interpolates them linearly with constant extension, as IsotonicRegression does."""

    method = "isotonic"

    def _fit(self, X, y, w):
        self.thresholds_ = {}
        for c in self._targets():
            target = (y == c).astype(np.float64)
            if target.min() == target.max():
                self.notes_.append(f"class {self.classes_[c]['name']}: one outcome only in the fit set, identity")
                self.thresholds_[c] = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
                continue
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(X[:, c], target, sample_weight=w)
            self.thresholds_[c] = (np.asarray(iso.X_thresholds_, np.float64), np.asarray(iso.y_thresholds_, np.float64))

    def _transform(self, X):
        q = X.copy()
        for c, (xt, yt) in self.thresholds_.items():
            q[:, c] = np.interp(X[:, c], xt, yt)
        if X.shape[1] > 2:
            empty = q.sum(axis=1) < 1e-12
            q[empty] = X[empty]
        return self._complete(q, X)

    def _params(self):
        return {"thresholds": {str(c): {"x": xt.tolist(), "y": yt.tolist()} for c, (xt, yt) in self.thresholds_.items()}}

    def _set_params(self, params):
        self.thresholds_ = {int(c): (np.asarray(v["x"], np.float64), np.asarray(v["y"], np.float64))
                            for c, v in params["thresholds"].items()}


CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.method: cls for cls in (LogisticCalibrator, PlattCalibrator, TemperatureCalibrator, IsotonicCalibrator)}


def make_calibrator(method: str, classes: list[dict] | None = None) -> Calibrator:
    """A new, unfitted calibrator of `method`: logistic (paper 000's, on p), platt (on logit p), temperature or
    isotonic."""
    if method not in CALIBRATORS:
        raise KazError(f"unknown calibration method '{method}' (choose from {', '.join(CALIBRATORS)})")
    return CALIBRATORS[method](classes=classes)


# ------------------------------------------------------------------------------------------------ files / maps
def save_calibrator(calibrator: Calibrator, path: str | Path) -> None:
    """Write the calibrator's JSON form (atomically)."""
    write_json_atomic(calibrator.to_dict(), path)


def load_calibrator(path: str | Path, labels: Mapping[str, Any] | list[dict] | None = None) -> Calibrator:
    """Read a calibrator written by `save_calibrator`. With `labels` (a dataset.json `labels` dict or a
    classes list), a calibrator fitted for another label set raises KazError."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KazError(f"cannot read calibration file {path}: {e}") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("method") not in CALIBRATORS:
        raise KazError(f"{path} is not a calibration file written by nnunet-kaz calibrate")
    method = d["method"]
    if method == "logistic" and isinstance(d.get("parameters"), dict) and "feature" not in d["parameters"]:
        method = "platt"  # written before "logistic" became paper 000's regression on p: it is Platt on logit p
        d = {**d, "method": method, "notes": [*d.get("notes", []), f"{path.name}: a 'logistic' calibrator on "
                                              "logit p (older nnunet-kaz), read as 'platt'"]}
    try:
        cal = CALIBRATORS[method].from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise KazError(f"calibration file {path} is incomplete or damaged ({e!r})") from e
    if labels is not None:
        expected = classes_from_labels(labels) if isinstance(labels, Mapping) else [dict(k) for k in labels]
        if expected != cal.classes_:
            raise KazError(f"calibration file {path} was fitted for the label set ({_describe(cal.classes_)}) "
                           f"but this dataset has ({_describe(expected)})")
    return cal


def apply_calibration(probabilities: np.ndarray, calibrator: Calibrator, name: str = "probabilities") -> np.ndarray:
    """Calibrate one case's (C, *spatial) softmax probabilities; float32 (C, *spatial) in [0, 1] summing to 1.

    KazError (naming `name`) for NaN, values outside [0, 1], channels not summing to 1, or a channel count
    other than the calibrator's label set."""
    calibrator._check_fitted()
    p = check_probabilities(probabilities, name)
    if p.shape[0] != calibrator.n_channels_:
        raise KazError(f"{name}: {p.shape[0]} channels, but the calibrator was fitted for {calibrator.n_channels_} "
                       f"classes ({_describe(calibrator.classes_)})")
    flat = p.reshape(p.shape[0], -1)
    out = np.empty(flat.shape, dtype=np.float32)
    for s in range(0, flat.shape[1], CHUNK):  # chunks keep the float64 temporaries small on 3D maps
        out[:, s:s + CHUNK] = calibrator._calibrate_rows(flat[:, s:s + CHUNK].T).T
    return out.reshape(p.shape)


def top_label_ece(X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None, n_bins: int = 15) -> float:
    """Expected calibration error of the most probable class (Guo et al. 2017): sum over `n_bins` equal-width
    confidence bins of (bin weight / total weight) * |accuracy - mean confidence|. X (N, C), y (N,) channel
    indices, optional weights (e.g. pooling's importance weights). A small local helper for summaries; the
    evaluation package holds the reference metrics."""
    X = np.asarray(X, dtype=np.float64)
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    conf = X.max(axis=1)
    correct = (X.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    bins = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    gap = np.abs(np.bincount(bins, w * correct, n_bins) - np.bincount(bins, w * conf, n_bins))
    return float(gap.sum() / w.sum())
