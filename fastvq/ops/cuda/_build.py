"""The CUDA C++ extension of `kernels/` (every .cu file at its top plus the torch glue), loaded at first use.

Built by the policy of `fastvq.ops.jit` (cache folder, build lock, error text) with nvcc and ninja,
once per Python, torch and CUDA version; later processes load the built library. A copy built ahead
of time by `FASTVQ_FORCE_BUILD=1 pip install .` (module `fastvq.ops.cuda._ext`) is used first when
present. Nothing here runs at import: `import fastvq` never needs nvcc.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from ..jit import JitExtension, extension_name, missing_ninja, missing_sources
from ..kernel_sources import kernel_sources_dir

KERNELS_DIR = kernel_sources_dir()
GLUE = "torch_glue.cpp"
"""The extension is every .cu file at the top of kernels/ plus the glue (setup.py builds the same list)."""
PREBUILT_MODULE = "fastvq.ops.cuda._ext"
AOT_HINT = (
    "or build it ahead of time from a source checkout: FASTVQ_FORCE_BUILD=1 pip install --no-build-isolation -e ."
)


def sources() -> list[Path]:
    """The files compiled into the extension."""
    return sorted(KERNELS_DIR.glob("*.cu")) + [KERNELS_DIR / GLUE]


def missing_prerequisite() -> str:
    """Why the extension cannot be built here ('' when nvcc, ninja, the sources and a CUDA torch are all there)."""
    from torch.utils import cpp_extension

    files = sources()
    missing = missing_sources(tuple(files)) if len(files) > 1 else f"no .cu file in {KERNELS_DIR}"
    if missing:
        return f"{missing}, {AOT_HINT}"
    if torch.version.cuda is None:
        return (
            f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/)"
        )
    if cpp_extension.CUDA_HOME is None:
        return (
            f"nvcc was not found (CUDA_HOME is unset and no nvcc is on PATH); install the CUDA toolkit "
            f"{torch.version.cuda} (torch's CUDA version) and set CUDA_HOME to it, " + AOT_HINT
        )
    return missing_ninja()


@functools.cache
def extension() -> JitExtension:
    """The CUDA backend's extension for this Python, torch and CUDA version."""
    return JitExtension(
        name=extension_name("cuda", cuda=True),
        what="CUDA kernels",
        alternative="Use backend='triton' (the fused Triton kernels) or backend='torch'.",
        sources=tuple(sources()),
        missing_prerequisite=missing_prerequisite,
        options=dict(extra_include_paths=[str(KERNELS_DIR)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3"]),
        prebuilt=PREBUILT_MODULE,
    )


def load_extension() -> ModuleType:
    """The compiled extension (built at the first call); `fastvq.ops.jit.JitBuildError` naming the cause and fix."""
    return extension().load()
