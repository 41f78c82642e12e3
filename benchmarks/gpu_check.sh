#!/usr/bin/env bash
# The one prepared command for a lent GPU (H100/H200): the most valuable evidence first, each phase
# written under OUT as soon as it finishes, so a time-out still leaves the earlier phases.
#
#   bash benchmarks/gpu_check.sh OUT [SECONDS]     # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh OUT --dry-run     # anywhere: the same phases on CPU, tiny (a test runs it)
#
# 0. install what the GPU image lacks from wheels carried in benchmarks/wheels/ (made here by
#    benchmarks/fetch_wheels.sh; carry that folder with the call);
# 1. the environment (GPU, driver, torch, triton, CUDA)                      -> OUT/1-env.txt
# 2. every op on both backends against the reference, one VectorQuantize
#    step, compile and steady times, registers and spills per kernel         -> OUT/2-smoke/
#    and the same for the CUDA C++ backend (built first)                     -> OUT/2-smoke-cuda/
# 3. the benchmark matrix in slices: search, training step, residual step  -> OUT/3-bench/
# 4. the CUDA test matrix, cheapest first, with the time left                -> OUT/4-tests.log
# Then a summary of every phase (the reply of a device call carries the end of the output).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT [SECONDS | --dry-run]}
dry_run=0; budget=540
case "${2:-}" in
    --dry-run) dry_run=1; budget=300 ;;
    "") ;;
    *) budget=$2 ;;
esac
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
summary=()
phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, log, note the outcome
    local name=$1 limit=$2; shift 2
    if [ "$limit" -lt 10 ]; then summary+=("$name: skipped, no time left"); return; fi
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$? took=$(( $(date +%s) - t0 ))
    summary+=("$name: exit $rc after ${took}s (limit ${limit}s): $(tail -n 1 "$out/$name.log")")
}

if [ "$dry_run" = 0 ] && [ -d benchmarks/wheels ] && ! python -c "import vector_quantize_pytorch, flash_kmeans" 2>/dev/null; then
    phase 0-install 120 python -m pip install --no-index --find-links benchmarks/wheels \
        "vector-quantize-pytorch==1.32.0" "flash-kmeans==0.3.1"
fi
if [ "$dry_run" = 0 ] && ! command -v ninja >/dev/null && ls benchmarks/wheels/ninja-*.whl >/dev/null 2>&1; then
    phase 0-install-ninja 60 python -m pip install --no-index --find-links benchmarks/wheels ninja
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    python -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
    nvcc --version 2>&1 | tail -n 1 || true
    echo "ninja $(ninja --version 2>&1 || echo missing)"
} > "$out/1-env.txt" 2>&1
summary+=("1-env: $(tail -n 3 "$out/1-env.txt" | head -n 1)")

if [ "$dry_run" = 1 ]; then
    TRITON_INTERPRET=1 phase 2-smoke "$(left)" python benchmarks/gpu_smoke.py "$out/2-smoke" --device cpu
    phase 3-bench-search "$(left)" python benchmarks/run.py --device cpu --quick --only search --threads 1 \
        --out "$out/3-bench"
    phase 4-tests "$(left)" python -m pytest -q -p no:cacheprovider tests/test_code_stats.py -k "cpu-torch"
else
    phase 2-smoke 180 python benchmarks/gpu_smoke.py "$out/2-smoke"
    # the CUDA C++ backend: built here (about a minute, cached), then the same checks
    phase 2-smoke-cuda 180 python benchmarks/gpu_smoke.py "$out/2-smoke-cuda" --backend cuda
    phase 3-bench-search $(( $(left) * 2 / 5 )) python benchmarks/run.py --only search --out "$out/3-bench"
    phase 3-bench-train $(( $(left) / 3 )) python benchmarks/run.py --only train --out "$out/3-bench"
    phase 3-bench-residual $(( $(left) / 4 )) python benchmarks/run.py --only residual --out "$out/3-bench"
    # cheapest first: the op matrices, then the layer, then the rest
    phase 4-tests "$(( $(left) - 5 ))" python -m pytest -q -p no:cacheprovider -k cuda --durations=15 \
        tests/test_code_stats.py tests/test_functional.py tests/test_nearest_code.py tests/test_topk_codes.py \
        tests/test_sample_code.py tests/test_code_cross_entropy.py tests/test_layer.py tests/test_memory.py \
        tests/test_layer_memory.py tests/test_layer_parity.py tests/test_residual_vq.py
fi

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
