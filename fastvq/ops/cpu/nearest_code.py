"""Fused CPU search (kernels/cpu/search.cpp): nearest_code and topk_codes on CPU tensors.

The C++ kernel ranks codes by the reference's scores (l2: |c|^2 - 2 x.c; cosine: -(x.c) / |c|) on
operands rounded to the precision, keeping per token only its running best codes; this file gives
it the rounded codebook and the per-code term, then recomputes the exact fp32 distance of each
chosen code (`fastvq.ops.common.chosen_distance`, as the reference). Extra memory: one packed fp32
copy of the codebook, one thread's buffers (96 tokens x D, 6 x 256 scores) per thread and the outputs.
"""

from __future__ import annotations

import torch

from ..common import PRECISIONS, chosen_distance, code_bias, round_operand
from ._extension import load_extension


def search_threads() -> int:
    """Threads a search uses: torch's intra-op setting (`torch.set_num_threads`). Work is handed out
    in small blocks from a shared counter, so a thread slowed by another process takes fewer."""
    return torch.get_num_threads()


def _search(x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str, k: int) -> torch.Tensor:
    """Indices (H, N, k) int64 of the k lowest scores per token, lowest first, ties to the lowest index,
    -1 past the codes with a finite score."""
    bias = code_bias(codebook, metric, precision)
    codes = round_operand(codebook, precision)
    return load_extension().search(x, codes, bias, metric == "cosine", PRECISIONS.index(precision), k,
                                   search_threads())


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2",
                 precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """C++ twin of `fastvq.ops.reference.nearest_code`: x (H, N, D), codebook (Hc, K, D) ->
    indices (H, N) int64 (-1: no finite distance), distances (H, N) fp32."""
    return chosen_distance(x, codebook, _search(x, codebook, metric, precision, 1)[..., 0], metric)


def topk_codes(x: torch.Tensor, codebook: torch.Tensor, k: int, *, metric: str = "l2",
               precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """C++ twin of `fastvq.ops.reference.topk_codes`: x (H, N, D), codebook (Hc, K, D), 1 <= k <= K ->
    indices (H, N, k) int64 nearest first (-1 past the finite ones), distances (H, N, k) fp32."""
    indices = _search(x, codebook, metric, precision, k)
    pairs = [chosen_distance(x, codebook, indices[..., j], metric) for j in range(k)]
    return torch.stack([p[0] for p in pairs], dim=-1), torch.stack([p[1] for p in pairs], dim=-1)
