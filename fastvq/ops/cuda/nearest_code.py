"""Fused code search in CUDA C++ (kernels/nearest_code.cu): nearest_code and topk_codes.

The kernel keeps a running (score, index) list per token in registers (ties to the lowest index,
non-finite scores never win), splits the codes over blocks when the tokens alone cannot fill the
GPU and merges the splits' lists in a fixed order, then recomputes the exact fp32 distance of each
chosen code. Operands are rounded to the precision as the torch backend (ops/chunked.py) rounds them; tf32, bf16 and
fp16 products run on tensor cores (WMMA, fp32 accumulators; sm_80+), ieee (and any precision on an
older GPU) as fp32 FMAs on CUDA cores: the kernel's `uses_tensor_cores` rule.
"""

from __future__ import annotations

import torch

from ..common import METRICS, PRECISIONS, code_bias, target_programs, valid_first
from ._build import load_extension
from ._launch import current_stream, kernel_operands


def _search(
    x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """indices (H, N, k) int64 nearest first (-1 past the finite ones) and distances (H, N, k) fp32."""
    x, codebook = kernel_operands(x, codebook)
    bias = code_bias(codebook, metric, precision)  # (Hc, K) fp32, NaN for codes with a non-finite entry
    extension = load_extension()
    with torch.cuda.device(x.device):
        return extension.search(
            x,
            codebook,
            bias,
            METRICS.index(metric),
            PRECISIONS.index(precision),
            k,
            target_programs(x.device),
            current_stream(x.device),
        )


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA twin of `fastvq.ops.chunked.nearest_code`: x (H, N, D), codebook (Hc, K, D) ->
    indices (H, N) int64 (-1: no finite distance), distances (H, N) fp32."""
    indices, distances = _search(x, codebook, metric, precision, 1)
    return indices[..., 0], distances[..., 0]


def topk_codes(
    x: torch.Tensor, codebook: torch.Tensor, k: int, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA twin of `fastvq.ops.chunked.topk_codes`: x (H, N, D), codebook (Hc, K, D), 1 <= k <= 16 ->
    indices (H, N, k) int64 nearest first, distances (H, N, k) fp32; -1 / NaN after the valid entries."""
    return valid_first(*_search(x, codebook, metric, precision, k))
