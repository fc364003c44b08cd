"""The `nnunet-kaz` command: one sub-command per user step, each a thin layer over a sub-package.

Each capability registers its sub-commands in its own `commands.py` (a `register(subparsers)` function
adding parsers whose `func` takes the parsed arguments), so this file only lists those modules.
Heavy imports (torch, nnU-Net) happen inside the command functions, keeping `--help` fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Sequence

from nnunet_kaz import __version__
from nnunet_kaz.errors import KazError

COMMAND_MODULES: tuple[str, ...] = (
    "nnunet_kaz.datasets.commands",
    "nnunet_kaz.planners.commands",
    "nnunet_kaz.trainers.commands",
    "nnunet_kaz.inference.commands",
    "nnunet_kaz.postprocessing.commands",
    "nnunet_kaz.conformal.commands",
    "nnunet_kaz.evaluation.commands",
    "nnunet_kaz.explain.commands",
    "nnunet_kaz.nested.commands",
    "nnunet_kaz.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-kaz",
        description="nnU-Net v2 extension: XBoundNet++, uncertainty, calibration, evaluation, explanations.",
    )
    parser.add_argument("--version", action="version", version=f"nnunet-kaz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # capability not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _warning_line(args.command)
    try:
        return _run(parser, args)
    finally:
        warnings.showwarning = shown


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        result = args.func(args)
        sys.stdout.flush()  # a full disk or a closed pipe on stdout is a write error too
    except KazError as e:
        print(f"nnunet-kaz {args.command}: error: {cli_message(parser, args, e)}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, an output path under a regular file, a closed pipe ...
        print(f"nnunet-kaz {args.command}: error: {os_error_message(e)}", file=sys.stderr)
        if e.filename is None:  # maybe stdout itself
            _drop_stdout()
        return 2
    except KeyboardInterrupt:
        print(f"nnunet-kaz {args.command}: interrupted; finished outputs are kept, partial ones removed",
              file=sys.stderr)
        return 130
    return int(result or 0)


def cli_message(parser: argparse.ArgumentParser, args: argparse.Namespace, e: KazError) -> str:
    """A library error with the flag of its parameter: `(pred_subset ...` -> `(--pred-subset ...`, or the flag
    appended in parentheses."""
    message = str(e)
    if getattr(e, "option", None):
        from nnunet_kaz.cli_options import flag_for_option

        names = [args.command, *(v for k, v in vars(args).items() if k.endswith("_command") and isinstance(v, str))]
        flag = flag_for_option(parser, names, e.option)
        if flag:
            marker = f"({e.option}"
            message = message.replace(marker, f"({flag}") if marker in message else f"{message} ({flag})"
    return message


def os_error_message(e: OSError) -> str:
    """`Not a directory: /out/x` for errors naming a file; `No space left on device` (standard output, or a
    write to an open file: Python does not say which) or the exception's text otherwise."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return e.strerror or f"{type(e).__name__}: {e}"


def _warning_line(command: str):
    """Warnings of the package (e.g. an allowed undeclared label) as one `nnunet-kaz CMD: warning: ...` line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if filename.startswith(os.path.dirname(__file__)):
            print(f"nnunet-kaz {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def _drop_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of unwritable output does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
