"""C++ CPU backend: fused search kernels (kernels/cpu/) compiled at first use, with the signatures of
every backend (canonical shapes; `fastvq.ops.naive`). Ops without a C++ kernel run the "torch" backend
(chosen in `fastvq.ops.backend`). Importing this package compiles nothing; `load_extension` does, once.
"""

from ._extension import extension, load_extension
from .nearest_code import nearest_code, search_threads, topk_codes

__all__ = ["extension", "load_extension", "nearest_code", "search_threads", "topk_codes"]
