"""Per-code counts and sums (EMA statistics, k-means, codebook gradient), without a one-hot.

Default (deterministic): a sorted segmented reduction, bitwise the same run to run and for any
block sizes. Kept tokens are sorted by (head, code) with a stable sort, so each code's tokens form
one run in token order; each run is cut into chunks of CHUNK tokens. `_chunk_sums_kernel` adds the
rows of each chunk in token order, `_run_sums_kernel` adds each run's chunk sums in chunk order and
writes the code's row: the order of every float addition depends on the data only, never on the
launch, and no two programs write one address (no atomics, so a collapsed batch, every token on one
code, does not serialise on one address: its run is spread over N / CHUNK programs). Extra memory:
the sort (O(N)) and one fp32 row per chunk (at most N / CHUNK + H K rows of D).

deterministic=False: one program per (BLOCK_N tokens, BLOCK_D columns, head) adds each kept row into
its code's sum with fp32 atomics; the order of the additions is not fixed, so sums may differ from
run to run in the last bits (as `index_add_` on CUDA). Kept for comparison on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import counted_tokens
from ._launch import INTERPRETED

CHUNK = 256
"""Tokens of one code added in order by one program; longer runs are split, then their chunk sums added
in order. Part of the definition of the result's bits (changing it changes the rounding)."""


