#!/usr/bin/env bash
# The one prepared command for a lent GPU (H100/H200): the plan of benchmarks/gpu_plan.py inside a
# time budget, brought back as OUT/summary.md and OUT/check.tar.gz whatever happens (see
# benchmarks/gpu_check.py; the device calls and the estimates are in docs/gpu-check.md).
#
#   FASTVQ_COMMIT=<hash> bash benchmarks/gpu_check.sh OUT [BUDGET_S] [--retry] [--stages a,b]   # on the GPU
#   bash benchmarks/gpu_check.sh OUT 300 --dry-run                                             # anywhere, on CPU
#
# Runs under the image's `python3` (PYTHON overrides it), from the repository root.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
