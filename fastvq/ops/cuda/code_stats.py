"""Per-code counts and sums in CUDA C++ (kernels/code_stats.cu), deterministic without sorting.

Each code's rows are added in token order by the one warp that owns the code (no atomics); with
token splits the partial sums are added in split order. The result is bitwise the same every run.
"""

from __future__ import annotations

import torch

from ._build import load_extension
from ._launch import current_stream, kernel_operands, target_blocks


def code_stats(x: torch.Tensor, indices: torch.Tensor, num_codes: int, *,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA twin of `fastvq.ops.reference.code_stats`: x (H, N, D), indices (H, N) int64, mask (H, N)
    bool -> counts (H, K) fp32, sums (H, K, D) fp32."""
    (x,) = kernel_operands(x)
    extension = load_extension()
    with torch.cuda.device(x.device):
        return extension.code_stats(x, indices, mask, num_codes, target_blocks(x.device), current_stream(x.device))
