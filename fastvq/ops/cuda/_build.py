"""Build and load the CUDA C++ extension of `kernels/` (nvcc + ninja, through torch.utils.cpp_extension).

At first use the sources are compiled once per torch and CUDA version into a cache folder
($FASTVQ_CUDA_CACHE, default ~/.cache/fastvq/cuda-torch<version>-cu<version>; later processes load
the built library, ninja rebuilds only what changed). A copy built ahead of time by
`FASTVQ_FORCE_BUILD=1 pip install .` (module `fastvq.ops.cuda._ext`) is used first when present.
Nothing here runs at import: `import fastvq` never needs nvcc.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import torch

from ..kernel_sources import kernel_sources_dir

KERNELS_DIR = kernel_sources_dir()
GLUE = "torch_glue.cpp"
"""The extension is every .cu file at the top of kernels/ plus the glue (setup.py builds the same list)."""
PREBUILT_MODULE = "fastvq.ops.cuda._ext"
AOT_HINT = ("or build it ahead of time from a source checkout: FASTVQ_FORCE_BUILD=1 pip install "
            "--no-build-isolation -e .")

_extension: ModuleType | None = None
_failure = ""


def sources() -> list[Path]:
    """The files compiled into the extension."""
    return sorted(KERNELS_DIR.glob("*.cu")) + [KERNELS_DIR / GLUE]


def cache_dir() -> Path:
    """Where the JIT build lives: one folder per torch and CUDA version."""
    root = os.environ.get("FASTVQ_CUDA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                        "fastvq")
    return Path(root) / f"cuda-torch{torch.__version__}-cu{torch.version.cuda}"


def extension_name() -> str:
    return re.sub(r"\W", "_", f"fastvq_cuda_torch{torch.__version__}_cu{torch.version.cuda}")


def missing_prerequisite() -> str:
    """Why the extension cannot be built here ('' when nvcc, ninja, the sources and a CUDA torch are all there)."""
    from torch.utils import cpp_extension

    if not (KERNELS_DIR / GLUE).is_file() or not sources()[:-1]:
        return (f"the CUDA sources are not installed with this copy of fastvq ({KERNELS_DIR} has no {GLUE} "
                "or no .cu file); reinstall fastvq (its wheel ships them as fastvq/kernels/) or install it from a "
                "source checkout (pip install -e .), " + AOT_HINT)
    if torch.version.cuda is None:
        return (f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/)")
    if cpp_extension.CUDA_HOME is None:
        return (f"nvcc was not found (CUDA_HOME is unset and no nvcc is on PATH); install the CUDA toolkit "
                f"{torch.version.cuda} (torch's CUDA version) and set CUDA_HOME to it, " + AOT_HINT)
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed; install it with `pip install ninja`"
    return ""


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{extension_name()}.so").exists():  # later processes load it without a word
        print(f"fastvq: compiling the CUDA backend for torch {torch.__version__} / CUDA {torch.version.cuda} "
              f"(once, about a minute; cached in {directory})", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=extension_name(), sources=[str(p) for p in sources()],
        extra_include_paths=[str(KERNELS_DIR)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
        build_directory=str(directory), verbose=False)


def unavailable_reason(build: bool = True) -> str:
    """'' when the extension is loaded (building it first if `build` and needed), else why not and
    the fix. Without `build`, only the prerequisites are checked (nothing is compiled)."""
    global _extension, _failure
    if _extension is not None or _failure:
        return _failure
    try:
        _extension = importlib.import_module(PREBUILT_MODULE)
        return ""
    except ImportError:
        pass
    reason = missing_prerequisite()
    if reason or not build:
        return reason
    try:
        _extension = _build()
    except Exception as err:  # compiler or linker error: keep the reason, do not retry per call
        log = str(err).strip()
        _failure = (f"building the CUDA extension from {KERNELS_DIR} failed ({type(err).__name__}: "
                    f"{log[-1500:]}); fix the toolchain (nvcc {torch.version.cuda} matching torch, a host "
                    f"compiler it supports) and delete {cache_dir()} to rebuild")
    return _failure


def load_extension() -> ModuleType:
    """The compiled extension (built at first call); RuntimeError naming the cause and fix if it cannot be."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"fastvq backend 'cuda' cannot run: {reason}")
    return _extension
