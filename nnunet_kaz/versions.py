"""The versions of torch and numpy this package needs, checked when it is imported (from the installed packages'
metadata: nothing is imported for it), so an environment older than pyproject.toml's floors gets one message
naming the fix instead of a crash in the middle of a prediction.

The floors and the calls that set them (issue 23.2):
- numpy >= 2.0: `np.bitwise_count` (the exact pairwise Dice's popcount, `uncertainty.streaming`), new in 2.0;
  with numpy 1.x every prediction with two or more samples failed on its second mask.
- torch >= 2.1.2: nnU-Net 2.8's own floor. Our calls need no later torch: `torch.OutOfMemoryError` (2.5) is
  looked up with a fallback to `torch.cuda.OutOfMemoryError` (1.13), and every other call (torch.compile,
  torch.autocast, torch.xlogy, torch.inference_mode, per-device torch.Generator, DDP on gloo) is older. nnU-Net
  2.8 itself excludes torch 2.9.x.
"""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

MINIMUM = {"numpy": (2, 0), "torch": (2, 1, 2)}
WHY = {"numpy": "np.bitwise_count, the exact pairwise Dice", "torch": "nnU-Net 2.8's floor"}


def parse(text: str) -> tuple[int, ...]:
    """'2.14.1+cu130' -> (2, 14, 1); '2.0.0rc1' -> (2, 0, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0].split("rc")[0])[:3])


def problems(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per package older than its floor (or missing); `installed`: name -> version (default: the
    environment's)."""
    if installed is None:
        installed = {}
        for name in MINIMUM:
            try:
                installed[name] = version(name)
            except PackageNotFoundError:
                installed[name] = None
    out = []
    for name, floor in MINIMUM.items():
        have = installed.get(name)
        need = ".".join(map(str, floor))
        if have is None or parse(have) < floor:
            out.append(f"nnunet-kaz needs {name} >= {need} ({WHY[name]}), found {have or 'none'}: "
                       f"pip install '{name}>={need}'")
    return out


def check() -> None:
    found = problems()
    if found:
        raise ImportError("\n".join(found))
