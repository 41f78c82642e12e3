"""CUDA C++ backend: launchers for the kernels in `kernels/` with the signatures of every backend
(canonical shapes; `fastvq.ops.naive`). Implements nearest_code, topk_codes and code_stats;
`fastvq.ops.backend` runs every other op of backend='cuda' on the Triton backend.

Importing this module compiles nothing: the extension is built (or loaded) at first use by `_build`.
"""

from ._build import extension, load_extension
from .code_stats import code_stats
from .nearest_code import nearest_code, topk_codes

__all__ = ["code_stats", "extension", "load_extension", "nearest_code", "topk_codes"]
