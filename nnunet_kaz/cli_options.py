"""One flag vocabulary for every `nnunet-kaz` command (README, "Commands"): the options several commands share
are added here, so they are spelled, defaulted and documented once.

| meaning | flag | old spelling (accepted for one release, with a warning) |
| --- | --- | --- |
| input images (files or folder, nnU-Net naming) | `-i` | |
| output | `-o` | |
| member(s) `RESULTS_DIR[:FOLDS[:CHECKPOINTS]]` | `-m` | |
| dataset id | `-d` | `--id` (convert-kaz, convert-kits23) |
| prediction folder | `--pred` | |
| probability folder (CASE.npz) | `--probs` | `-p` (calibrate) |
| ground-truth / label folder | `--gt` | `-l` (calibrate, refine fit) |
| class explained / refined | `--target-class` | |
| MC-dropout samples per model | `--mc` | |
| sliding-window tile step | `--step-size` | |
| device | `-device` / `--device` (default auto: cuda when available) | |
| seed | `--seed` | |
| no progress bars | `-q` / `--quiet` | |
| redo finished outputs | `--overwrite` | |
| no test-time mirroring (predict; nnU-Net's `--disable_tta`) | `--disable-tta` | `--mirror` (mirroring is the default) |

Library errors name what is wrong with the parameter's name in parentheses, e.g. `(pred_subset)`; `cli.main`
turns that into the flag of the command that failed (`flag_for_option`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

MEMBER_HELP = "RESULTS_DIR[:FOLDS[:CHECKPOINTS]]"


class _OldSpelling(argparse.Action):
    """Stores the value like `store`; warns on stderr when an old spelling of the flag was used."""

    def __init__(self, option_strings, dest, old: tuple[str, ...] = (), **kwargs):
        self.old = tuple(old)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old:
            print(f"{parser.prog}: warning: {option_string} is the old spelling of {self.option_strings[0]}; it is "
                  "accepted in this release only", file=sys.stderr)
        setattr(namespace, self.dest, values)


class _RetiredSwitch(argparse.Action):
    """A switch whose behaviour became the default: accepted (it changes nothing) with a warning on stderr."""

    def __init__(self, option_strings, dest, note: str = "", **kwargs):
        self.note = note
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is no longer needed ({self.note}); it is accepted in this "
              "release only", file=sys.stderr)


def add_retired_switch(p: argparse.ArgumentParser, flag: str, note: str) -> argparse.Action:
    """`flag` still parses (one release, with a warning naming `note`) but does nothing: its behaviour is the
    default now."""
    return p.add_argument(flag, action=_RetiredSwitch, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                          note=note, help=argparse.SUPPRESS)


def add(p: argparse.ArgumentParser, flag: str, *old: str, **kwargs) -> argparse.Action:
    """`p.add_argument(flag, **kwargs)` that also accepts the old spellings `old` (with a warning)."""
    if not old:
        return p.add_argument(flag, **kwargs)
    return p.add_argument(flag, *old, action=_OldSpelling, old=old, **kwargs)


def add_inputs(p: argparse.ArgumentParser, many: bool = True, help: str | None = None) -> None:
    p.add_argument("-i", type=Path, nargs="+" if many else None, required=True,
                   help=help or "image file(s) CASE_0000.ext (nnU-Net naming) or folder(s) of them")


def add_output(p: argparse.ArgumentParser, help: str = "output folder", metavar: str | None = None) -> None:
    p.add_argument("-o", type=Path, required=True, help=help, metavar=metavar)


def add_member(p: argparse.ArgumentParser, many: bool = False, what: str = "") -> None:
    p.add_argument("-m", nargs="+" if many else None, required=True, metavar="MEMBER",
                   help=f"{MEMBER_HELP}{what}" if many else f"{MEMBER_HELP}{what} (its first checkpoint is used)")


def add_gt(p: argparse.ArgumentParser, *old: str, required: bool = False, help: str | None = None) -> None:
    add(p, "--gt", *old, dest="gt", type=Path, required=required,
        help=help or "ground-truth / label folder (CASE.ext, e.g. labelsTr)")


def add_probs(p: argparse.ArgumentParser, *old: str, required: bool = False, help: str | None = None) -> None:
    add(p, "--probs", *old, dest="probs", type=Path, required=required,
        help=help or "folder of CASE.npz probabilities ('probabilities', (C, *spatial))")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("-device", "--device", default="auto",
                   help="cuda, cpu or auto (default: cuda when available)")


def add_step(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-size", dest="tile_step_size", metavar="STEP", type=float, default=0.5,
                   help="sliding-window tile step as a fraction of the patch (nnU-Net's; default 0.5)")


def add_target_class(p: argparse.ArgumentParser, what: str = "explained") -> None:
    p.add_argument("--target-class", type=int, default=1, help=f"class {what} (default 1)")


def add_seed(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--seed", type=int, default=0, help=f"seed {what} (default 0)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def flag_for_option(parser: argparse.ArgumentParser, argv_command: list[str], option: str) -> str | None:
    """The flag (e.g. `--pred-subset`) behind library parameter `option` in the (sub-)command named by
    `argv_command` (e.g. ["refine", "fit"]), or None."""
    current = parser
    for name in argv_command:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or name not in sub.choices:
            break
        current = sub.choices[name]
    for action in current._actions:
        if action.dest == option and action.option_strings:
            long = [s for s in action.option_strings if s.startswith("--")]
            return (long or action.option_strings)[0]
    return None
