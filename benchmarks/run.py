"""Run the benchmarks and rewrite benchmarks/README.md with their figures.

Each `benchmarks/bench_*.py` defines `run() -> str`, returning a Markdown section (a heading, the
sizes, and ratios against the obvious alternative measured in the same run). The README keeps one
section per benchmark between markers, so running one benchmark updates only its own section:

    python benchmarks/run.py                 # every benchmark
    python benchmarks/run.py bench_metrics   # just one
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
HEADER = """# Benchmarks

Speed and memory targets, each measured as a ratio against the obvious alternative in the same run.
Regenerate with `python benchmarks/run.py` (or `python benchmarks/run.py bench_NAME` for one section).
"""


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}")


def read_sections() -> dict[str, str]:
    if not README.exists():
        return {}
    text = README.read_text()
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->", text, flags=re.S)}


def write_sections(sections: dict[str, str]) -> None:
    parts = [HEADER]
    for name in sorted(sections):
        parts.append(f"<!-- bench:{name} -->\n{sections[name]}\n<!-- /bench:{name} -->\n")
    README.write_text("\n".join(parts))


def main(names: list[str]) -> int:
    files = sorted(HERE.glob("bench_*.py"))
    if names:
        files = [f for f in files if f.stem in names]
        missing = set(names) - {f.stem for f in files}
        if missing:
            print(f"unknown benchmark(s): {sorted(missing)}", file=sys.stderr)
            return 2
    for f in files:
        print(f"== {f.stem}", flush=True)
        spec = importlib.util.spec_from_file_location(f.stem, f)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        load = os.getloadavg()[0]
        body = module.run().strip()
        stamp = (f"_Measured {datetime.date.today().isoformat()} on {machine()}; 1-minute load average "
                 f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end._")
        sections = read_sections()  # read again: another run may have written its sections meanwhile
        sections[f.stem] = f"{body}\n\n{stamp}"
        write_sections(sections)  # after each one, so a later failure keeps earlier figures
        print(body, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
