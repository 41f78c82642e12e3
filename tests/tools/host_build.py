"""Build a C++ file of the CUDA backend for the host, as a shared library for ctypes (no GPU needed)."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("c++")
needs_cxx = pytest.mark.skipif(
    CXX is None, reason="needs a host C++ compiler (g++) to build the CUDA kernels' host check"
)


def build(source: Path, out_dir: Path, *flags: str) -> ctypes.CDLL:
    """Compile `source` with warnings as errors into out_dir and load it."""
    out = out_dir / (source.stem + ".so")
    result = subprocess.run(
        [CXX, "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", *flags, str(source), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return ctypes.CDLL(str(out))


def pointer(t):
    """The address of a tensor's data (None for None)."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())
