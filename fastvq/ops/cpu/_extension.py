"""Builds and loads the C++ CPU kernels (kernels/cpu/*.cpp) at first use, never at import.

`torch.utils.cpp_extension.load` compiles them once with ninja and the system C++ compiler and caches
the result (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later processes load the cached
library in milliseconds. The build is specialised for the CPU's vector unit (AVX512 with or without
BF16 / AVX2 / plain), whose name is part of the cached library's name, so one cache can serve
different machines.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from ..kernel_sources import kernel_sources_dir

SOURCES = kernel_sources_dir() / "cpu"
"""The C++ sources (fastvq/kernels/cpu in a wheel, kernels/cpu in a checkout)."""

_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"]
_ISA_FLAGS = {"AVX512_BF16": [*_AVX512, "-mavx512bf16"], "AVX512": _AVX512, "AVX2": ["-mavx2", "-mfma"]}
"""Compiler flags per vector unit; with AVX512-BF16 the bf16 precision takes two dimensions per instruction."""


def vector_unit() -> str:
    """The CPU's vector unit the kernels are built for: AVX512_BF16, AVX512, AVX2 or torch's name of another."""
    isa = torch.backends.cpu.get_cpu_capability()
    if isa == "AVX512" and torch.cpu._is_avx512_bf16_supported():
        return "AVX512_BF16"
    return isa


class CpuKernelsUnavailable(RuntimeError):
    """The C++ CPU kernels cannot be built or loaded here; the message says why and what to do."""


def _build_problem() -> str:
    """Why a build cannot even start ('' when it can)."""
    if not (SOURCES / "search.cpp").is_file():
        return f"the C++ sources are not in {SOURCES} (an install without the kernel sources)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; install g++ or clang, or set CXX)"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    return ""


@functools.cache
def load_extension(isa: str | None = None) -> ModuleType:
    """The compiled `search` module, built for `isa` (default: `vector_unit()`, this CPU's; the tests
    also build the narrower ones this CPU runs, so that every code path is checked); raises
    CpuKernelsUnavailable naming the cause and the fix."""
    problem = _build_problem()
    if problem:
        raise CpuKernelsUnavailable(f"fastvq's C++ CPU kernels cannot be built: {problem}. Use "
                                    "backend='torch' (or FASTVQ_BACKEND=torch) to run the plain-PyTorch path.")
    from torch.utils import cpp_extension

    isa = isa or vector_unit()
    name = f"fastvq_cpu_search_{isa.lower()}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not (build_dir / f"{name}.so").exists():
        print(f"fastvq: compiling the C++ CPU kernels ({isa}) once into {build_dir} ...", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            name=name, sources=[str(SOURCES / "search.cpp")],
            extra_cflags=["-O3", "-ffp-contract=fast", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # compiler errors, a broken cache, a missing header
        raise CpuKernelsUnavailable(
            f"fastvq's C++ CPU kernels failed to build in {build_dir}: {err}. Check the compiler output above "
            "(rerun with a clean cache: delete that folder), or use backend='torch' (or FASTVQ_BACKEND=torch) "
            "for the plain-PyTorch path.") from err
