#!/usr/bin/env bash
# Checks, on this machine's CUDA GPU, what only a GPU can confirm (README, "Checking a GPU"): run it after
# `make install`. One PASS / FAIL / SKIPPED line per check; exit status 1 if any check failed. On a machine
# without CUDA every check prints SKIPPED and the exit status is 0. Takes under 10 minutes on one GPU.
#   benchmarks/gpu_check.sh [--work DIR]     (DIR: keep the set-up there instead of a temporary folder)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python="python3"; fi
fi
case "$python" in */*) export PATH="$(dirname "$python"):$PATH";; esac  # nnU-Net's scripts next to it
exec "$python" "$here/gpu_check.py" "$@"
