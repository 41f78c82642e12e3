"""Per-code counts and sums in CUDA C++ (kernels/code_stats.cu): a sorted segmented reduction.

The glue sorts the kept tokens by (head, code) with torch's stable sort; each code's run is cut into
chunks of 256 tokens, each chunk's rows are added in token order and each run's chunk sums in chunk
order, with no atomics: the result is bitwise the same every run and bitwise equal to the Triton
backend's deterministic result (the same sort, chunks and order of every fp32 addition).
"""

from __future__ import annotations

import torch

from ._build import load_extension
from ._launch import current_stream, kernel_operands


def code_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA twin of `fastvq.ops.chunked.code_stats`: x (H, N, D), indices (H, N) int64, mask (H, N)
    bool -> counts (H, K) fp32, sums (H, K, D) fp32."""
    (x,) = kernel_operands(x)
    extension = load_extension()
    with torch.cuda.device(x.device):
        return extension.code_stats(x, indices, mask, num_codes, current_stream(x.device))
