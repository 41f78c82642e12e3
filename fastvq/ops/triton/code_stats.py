"""Per-code counts and sums (EMA statistics, k-means, codebook gradient) by fused scatter-add.

One program per (BLOCK_N tokens, BLOCK_D columns, head) adds each kept row into its code's sum with
fp32 atomics, so no one-hot is ever built and extra memory is the (K) + (K, D) outputs. The order
of the float additions is not fixed, so sums may differ from run to run in the last bits (as
`index_add_` on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED


@triton.jit
def _code_stats_kernel(
    x_ptr, index_ptr, mask_ptr, counts_ptr, sums_ptr, N, K, D,
    stride_xh, stride_xn, stride_xd, stride_ih, stride_in, stride_mh, stride_mn,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D
    index = tl.load(index_ptr + pid_h * stride_ih + offs_n * stride_in, mask=n_mask, other=-1)
    keep = (index >= 0) & (index < K)  # an index out of range is skipped, never written outside the outputs
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + pid_h * stride_mh + offs_n * stride_mn, mask=n_mask, other=0) != 0)
    tile_mask = keep[:, None] & d_mask[None, :]
    rows = tl.load(x_ptr + pid_h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                   mask=tile_mask, other=0.0).to(tl.float32)
    safe = tl.where(keep, index, 0)
    tl.atomic_add(sums_ptr + (pid_h * K + safe[:, None]) * D + offs_d[None, :], rows, mask=tile_mask)
    if pid_d == 0:
        tl.atomic_add(counts_ptr + pid_h * K + safe, tl.full([BLOCK_N], 1.0, tl.float32), mask=keep)


def code_stats(x: torch.Tensor, indices: torch.Tensor, num_codes: int, *,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.reference.code_stats`: x (H, N, D), indices (H, N), mask (H, N) bool ->
    counts (H, K) fp32, sums (H, K, D) fp32."""
    heads, n_tokens, dim = x.shape
    counts = torch.zeros((heads, num_codes), dtype=torch.float32, device=x.device)
    sums = torch.zeros((heads, num_codes, dim), dtype=torch.float32, device=x.device)
    if n_tokens == 0:
        return counts, sums
    block_n = 64 if INTERPRETED else 128
    block_d = min(128 if INTERPRETED else 64, max(16, triton.next_power_of_2(dim)))
    mask_bytes = indices if mask is None else mask.view(torch.uint8)
    grid = (triton.cdiv(n_tokens, block_n), max(1, triton.cdiv(dim, block_d)), heads)  # D = 0 still counts
    _code_stats_kernel[grid](
        x, indices, mask_bytes, counts, sums, n_tokens, num_codes, dim,
        x.stride(0), x.stride(1), x.stride(2), indices.stride(0), indices.stride(1),
        mask_bytes.stride(0), mask_bytes.stride(1),
        HAS_MASK=mask is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return counts, sums
