"""LFQ at d = 18 (2^18 codes) over 8192 tokens: one training step (forward and backward through the
entropy loss) adds less than 0.5 GiB of peak RSS on CPU, where each of 1.32.0's N x 2^18 fp32 tables
(distances, softmax) is 8 GiB; and its loss terms equal 1.32.0's formula computed densely in float64,
a chunk of tokens at a time, within 1e-5 relative."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PEAK_RSS_SOURCE

N, D, INV_TEMPERATURE, SEED = 8192, 18, 100.0, 0
LIMIT_BYTES = 2**30 // 2

_STEP = (
    PEAK_RSS_SOURCE
    + f"""
import json, torch, fastvq
torch.set_num_threads(1)
quantizer = fastvq.LFQ(codebook_size=2**{D})
for n in (8, {N}):  # the first round loads everything lazy, the second is measured
    torch.manual_seed({SEED})
    x = (torch.randn(1, {N}, {D}) * 0.05)[:, :n].requires_grad_()
    if n == {N}:
        before = peak_rss()
    (quantized, indices, loss), terms = quantizer(x, inv_temperature={INV_TEMPERATURE}, return_loss_breakdown=True)
    (quantized.square().mean() + loss).backward()
after = peak_rss()
print(json.dumps(dict(before=before, after=after, per_sample=terms.per_sample_entropy.item(),
                      batch=terms.batch_entropy.item(), grad_finite=bool(x.grad.isfinite().all()),
                      grad_nonzero=int((x.grad != 0).any(-1).sum()))))
"""
)


def dense_float64_terms(x: torch.Tensor, chunk: int = 32) -> tuple[float, float]:
    """1.32.0's per-sample and batch entropies in float64: p = softmax(2 inv_temperature x . c) over the
    materialised (2^d, d) codebook, log clamped at 1e-5, a chunk of tokens at a time."""
    bits = (torch.arange(2**D)[:, None] >> torch.arange(D - 1, -1, -1)) & 1
    codebook_t = (bits * 2 - 1).double().T.contiguous()
    per_sample, mean = 0.0, torch.zeros(2**D, dtype=torch.float64)
    for rows in x.double().split(chunk):
        probs = (rows @ codebook_t * (2 * INV_TEMPERATURE)).softmax(-1)
        per_sample += -(probs * probs.clamp(min=1e-5).log()).sum().item()
        mean += probs.sum(0)
    mean /= x.shape[0]
    return per_sample / x.shape[0], -(mean * mean.clamp(min=1e-5).log()).sum().item()


@pytest.mark.slow
def test_training_step_at_2_18_codes_is_linear_and_exact():
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVQ_BACKEND", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    extra = report["after"] - report["before"]
    assert extra < LIMIT_BYTES, f"the step added {extra / 2**20:.0f} MiB of peak RSS, expected < 512 MiB"
    assert report["grad_finite"] and report["grad_nonzero"] == N
    torch.manual_seed(SEED)
    x = torch.randn(1, N, D)[0] * 0.05
    per_sample, batch = dense_float64_terms(x)
    assert abs(report["per_sample"] - per_sample) <= 1e-5 * abs(per_sample), (report["per_sample"], per_sample)
    assert abs(report["batch"] - batch) <= 1e-5 * abs(batch), (report["batch"], batch)
    print(f"extra peak RSS {extra / 2**20:.0f} MiB (one N x 2^18 fp32 table: {N * 2**D * 4 / 2**30:.0f} GiB)")
