"""The soft ops over a codebook keep O(N + K) extra memory, forward and backward: at N = 2048 tokens,
K = 131072 codes, D = 16 one fp32 N x K table is 1 GiB (IBQ's reference formula holds six of them,
vector-quantize-pytorch's LFQ entropy two), and the ops stay under 0.3 GiB: CPU peak RSS of the
"torch" backend in a fresh process, CUDA max_memory_allocated of the Triton kernels."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PEAK_RSS_SOURCE

import fastvq

N, K, D = 2048, 131072, 16
NK_BYTES = N * K * 4  # one fp32 N x K table: 1 GiB
LIMIT_BYTES = 3 * 2**30 // 10

_STEP = (
    PEAK_RSS_SOURCE
    + f"""
import json, torch, fastvq
torch.set_num_threads(1)  # steadier on a busy machine (two threads there wait on each other); memory is the same
torch.manual_seed(0)
x = (torch.randn({N}, {D}) * 0.3).requires_grad_()
codebook = (torch.randn({K}, {D}) * 0.3).requires_grad_()
for n, k in ((8, 16), ({N}, {K})):  # the first round loads everything lazy, the second is measured
    if n == {N}:
        before = peak_rss()
    entropy, mean_probs = fastvq.code_entropy(x[:n], codebook[:k], metric="dot", temperature=0.01,
                                              log_clamp_min=1e-5, backend="torch")
    quantized, indices = fastvq.soft_quantize(x[:n], codebook[:k], metric="dot", backend="torch")
    loss = entropy.mean() + (mean_probs * mean_probs.clamp(min=1e-5).log()).sum() + quantized.square().mean()
    grad_x, grad_codebook = torch.autograd.grad(loss, (x, codebook))
after = peak_rss()
print(json.dumps(dict(before=before, after=after, finite=bool(grad_x.isfinite().all() and grad_codebook.isfinite().all()
                      and entropy.isfinite().all()), used=int(indices.unique().numel()))))
"""
)


@pytest.mark.slow
def test_cpu_peak_rss_of_a_training_step_is_linear():
    """code_entropy (clamped: its three passes) and soft_quantize, forward and backward, on the torch
    backend: the step adds less than 0.3 GiB of peak RSS where one N x K table is 1 GiB."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVQ_BACKEND", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["finite"] and report["used"] > 1
    extra = report["after"] - report["before"]
    assert extra < LIMIT_BYTES < NK_BYTES, f"the step added {extra / 2**20:.0f} MiB of peak RSS, expected < 307 MiB"
    print(f"extra peak RSS {extra / 2**20:.0f} MiB (one N x K fp32 table: {NK_BYTES / 2**20:.0f} MiB)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.max_memory_allocated)")
def test_triton_peak_cuda_memory_is_linear():
    """The same step on the Triton kernels: besides the inputs, O(N D + K D) of partial sums, copies and
    gradients (bound: 32 rows of (D + 8) fp32 per token and 4 per code, plus 8 MiB)."""
    x = (torch.randn(N, D, device="cuda") * 0.3).requires_grad_()
    codebook = (torch.randn(K, D, device="cuda") * 0.3).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    entropy, mean_probs = fastvq.code_entropy(
        x, codebook, metric="dot", temperature=0.01, log_clamp_min=1e-5, backend="triton"
    )
    quantized, _ = fastvq.soft_quantize(x, codebook, metric="dot", backend="triton")
    loss = entropy.mean() + (mean_probs * mean_probs.clamp(min=1e-5).log()).sum() + quantized.square().mean()
    torch.autograd.grad(loss, (x, codebook))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = 32 * N * (D + 8) * 4 + 4 * K * (D + 8) * 4 + (8 << 20)
    assert extra < bound < NK_BYTES // 10, f"extra {extra} bytes, bound {bound}"
