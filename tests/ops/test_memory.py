"""Extra memory stays O(N + K) (never an N x K tensor): CPU peak RSS of the reference and of the C++
CPU kernels in a fresh process, and CUDA max_memory_allocated of the Triton kernels."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PEAK_RSS_SOURCE, backend_cases

import fastvq

N, K, D = 65536, 16384, 32
NK_BYTES = N * K * 4  # one fp32 N x K matrix: 4 GiB

_RSS_SCRIPT = (
    PEAK_RSS_SOURCE
    + f"""
import json, sys, torch, fastvq
backend = sys.argv[1]
torch.manual_seed(0)
x, codebook = torch.randn({N}, {D}), torch.randn({K}, {D})
fastvq.nearest_code(x[:8], codebook[:8], backend=backend)  # load everything lazy first
fastvq.topk_codes(x[:8], codebook[:8], 4, backend=backend)
before = peak_rss()
indices, distances = fastvq.nearest_code(x, codebook, backend=backend)
if backend == "cpu":  # (the reference's top-k takes minutes at this size on 2 cores)
    fastvq.topk_codes(x, codebook, 4, backend=backend)
counts, sums = fastvq.code_stats(x, indices, {K}, backend=backend)
after = peak_rss()
print(json.dumps(dict(before=before, after=after, assigned=int(counts.sum()), valid=bool((indices >= 0).all()))))
"""
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "device,backend", [case for case in backend_cases(("torch", "cpu")) if case.values[0] == "cpu"]
)
def test_cpu_peak_rss_is_bounded(device, backend):
    """N=65536, K=16384, D=32 on CPU: the N x K scores alone would be 4 GiB."""
    env = {k: v for k, v in os.environ.items() if k != "FASTVQ_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, backend], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["valid"] and stats["assigned"] == N
    assert stats["after"] < 1 << 30, f"peak RSS {stats['after'] / 2**20:.0f} MiB, expected < 1024 MiB"
    # the documented bounds: reference: 3 score tiles (48 MiB) + a codebook copy + O(N * D) outputs
    # and temporaries; C++: a packed codebook copy + per-thread buffers + the same O(N * D) epilogue
    extra = stats["after"] - stats["before"]
    assert extra < 256 << 20, f"the search added {extra / 2**20:.0f} MiB of peak RSS, expected < 256 MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.max_memory_allocated)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_peak_cuda_memory_is_linear(dtype):
    x = torch.randn(N, D, device="cuda").to(dtype)
    codebook = torch.randn(K, D, device="cuda").to(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    indices, _ = fastvq.nearest_code(x, codebook, backend="triton")
    fastvq.code_stats(x, indices, K, backend="triton", check_indices=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # outputs (N int64 + N fp32), split partials, code bias (K), counts (K) and sums (K, D) fp32
    bound = N * (8 + 4) * 4 + K * (D + 2) * 4 + (4 << 20)
    assert extra < bound < NK_BYTES // 100, f"extra {extra} bytes, bound {bound}"
