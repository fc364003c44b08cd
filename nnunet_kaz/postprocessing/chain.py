"""The post-processing chain of paper 000 section 2.3, configurable and saved as JSON next to the predictions.

A chain is an ordered list of steps applied to one case's (C, *spatial) softmax probabilities (calibrate them
first with `apply_calibration`):
- optionally `resize` (before segmentation): Lanczos-4 resize of the probability map to `size` (the authors'
  notebook does this, against the paper; kept as an option for chains written that way);
- exactly one of `threshold` (binary: foreground where p_1 >= value, default 0.4 as in paper 000; several
  classes: foreground where 1 - p_0 >= value, labelled by the most probable foreground class) or `argmax`.
  Channel c becomes label value c (nnU-Net's label order);
- then mask steps in any order: `closing` (spacing-aware ball of `radius_mm`, optional hole filling;
  morphology.py), `largest_component` (per label, with the cyst rule; components.py), `fill_holes`,
  `minimum_size` (components smaller than `min_size` voxels removed) and `resize_mask` (Lanczos-4 on each
  label's indicator of the cleaned mask, then 0.5: "the cleaned final segmentation mask was then resized").

`PostprocessingChain.paper000()` is the paper's order: threshold 0.4 -> closing -> largest component with the
cyst rule -> hole filling -> minimum size -> resize of the cleaned mask (then `write_kaz_bmp`: 8-bit BMP).
`save` / `load` write and read `postprocessing.json`; a loaded chain gives identical outputs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from PIL import Image

from nnunet_kaz.errors import KazError
from nnunet_kaz.io_utils import atomic_path, write_json_atomic
from nnunet_kaz.postprocessing.calibration import check_probabilities
from nnunet_kaz.postprocessing.components import CYST_RULES, keep_largest_components, remove_small_components
from nnunet_kaz.postprocessing.lanczos import resize_lanczos4, resize_probabilities
from nnunet_kaz.postprocessing.morphology import close_labels

CHAIN_FILENAME = "postprocessing.json"
FORMAT = "nnunet_kaz.postprocessing"


@dataclass
class Step:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "probabilities" (before segmentation), "segment", "mask" (after)

    def to_dict(self) -> dict:
        return {"step": self.name, **asdict(self)}


@dataclass
class Resize(Step):
    """Lanczos-4 resize of the probability map (lanczos.py) to `size` (last len(size) axes)."""
    size: list[int] = field(default_factory=list)
    name: ClassVar[str] = "resize"
    kind: ClassVar[str] = "probabilities"

    def __post_init__(self):
        self.size = [int(s) for s in self.size]
        if not self.size or min(self.size) < 1:
            raise KazError(f"resize needs a positive size, got {self.size}")


@dataclass
class Threshold(Step):
    """Binary: p_1 >= value; several classes: 1 - p_0 >= value, then the most probable foreground class."""
    value: float = 0.4
    name: ClassVar[str] = "threshold"
    kind: ClassVar[str] = "segment"

    def __post_init__(self):
        self.value = float(self.value)
        if not 0.0 < self.value < 1.0:
            raise KazError(f"threshold must lie in (0, 1), got {self.value}")


@dataclass
class Argmax(Step):
    """The most probable class per voxel."""
    name: ClassVar[str] = "argmax"
    kind: ClassVar[str] = "segment"


@dataclass
class Closing(Step):
    """Closing with a ball of `radius_mm` in physical units (0: none), then optional hole filling."""
    radius_mm: float = 2.0
    fill_holes: bool = True
    name: ClassVar[str] = "closing"
    kind: ClassVar[str] = "mask"

    def __post_init__(self):
        self.radius_mm, self.fill_holes = float(self.radius_mm), bool(self.fill_holes)
        if self.radius_mm < 0:
            raise KazError(f"closing radius must be >= 0, got {self.radius_mm}")


@dataclass
class LargestComponent(Step):
    """Largest component per label with the cyst rule (components.py); `labels` None: every foreground label."""
    labels: list[int] | None = None
    connectivity: int | None = None
    cyst_rule: str = "none"
    cyst_label: int | None = None
    fluid_window: list[float] = field(default_factory=lambda: [-10.0, 20.0])
    max_std: float = 10.0
    name: ClassVar[str] = "largest_component"
    kind: ClassVar[str] = "mask"

    def __post_init__(self):
        if self.cyst_rule not in CYST_RULES:
            raise KazError(f"unknown cyst rule '{self.cyst_rule}' (choose from {', '.join(CYST_RULES)})")
        if self.cyst_rule == "label" and self.cyst_label is None:
            raise KazError("the 'label' cyst rule needs cyst_label")
        self.fluid_window = [float(v) for v in self.fluid_window]
        if len(self.fluid_window) != 2 or self.fluid_window[0] > self.fluid_window[1]:
            raise KazError(f"fluid_window must be [low, high], got {self.fluid_window}")
        self.max_std = float(self.max_std)
        self.labels = None if self.labels is None else [int(v) for v in self.labels]


@dataclass
class FillHoles(Step):
    """Fill each label's holes (background not connected to the array border; morphology.close_labels)."""
    name: ClassVar[str] = "fill_holes"
    kind: ClassVar[str] = "mask"


