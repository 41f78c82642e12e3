"""The one place that chooses which implementation runs an op.

Backends:
    "torch"  -- `fastvq.ops.reference`: plain PyTorch, chunked, any device (the CPU fallback).
    "triton" -- `fastvq.ops.triton`: fused Triton kernels; CUDA tensors, or CPU tensors when the
                process was started with TRITON_INTERPRET=1 (how CI checks the kernels).
    "cuda"   -- `fastvq.ops.cuda`: CUDA C++ kernels (kernels/), built with nvcc and ninja at first use;
                CUDA tensors only. It implements CUDA_OPS; every other op runs on the Triton backend.
    "auto"   -- "triton" for CUDA tensors when triton imports, else "torch". Never "cuda": it is
                chosen only by name (no measurement says it is faster for a shape yet).

The environment variable FASTVQ_BACKEND (torch | triton | cuda | auto) overrides the `backend=` argument
of every call, so a whole program can be switched without editing it.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import reference
from .common import triton_interpret_requested

BACKENDS = ("auto", "torch", "triton", "cuda")

CUDA_OPS = ("nearest_code", "topk_codes", "code_stats")
"""The ops the CUDA C++ backend implements. The one fallback rule: with backend="cuda" every other
op (sample_code, code_cross_entropy and its gradient) runs on the Triton backend, and raises Triton's
reason when Triton cannot run. (lookup_codes is plain indexing on every backend; its backward is code_stats.)"""


def _import_triton_kernels() -> tuple[ModuleType | None, str]:
    """The Triton backend module, or None and the reason it cannot load."""
    try:
        return importlib.import_module("fastvq.ops.triton"), ""
    except ImportError as err:  # triton missing or broken
        return None, f"triton could not be imported ({err})"


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing (it imports triton)
def triton_unavailable_reason(device: torch.device) -> str:
    """Why the Triton backend cannot run on `device` ('' when it can)."""
    module, reason = _import_triton_kernels()
    if module is None:
        return reason + "; install it with `pip install triton`"
    if device.type == "cuda":
        if module.INTERPRETED:
            return ("the Triton kernels were loaded under TRITON_INTERPRET=1, which runs them on CPU "
                    "tensors only; unset TRITON_INTERPRET to run them on the GPU")
        return ""
    if device.type == "cpu":
        if module.INTERPRETED:
            return ""
        if triton_interpret_requested():
            return ("TRITON_INTERPRET=1 was set after fastvq's Triton kernels were imported; set it "
                    "before the first fastvq call (e.g. in the environment of the process)")
        return ("backend='triton' needs CUDA tensors (got device 'cpu'); start the process with "
                "TRITON_INTERPRET=1 to run the kernels on CPU through Triton's interpreter, or use "
                "backend='torch'")
    return f"backend='triton' does not support device '{device.type}'"


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing (it imports and builds)
def cuda_unavailable_reason(device: torch.device, build: bool = True) -> str:
    """Why the CUDA backend cannot run on `device` ('' when it can). With `build`, the extension is
    compiled if needed (once per torch and CUDA version); without, only its prerequisites are checked."""
    if device.type != "cuda":
        return (f"backend='cuda' needs CUDA tensors (got device '{device.type}'); use backend='torch' on CPU "
                "(or backend='triton' under TRITON_INTERPRET=1)")
    return importlib.import_module("fastvq.ops.cuda").unavailable_reason(build=build)


class _CudaBackend:
    """backend='cuda': the ops of CUDA_OPS from `fastvq.ops.cuda`, every other op from the Triton backend."""

    def __getattr__(self, op: str):
        if op in CUDA_OPS:
            return getattr(importlib.import_module("fastvq.ops.cuda"), op)
        return functools.partial(_on_triton, op)


def _on_triton(op: str, x: torch.Tensor, *args, **kwargs):
    reason = triton_unavailable_reason(x.device)
    if reason:
        raise RuntimeError(f"backend='cuda' runs {op} on the Triton backend (it has no CUDA C++ kernel), which "
                           f"cannot run: {reason}")
    return getattr(backend_module("triton"), op)(x, *args, **kwargs)


def check_backend(name: str, source: str = "backend") -> None:
    """Raise ValueError naming `source` unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend ('torch', 'triton' or 'cuda') that runs an op on `device`.

    Raises ValueError for an unknown name and RuntimeError, saying why, when an explicitly
    requested backend cannot run here.
    """
    requested = os.environ.get("FASTVQ_BACKEND", "").strip().lower() or backend
    check_backend(requested, "FASTVQ_BACKEND" if os.environ.get("FASTVQ_BACKEND") else "backend")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if device.type == "cuda" and not triton_unavailable_reason(device):
            return "triton"
        return "torch"
    if requested == "cuda":
        reason = cuda_unavailable_reason(device)
        if reason:
            raise RuntimeError(f"fastvq backend 'cuda' cannot run: {reason}")
        return "cuda"
    reason = triton_unavailable_reason(device)
    if reason:
        raise RuntimeError(f"fastvq backend 'triton' cannot run: {reason}")
    return "triton"


def backend_module(name: str) -> ModuleType | _CudaBackend:
    """The module implementing backend `name` ('torch', 'triton' or 'cuda')."""
    if name == "torch":
        return reference
    if name == "cuda":
        return _CudaBackend()
    module, reason = _import_triton_kernels()
    if module is None:
        raise RuntimeError(f"fastvq backend 'triton' cannot run: {reason}")
    return module


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process."""
    device = torch.device(device)
    return (["torch"] + ([] if triton_unavailable_reason(device) else ["triton"])
            + ([] if cuda_unavailable_reason(device, build=False) else ["cuda"]))
