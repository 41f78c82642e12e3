"""C++ CPU backend: fused search kernels (kernels/cpu/) compiled at first use, with the signatures of
`fastvq.ops.reference` (canonical shapes). Ops without a C++ kernel run the reference (chosen in
`fastvq.ops.backend`). Importing this package compiles nothing; `load_extension` does, once.
"""

from ._extension import CpuKernelsUnavailable, load_extension
from .nearest_code import nearest_code, search_threads, topk_codes

__all__ = ["CpuKernelsUnavailable", "load_extension", "nearest_code", "search_threads", "topk_codes"]