@dataclass
class MinimumSize(Step):
    """Remove components (full connectivity: 8-connected in 2D) smaller than `min_size` voxels, per label.

    `reference_size`: the grid `min_size` is counted in (e.g. the original 510 x 788 slice the mask is
    resized to later, as the authors count their 50 pixels there); the threshold is scaled to the grid the
    step runs on by the ratio of voxel counts. None: voxels of the grid the step runs on."""
    min_size: float = 50
    reference_size: list[int] | None = None
    name: ClassVar[str] = "minimum_size"
    kind: ClassVar[str] = "mask"

    def __post_init__(self):
        self.min_size = float(self.min_size)
        if self.min_size < 0:
            raise KazError(f"minimum size must be >= 0, got {self.min_size}")
        if self.reference_size is not None:
            self.reference_size = [int(v) for v in self.reference_size]
            if not self.reference_size or min(self.reference_size) < 1:
                raise KazError(f"minimum size: reference_size must be positive, got {self.reference_size}")

    def voxels(self, shape: Sequence[int]) -> float:
        if self.reference_size is None:
            return self.min_size
        ref = self.reference_size
        return self.min_size * float(np.prod(shape[len(shape) - len(ref):])) / float(np.prod(ref))


@dataclass
class ResizeMask(Resize):
    """Lanczos-4 resize of the cleaned label map to `size` (last len(size) axes), then 0.5 (paper 000 section
    2.3: the cleaned mask is resized to the original slice). Binary: label where Lanczos(mask) >= 0.5; several
    labels: each label's indicator (and the background's) is resized and the largest wins (ties: lower label)."""
    name: ClassVar[str] = "resize_mask"
    kind: ClassVar[str] = "mask"


STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (Resize, Threshold, Argmax, Closing, LargestComponent,
                                                          FillHoles, MinimumSize, ResizeMask)}


@dataclass
class ChainResult:
    """`segmentation` (*spatial) uint8 (uint16 past 254 classes), the (possibly resized) calibrated
    `probabilities` (C, *spatial), the final `spacing`, and per-step `report`s."""
    segmentation: np.ndarray
    probabilities: np.ndarray
    spacing: tuple[float, ...]
    report: list[dict]


