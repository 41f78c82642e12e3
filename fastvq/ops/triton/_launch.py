"""How the Triton launchers fill the device: interpreter mode, programs per launch, the tile sizes
and code splits of a search (shared by every kernel that streams codes)."""

from __future__ import annotations

import torch
import triton

from ..common import target_programs, triton_interpret_requested

INTERPRETED = triton_interpret_requested()
"""True when this process loaded the kernels under TRITON_INTERPRET=1 (they then run on CPU tensors)."""


def interpreted_precision(precision: str) -> str:
    """The precision the kernels really rank with: under the interpreter, TF32 is not emulated and
    bf16 arithmetic is unreliable, so both rank in exact fp32 there."""
    if INTERPRETED and precision in ("tf32", "bf16"):
        return "ieee"
    return precision


STREAMED_BLOCK_D = 32
"""D chunk when a row does not stay in registers whole (D > 128, or > 64 with exact fp32 products)."""


def search_config(
    n_tokens: int,
    n_codes: int,
    dim: int,
    heads: int,
    precision: str,
    device: torch.device,
    topk: int = 1,
    logits: bool = False,
) -> dict:
    """Tile sizes and code splits for one search (see benchmarks/TUNING.md).

    logits: the kernel computes every pair's logit (sampling, cross-entropy), not only a ranking
    score. Tiles are the largest that compile without register spills on sm_90 and sm_80 under
    triton 3.6 and 3.9 (checked by tests/tools/gpu_compile.py): exact fp32 products run on CUDA cores
    and keep both operands in registers, so they get smaller tiles and stream D past 64; a running
    top-k list or per-pair logits (Philox, sqrt, exp) take a smaller token block.
    """
    exact = precision == "ieee"
    padded_d = max(16, triton.next_power_of_2(dim))
    single_d_tile = padded_d <= (64 if exact else 128)
    block_d = padded_d if single_d_tile else STREAMED_BLOCK_D
    if INTERPRETED:  # few large tiles: the interpreter pays per tile, not per element
        block_n, block_k, warps, stages = 64, 64, 4, 1
    else:
        if not exact:
            block_n, block_k, warps = (64, 128, 8) if topk > 1 or logits or not single_d_tile else (128, 128, 8)
        elif single_d_tile:
            block_n, block_k, warps = (64, 128, 8) if block_d == 64 else (128, 64, 8)
        else:
            block_n, block_k, warps = 64, 64, 4
        if topk > 1:
            block_n = min(block_n, 64)
        block_n = min(block_n, max(16, triton.next_power_of_2(n_tokens)))
        stages = 3 if single_d_tile else 2
    token_programs = triton.cdiv(n_tokens, block_n) * heads
    code_tiles = triton.cdiv(n_codes, block_k)
    splits = min(code_tiles, max(1, triton.cdiv(target_programs(device), token_programs)))
    codes_per_split = triton.cdiv(code_tiles, splits) * block_k
    splits = triton.cdiv(n_codes, codes_per_split)
    return dict(
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        SINGLE_D_TILE=single_d_tile,
        num_warps=warps,
        num_stages=stages,
        splits=splits,
        codes_per_split=codes_per_split,
    )


def grad_config(n_rows: int, n_stream: int, dim: int, heads: int, device: torch.device, code_side: bool) -> dict:
    """Tile sizes, D chunks and splits of the streamed axis for one cross-entropy gradient launch:
    programs own `n_rows` rows (codes when code_side, else tokens) and stream `n_stream` of the other
    side. The largest tiles without register spills (tests/tools/gpu_compile.py checks it): the
    accumulator (block, BLOCK_DO) fp32 lives in registers beside a resident row tile."""
    padded_d = max(16, triton.next_power_of_2(dim))
    single_d_tile = padded_d <= 128
    block_d = padded_d if single_d_tile else STREAMED_BLOCK_D
    if INTERPRETED:
        block, warps, stages = 64, 4, 1
    else:
        block, warps = (32, 4) if single_d_tile and code_side else (64, 8)
        stages = 2
    row_programs = triton.cdiv(n_rows, block) * triton.cdiv(dim, block_d) * heads
    stream_tiles = triton.cdiv(n_stream, block)
    splits = min(stream_tiles, max(1, triton.cdiv(target_programs(device), row_programs)))
    per_split = triton.cdiv(stream_tiles, splits) * block
    return dict(
        BLOCK_N=block,
        BLOCK_K=block,
        BLOCK_D=block_d,
        SINGLE_D_TILE=single_d_tile,
        BLOCK_DO=block_d,
        num_warps=warps,
        num_stages=stages,
        splits=triton.cdiv(n_stream, per_split),
        per_split=per_split,
    )


def distance_config(dim: int) -> dict:
    """Tiles of the kernel that recomputes the exact distance of each chosen code (no spills)."""
    return dict(BLOCK_N=64, BLOCK_D=min(32, max(16, triton.next_power_of_2(dim))), num_warps=4)
