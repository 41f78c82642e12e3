"""Triton backend: fused kernels with the signatures of every backend (canonical shapes; `fastvq.ops.naive`).

Importing this module imports triton; `fastvq.ops.backend` does so lazily, so `import fastvq` works
without triton.
"""

from ._launch import INTERPRETED
from .code_cross_entropy import code_cross_entropy, code_cross_entropy_grad
from .code_softmax import code_entropy, code_entropy_grad, soft_quantize, soft_quantize_grad
from .code_stats import code_stats
from .nearest_code import nearest_code, sample_code, topk_codes

__all__ = [
    "INTERPRETED",
    "code_cross_entropy",
    "code_cross_entropy_grad",
    "code_entropy",
    "code_entropy_grad",
    "code_stats",
    "nearest_code",
    "sample_code",
    "soft_quantize",
    "soft_quantize_grad",
    "topk_codes",
]