@triton.jit
def _chunk_sums_kernel(
    x_ptr,
    order_ptr,
    chunk_start_ptr,
    chunk_len_ptr,
    partial_ptr,
    n_chunks,
    N,
    D,
    stride_xh,
    stride_xn,
    stride_xd,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """partial[c, :] = sum of the rows x[order[s]] for s in [start_c, start_c + len_c), in that order."""
    offs_c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < n_chunks
    d_mask = offs_d < D
    start = tl.load(chunk_start_ptr + offs_c, mask=c_mask, other=0)
    length = tl.load(chunk_len_ptr + offs_c, mask=c_mask, other=0)
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for i in range(0, tl.max(length, axis=0)):
        live = i < length
        token = tl.load(order_ptr + start + i, mask=live, other=0)  # flat (head, token) index
        row_ptr = x_ptr + (token // N) * stride_xh + (token % N) * stride_xn
        acc += tl.load(
            row_ptr[:, None] + offs_d[None, :] * stride_xd, mask=live[:, None] & d_mask[None, :], other=0.0
        ).to(tl.float32)
    tl.store(partial_ptr + offs_c[:, None] * D + offs_d[None, :], acc, mask=c_mask[:, None] & d_mask[None, :])


@triton.jit
def _run_sums_kernel(
    partial_ptr,
    run_first_chunk_ptr,
    run_chunks_ptr,
    run_key_ptr,
    sums_ptr,
    n_runs,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sums[key_r, :] = sum of partial[first_r + j] for j in [0, chunks_r), in that order."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask = offs_r < n_runs
    d_mask = offs_d < D
    first = tl.load(run_first_chunk_ptr + offs_r, mask=r_mask, other=0)
    chunks = tl.load(run_chunks_ptr + offs_r, mask=r_mask, other=0)
    key = tl.load(run_key_ptr + offs_r, mask=r_mask, other=0)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in range(0, tl.max(chunks, axis=0)):
        live = j < chunks
        acc += tl.load(
            partial_ptr + (first + j)[:, None] * D + offs_d[None, :], mask=live[:, None] & d_mask[None, :], other=0.0
        )
    tl.store(sums_ptr + key[:, None] * D + offs_d[None, :], acc, mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _atomic_code_stats_kernel(
    x_ptr,
    index_ptr,
    mask_ptr,
    counts_ptr,
    sums_ptr,
    N,
    K,
    D,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ih,
    stride_in,
    stride_mh,
    stride_mn,
    HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    rows = tl.load(
        x_ptr + pid_h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=tile_mask, other=0.0
    ).to(tl.float32)
    safe = tl.where(keep, index, 0)
    tl.atomic_add(sums_ptr + (pid_h * K + safe[:, None]) * D + offs_d[None, :], rows, mask=tile_mask)
    if pid_d == 0:
        tl.atomic_add(counts_ptr + pid_h * K + safe, tl.full([BLOCK_N], 1.0, tl.float32), mask=keep)


def _sorted_runs(indices: torch.Tensor, num_codes: int, mask: torch.Tensor | None):
    """Kept tokens sorted by (head, code), stable: (order (M,) int64 flat h N + n indices of the kept
    tokens, run keys (R,) h K + code, run lengths (R,) int64), one run per code that has tokens."""
    heads = indices.shape[0]
    keep = counted_tokens(indices, num_codes, mask)
    head_base = torch.arange(heads, device=indices.device)[:, None] * num_codes
    keys = torch.where(keep, head_base + indices, heads * num_codes).reshape(-1)  # skipped: sorted last
    sorted_keys, order = torch.sort(keys, stable=True)
    run_keys, run_lengths = torch.unique_consecutive(sorted_keys, return_counts=True)
    if run_keys.numel() and run_keys[-1] == heads * num_codes:  # the skipped tokens' run
        run_keys, run_lengths = run_keys[:-1], run_lengths[:-1]
    return order[: int(run_lengths.sum())], run_keys, run_lengths


def code_stats(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    *,
    mask: torch.Tensor | None = None,
    deterministic: bool = True,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.chunked.code_stats`: x (H, N, D), indices (H, N), mask (H, N) bool ->
    counts (H, K) fp32, sums (H, K, D) fp32.

    deterministic: the sorted segmented reduction (default) or fp32 atomics (see the module doc).
    block_sizes: (rows, columns) per program of the deterministic kernels, for tests that check
    that the result does not depend on them; None picks them.
    """
    heads, n_tokens, dim = x.shape
    counts = torch.zeros((heads, num_codes), dtype=torch.float32, device=x.device)
    sums = torch.zeros((heads, num_codes, dim), dtype=torch.float32, device=x.device)
    if n_tokens == 0:
        return counts, sums
    if not deterministic:
        return _atomic_code_stats(x, indices, num_codes, mask, counts, sums)
    order, run_keys, run_lengths = _sorted_runs(indices, num_codes, mask)
    counts.view(-1)[run_keys] = run_lengths.float()  # keys are unique: no accumulation
    if dim == 0 or run_keys.numel() == 0:
        return counts, sums
    run_chunks = (run_lengths + CHUNK - 1) // CHUNK
    run_first_chunk = torch.cumsum(run_chunks, 0) - run_chunks
    run_start = torch.cumsum(run_lengths, 0) - run_lengths
    chunk_run = torch.repeat_interleave(torch.arange(run_keys.numel(), device=x.device), run_chunks)
    chunk_in_run = torch.arange(chunk_run.numel(), device=x.device) - run_first_chunk[chunk_run]
    chunk_start = run_start[chunk_run] + chunk_in_run * CHUNK
    chunk_len = torch.clamp(run_lengths[chunk_run] - chunk_in_run * CHUNK, max=CHUNK)
    n_chunks = chunk_run.numel()
    partial = torch.empty((n_chunks, dim), dtype=torch.float32, device=x.device)
    rows, block_d = block_sizes or (32, min(64, max(16, triton.next_power_of_2(dim))))  # no spills on sm_90
    d_blocks = triton.cdiv(dim, block_d)
    _chunk_sums_kernel[(triton.cdiv(n_chunks, rows), d_blocks)](
        x,
        order,
        chunk_start,
        chunk_len,
        partial,
        n_chunks,
        n_tokens,
        dim,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_C=rows,
        BLOCK_D=block_d,
        num_warps=4,
    )
    _run_sums_kernel[(triton.cdiv(run_keys.numel(), rows), d_blocks)](
        partial,
        run_first_chunk,
        run_chunks,
        run_keys,
        sums,
        run_keys.numel(),
        dim,
        BLOCK_R=rows,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return counts, sums


def _atomic_code_stats(x, indices, num_codes, mask, counts, sums):
    heads, n_tokens, dim = x.shape
    block_n = 64 if INTERPRETED else 128
    block_d = min(128 if INTERPRETED else 64, max(16, triton.next_power_of_2(dim)))
    mask_bytes = indices if mask is None else mask.view(torch.uint8)
    grid = (triton.cdiv(n_tokens, block_n), max(1, triton.cdiv(dim, block_d)), heads)  # D = 0 still counts
    _atomic_code_stats_kernel[grid](
        x,
        indices,
        mask_bytes,
        counts,
        sums,
        n_tokens,
        num_codes,
        dim,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        indices.stride(0),
        indices.stride(1),
        mask_bytes.stride(0),
        mask_bytes.stride(1),
        HAS_MASK=mask is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return counts, sums