class PostprocessingChain:
    """An ordered, JSON-serialisable list of steps (module docstring)."""

    def __init__(self, steps: Sequence[Step]):
        self.steps = list(steps)
        kinds = [s.kind for s in self.steps]
        if kinds.count("segment") != 1:
            raise KazError("a post-processing chain needs exactly one 'threshold' or 'argmax' step")
        seg_at = kinds.index("segment")
        if any(k != "probabilities" for k in kinds[:seg_at]) or any(k != "mask" for k in kinds[seg_at + 1:]):
            raise KazError("post-processing steps out of order: resize must come before threshold/argmax; "
                           "closing, largest_component, fill_holes, minimum_size and resize_mask after")

    @classmethod
    def paper000(cls, size: Sequence[int] | None = None, threshold: float = 0.4, radius_mm: float = 2.0,
                 cyst_rule: str | None = None, labels: Mapping[str, Any] | None = None, min_size: float = 50,
                 **cyst: Any) -> "PostprocessingChain":
        """Paper 000's chain (section 2.3) in the paper's order: threshold 0.4 -> closing (radius in spacing
        units) -> largest component with the cyst rule -> hole filling -> minimum size (`min_size` pixels of
        the output grid, the authors' 50; 0: none) -> [Lanczos-4 resize of the cleaned mask to `size`, then
        0.5]. Write the result with `write_kaz_bmp` (8-bit BMP).

        `cyst_rule` None (default): "label" when `labels` (a dataset.json `labels` dict) names a class "cyst"
        (the model's cyst label, e.g. KiTS23's 3), else "none". Other keywords go to `LargestComponent`."""
        if cyst_rule is None:
            cyst_label = next((v for k, v in (labels or {}).items() if str(k).lower() == "cyst"
                               and isinstance(v, int)), None)
            cyst_rule = "none" if cyst_label is None else "label"
            if cyst_label is not None:
                cyst.setdefault("cyst_label", cyst_label)
        steps: list[Step] = [Threshold(threshold), Closing(radius_mm, False),
                             LargestComponent(cyst_rule=cyst_rule, **cyst), FillHoles()]
        if min_size > 0:
            steps.append(MinimumSize(min_size, list(size) if size is not None else None))
        if size is not None:
            steps.append(ResizeMask(list(size)))
        return cls(steps)

    # ------------------------------------------------------------------------------------------------ apply
    def apply(self, probabilities: np.ndarray, image: np.ndarray | None = None,
              spacing: Sequence[float] | None = None, name: str = "probabilities") -> ChainResult:
        """Run the chain on (C, *spatial) probabilities. `image`: the input image as (*spatial) or
        (channels, *spatial) (channel 0 is used), needed by the intensity cyst rule. `spacing`: per spatial
        axis in nnU-Net's order (default 1 each)."""
        probs = check_probabilities(probabilities, name)
        spatial = probs.shape[1:]
        spacing = tuple(float(s) for s in (spacing if spacing is not None else [1.0] * len(spatial)))
        if len(spacing) != len(spatial):
            raise KazError(f"{name}: spacing {spacing} does not match the {len(spatial)} spatial axes")
        img = None
        if image is not None:
            img = np.asarray(image)
            if img.ndim == len(spatial) + 1:
                img = img[0]
            if img.shape not in (spatial, self._resized_shape(spatial)):
                raise KazError(f"{name}: the input image has shape {img.shape}, the probabilities {spatial}"
                               + (f" (resized: {self._resized_shape(spatial)})" if self._has_resize else ""))
            img = img.astype(np.float32)
        seg = None
        report = []
        for step in self.steps:
            if isinstance(step, ResizeMask):
                old = seg.shape
                seg = resize_label_map(seg, step.size)
                spacing = tuple(s * o / n for s, o, n in zip(spacing, old, seg.shape))
                report.append({"step": step.name, "from": list(old), "to": list(seg.shape)})
            elif isinstance(step, Resize):
                old = probs.shape[1:]
                probs = resize_probabilities(probs, step.size)
                if img is not None and img.shape != probs.shape[1:]:
                    img = resize_lanczos4(img, step.size)
                new = probs.shape[1:]
                spacing = tuple(s * o / n for s, o, n in zip(spacing, old, new))
                report.append({"step": step.name, "from": list(old), "to": list(new)})
            elif isinstance(step, (Threshold, Argmax)):
                seg = _segment(probs, step)
                report.append({"step": step.name})
            elif isinstance(step, Closing):
                seg = close_labels(seg, spacing, step.radius_mm, step.fill_holes)
                report.append({"step": step.name})
            elif isinstance(step, FillHoles):
                seg = close_labels(seg, spacing, 0.0, fill_holes=True)
                report.append({"step": step.name})
            elif isinstance(step, MinimumSize):
                seg, removed = remove_small_components(seg, step.voxels(seg.shape))
                report.append({"step": step.name, "removed": removed})
            elif isinstance(step, LargestComponent):
                if img is not None and img.shape != seg.shape:  # given at a later resize's size
                    img = resize_lanczos4(img, seg.shape)
                seg, rep = keep_largest_components(seg, step.labels, step.connectivity, step.cyst_rule,
                                                   step.cyst_label, img, step.fluid_window, step.max_std)
                report.append({"step": step.name, "labels": rep})
        return ChainResult(seg, probs, spacing, report)

    @property
    def _has_resize(self) -> bool:
        return any(isinstance(s, Resize) for s in self.steps)

    def _resized_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(spatial)
        for step in self.steps:
            if isinstance(step, Resize):
                if len(step.size) > len(shape):
                    raise KazError(f"resize to {step.size} needs {len(step.size)} spatial axes, got {len(shape)}")
                shape[len(shape) - len(step.size):] = step.size
        return tuple(shape)

    # ------------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        from nnunet_kaz import __version__

        return {"format": FORMAT, "nnunet_kaz_version": __version__, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "post-processing chain") -> "PostprocessingChain":
        if not isinstance(d, Mapping) or d.get("format") != FORMAT or not isinstance(d.get("steps"), list):
            raise KazError(f"{source} is not a post-processing chain written by nnunet-kaz")
        steps = []
        for raw in d["steps"]:
            raw = dict(raw)
            kind = raw.pop("step", None)
            if kind not in STEPS:
                raise KazError(f"{source}: unknown step '{kind}' (known: {', '.join(STEPS)})")
            allowed = {f.name for f in fields(STEPS[kind])}
            extra = set(raw) - allowed
            if extra:
                raise KazError(f"{source}: step '{kind}' has unknown settings {sorted(extra)}")
            steps.append(STEPS[kind](**raw))
        return cls(steps)

    def save(self, path: str | Path) -> Path:
        """Write the chain as JSON; a folder gets `postprocessing.json` inside it. Returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / CHAIN_FILENAME
        write_json_atomic(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PostprocessingChain":
        """Read a chain written by `save` (a folder: its `postprocessing.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / CHAIN_FILENAME
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise KazError(f"cannot read post-processing chain {path}: {e}") from e
        return cls.from_dict(d, str(path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PostprocessingChain) and [s.to_dict() for s in self.steps] == \
            [s.to_dict() for s in other.steps]

    def __repr__(self) -> str:
        return f"PostprocessingChain({self.steps!r})"


def resize_label_map(seg: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Lanczos-4 resize of a label map's last len(size) axes (ResizeMask): each label's indicator is resized
    (lanczos.resize_lanczos4); binary maps keep the label where the result is >= 0.5; with several labels the
    largest resized indicator wins, the background's included (ties: the lower label)."""
    labels = [int(v) for v in np.unique(seg) if v != 0]
    shape = list(seg.shape[:seg.ndim - len(size)]) + [int(v) for v in size]
    if not labels:
        return np.zeros(shape, dtype=seg.dtype)
    if len(labels) == 1:
        grown = resize_lanczos4((seg == labels[0]).astype(np.float32), size)
        return np.where(grown >= 0.5, labels[0], 0).astype(seg.dtype)
    best = resize_lanczos4((seg == 0).astype(np.float32), size)
    out = np.zeros(shape, dtype=seg.dtype)
    for lab in labels:
        score = resize_lanczos4((seg == lab).astype(np.float32), size)
        wins = score > best
        out[wins], best[wins] = lab, score[wins]
    return out


def _segment(probs: np.ndarray, step: Step) -> np.ndarray:
    dtype = np.uint8 if probs.shape[0] <= 255 else np.uint16
    if isinstance(step, Argmax):
        return probs.argmax(axis=0).astype(dtype)
    if probs.shape[0] == 2:
        return (probs[1] >= step.value).astype(dtype)
    fg = (1.0 - probs[0]) >= step.value
    return np.where(fg, probs[1:].argmax(axis=0) + 1, 0).astype(dtype)


def write_kaz_bmp(segmentation: np.ndarray, path: str | Path) -> None:
    """Write a 2D mask ((H, W) or (1, H, W)) as an 8-bit grayscale BMP: 255 where any label, 0 elsewhere
    (paper 000's export); written atomically."""
    seg = np.asarray(segmentation)
    if seg.ndim == 3 and seg.shape[0] == 1:
        seg = seg[0]
    if seg.ndim != 2:
        raise KazError(f"a KAZ BMP mask must be 2D, got shape {segmentation.shape} for {path}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.where(seg > 0, 255, 0).astype(np.uint8)).save(tmp, format="BMP")
