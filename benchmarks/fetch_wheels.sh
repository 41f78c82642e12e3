#!/usr/bin/env bash
# Download, on a machine with a package registry, the pure-Python wheels the GPU image lacks (the
# vector-quantize-pytorch 1.32.0 that tests and benchmarks compare with, flash-kmeans 0.3.1, ninja), for its
# Python 3.12, into benchmarks/wheels/ (git-ignored; pass it in the device call's `carry`).
# The GPU check's install stage puts them, with --no-index --no-deps, into its work folder on
# PYTHONPATH (docs/gpu-check.md). The versions installed here (pip freeze) are fetched, so the GPU
# runs what CI tested.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/wheels
pins=$(python -m pip freeze 2>/dev/null | grep -iE '^(vector-quantize-pytorch|einx|einops|frozendict|loguru|torch-einops-utils|tqdm)==' || true)
[ -n "$pins" ] || pins="vector-quantize-pytorch==1.32.0 einx einops frozendict loguru torch-einops-utils tqdm"
pins="$pins flash-kmeans==0.3.1"  # a benchmark peer on the GPU only
pins="$pins ninja"                 # builds backend="cuda" (torch.utils.cpp_extension) if the image lacks it
# shellcheck disable=SC2086
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --dest benchmarks/wheels $pins
ls benchmarks/wheels
