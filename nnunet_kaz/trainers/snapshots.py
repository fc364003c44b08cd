"""Top-k snapshot bookkeeping for SGDR cycles and the `snapshots.json` manifest (paper 002 section III-C)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_kaz.io_utils import write_json_atomic

MANIFEST = "snapshots.json"


def snapshot_filename(cycle: int, epoch: int) -> str:
    return f"checkpoint_snapshot_c{cycle}_e{epoch}.pth"


@dataclass
class Snapshot:
    cycle: int
    epoch: int
    pseudo_dice: float
    lr: float
    file: str


@dataclass
class SnapshotManifest:
    """What `snapshots.json` holds: the schedule, the kept snapshots and the cycles dropped as worse (or, for a
    "full-train" run, the fractions of training whose checkpoints are the snapshots)."""

    trainer: str
    cycle_ends: list[int]
    top_k: int
    window: int
    lr_max: float
    lr_min: float
    snapshots: list[Snapshot] = field(default_factory=list)
    dropped_cycles: list[int] = field(default_factory=list)
    fractions: list[float] | None = None  # "full-train": snapshots at these fractions of training, not top-k

    @classmethod
    def load(cls, path: Path) -> "SnapshotManifest":
        data = json.loads(Path(path).read_text())
        data["snapshots"] = [Snapshot(**s) for s in data["snapshots"]]
        return cls(**data)

    def save(self, path: Path) -> None:
        write_json_atomic(asdict(self), path)

    def in_cycle(self, cycle: int) -> list[Snapshot]:
        return [s for s in self.snapshots if s.cycle == cycle]

    def offer(self, candidate: Snapshot) -> tuple[bool, list[Snapshot]]:
        """Keep `candidate` if it is among the top-k of its cycle by pseudo-Dice.

        Returns (kept, evicted snapshots whose files should be removed). Ties keep the earlier epoch.
        """
        same = self.in_cycle(candidate.cycle)
        if len(same) < self.top_k:
            self.snapshots.append(candidate)
            return True, []
        worst = min(same, key=lambda s: (s.pseudo_dice, -s.epoch))
        if candidate.pseudo_dice <= worst.pseudo_dice:
            return False, []
        self.snapshots.remove(worst)
        self.snapshots.append(candidate)
        return True, [worst]

    def best(self, cycle: int) -> float | None:
        same = self.in_cycle(cycle)
        return max(s.pseudo_dice for s in same) if same else None

    def drop_cycle(self, cycle: int) -> list[Snapshot]:
        removed = self.in_cycle(cycle)
        self.snapshots = [s for s in self.snapshots if s.cycle != cycle]
        self.dropped_cycles.append(cycle)
        return removed
