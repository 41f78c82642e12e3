"""Fused CPU search (kernels/cpu/search.cpp): nearest_code and topk_codes on CPU tensors.

The C++ kernel ranks codes by the torch backend's scores (l2: |c|^2 - 2 x.c; cosine: -(x.c) / |c|; dot: -(x.c)) on
operands rounded to the precision, keeping per token only its running best codes, then computes
the exact fp32 distance of each chosen code (as `fastvq.ops.chunked.chosen_distance`, in the same
threads: no extra pass of small PyTorch ops). It takes x and the codebook as they are (any float
dtype and strides) and rounds, packs and sums the codes itself, so a call runs no PyTorch op.
Extra memory: a packed copy of the codebook (and an fp32 one unless it is fp32 and contiguous),
one thread's buffers (96 tokens x D, 6 x 256 scores) per thread and the outputs.
"""

from __future__ import annotations

import torch

from ..common import METRICS, PRECISIONS
from ._extension import load_extension


def search_threads() -> int:
    """Threads a search uses: torch's intra-op setting (`torch.set_num_threads`). Work is handed out
    in small blocks from a shared counter, so a thread slowed by another process takes fewer."""
    return torch.get_num_threads()


def _search(
    x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (H, N, k) int64 of the k lowest scores per token, lowest first, ties to the lowest index,
    and their exact distances (H, N, k) fp32; -1 / NaN past the codes with a finite distance."""
    return load_extension().search(x, codebook, METRICS.index(metric), PRECISIONS.index(precision), k, search_threads())


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ twin of `fastvq.ops.chunked.nearest_code`: x (H, N, D), codebook (Hc, K, D) ->
    indices (H, N) int64 (-1: no finite distance), distances (H, N) fp32."""
    indices, distances = _search(x, codebook, metric, precision, 1)
    return indices[..., 0], distances[..., 0]


def topk_codes(
    x: torch.Tensor, codebook: torch.Tensor, k: int, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ twin of `fastvq.ops.chunked.topk_codes`: x (H, N, D), codebook (Hc, K, D), 1 <= k <= K ->
    indices (H, N, k) int64 nearest first (-1 past the finite ones), distances (H, N, k) fp32."""
    return _search(x, codebook, metric, precision, k)
