"""Lazy package exports (PEP 562), so `nnunet-kaz --help` and each command import only what they use.

Importing `nnunet_kaz.<pkg>.commands` runs `nnunet_kaz/<pkg>/__init__.py`; if that imported torch, nnU-Net,
scikit-image and friends eagerly, every command (and `--help`) would pay several seconds for all of them.
"""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package whose public names live in submodules.

    exports: public name -> submodule (relative to `package`, e.g. "predictor").
    """

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
