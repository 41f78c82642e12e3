"""How the Triton launchers fill the device: interpreter mode, programs per launch, the tile sizes
and code splits of a search (shared by every kernel that streams codes)."""

from __future__ import annotations

import functools

import torch
import triton

from ..common import triton_interpret_requested

INTERPRETED = triton_interpret_requested()
"""True when this process loaded the kernels under TRITON_INTERPRET=1 (they then run on CPU tensors)."""

_INTERPRETER_PROGRAMS = 8  # small, so that CI's small shapes also exercise the split-over-codes path


@functools.cache
def num_programs_target(device: torch.device) -> int:
    """Programs a launch needs to keep every SM busy (two per SM)."""
    if INTERPRETED or device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def interpreted_precision(precision: str) -> str:
    """The precision the kernels really rank with: under the interpreter, TF32 is not emulated and
    bf16 arithmetic is unreliable, so both rank in exact fp32 there."""
    if INTERPRETED and precision in ("tf32", "bf16"):
        return "ieee"
    return precision


def search_config(n_tokens: int, n_codes: int, dim: int, heads: int, precision: str,
                  device: torch.device, topk: int = 1) -> dict:
    """Tile sizes and code splits for one search (a heuristic; see benchmarks/TUNING.md)."""
    block_d = max(16, triton.next_power_of_2(dim))
    single_d_tile = block_d <= 128
    if not single_d_tile:
        block_d = 64
    if INTERPRETED:  # few large tiles: the interpreter pays per tile, not per element
        block_n, block_k, warps, stages = 64, 64, 4, 1
    else:
        sixteen_bit = precision in ("bf16", "fp16")
        # a running top-k list costs registers: fewer tokens per program
        block_n = min(128 if topk == 1 else 64, max(16, triton.next_power_of_2(n_tokens)))
        block_k = 128 if (sixteen_bit or block_d <= 64) else 64
        warps, stages = 8, (3 if single_d_tile else 2)
    token_programs = triton.cdiv(n_tokens, block_n) * heads
    code_tiles = triton.cdiv(n_codes, block_k)
    splits = min(code_tiles, max(1, triton.cdiv(num_programs_target(device), token_programs)))
    codes_per_split = triton.cdiv(code_tiles, splits) * block_k
    splits = triton.cdiv(n_codes, codes_per_split)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, SINGLE_D_TILE=single_d_tile,
                num_warps=warps, num_stages=stages, splits=splits, codes_per_split=codes_per_split)
