"""The C++ CPU kernels (kernels/cpu/*.cpp) as a JIT-built extension, loaded at first use, never at import.

Built by the policy of `fastvq.ops.jit` (cache folder, build lock, error text): once per machine
with ninja and the system C++ compiler; later processes load the cached library in milliseconds.
The build is specialised for the CPU's vector unit (AVX512 with or without BF16 / AVX2 / plain),
whose name is part of the extension's name, so one cache can serve different machines.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..jit import JitExtension, extension_name, missing_compiler, missing_ninja, missing_sources
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


@functools.cache
def extension(isa: str | None = None) -> JitExtension:
    """The C++ CPU search built for `isa` (default: `vector_unit()`, this CPU's; the tests also build the
    narrower ones this CPU runs, so that every code path is checked)."""
    isa = isa or vector_unit()
    sources = (SOURCES / "search.cpp",)
    # included by search.cpp; ninja tracks them
    headers = (SOURCES / "tile.h", SOURCES / "packed_codes.h", SOURCES / "workers.h")
    return JitExtension(
        name=extension_name(f"cpu_search_{isa.lower()}"),
        what="C++ CPU kernels",
        alternative="Use backend='torch' (or FASTVQ_BACKEND=torch) to run the plain-PyTorch path.",
        sources=sources,
        missing_prerequisite=lambda: missing_sources(sources + headers) or missing_compiler() or missing_ninja(),
        options=dict(
            extra_cflags=["-O3", "-ffp-contract=fast", "-pthread", *_ISA_FLAGS.get(isa, [])], extra_ldflags=["-pthread"]
        ),
    )


def load_extension(isa: str | None = None) -> ModuleType:
    """The compiled `search` module for `isa` (see `extension`); `fastvq.ops.jit.JitBuildError` naming the
    cause and the fix when it cannot be built."""
    return extension(isa).load()
