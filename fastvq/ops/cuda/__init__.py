"""CUDA C++ backend: launchers for the kernels in `kernels/` with the signatures of
`fastvq.ops.reference` (canonical shapes). Implements nearest_code, topk_codes and code_stats;
`fastvq.ops.backend` runs every other op of backend='cuda' on the Triton backend.

Importing this module compiles nothing: the extension is built (or loaded) at first use by `_build`.
"""

from ._build import load_extension, unavailable_reason
from .code_stats import code_stats
from .nearest_code import nearest_code, topk_codes

__all__ = ["code_stats", "load_extension", "nearest_code", "topk_codes", "unavailable_reason"]
