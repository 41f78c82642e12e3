"""The one place that chooses which implementation runs an op.

Backends:
    "torch"  -- `fastvq.ops.reference`: plain PyTorch, chunked, any device (the oracle, and the
                fallback).
    "triton" -- `fastvq.ops.triton`: fused Triton kernels; CUDA tensors, or CPU tensors when the
                process was started with TRITON_INTERPRET=1 (how CI checks the kernels).
    "cuda"   -- `fastvq.ops.cuda`: CUDA C++ kernels (kernels/), built with nvcc and ninja at first use;
                CUDA tensors only. It implements CUDA_OPS; every other op runs on the Triton backend.
    "cpu"    -- `fastvq.ops.cpu`: fused C++ search kernels (nearest_code, topk_codes) for CPU
                tensors, compiled at the first call that needs them (once, cached); the other ops
                run the reference.
    "auto"   -- "triton" for CUDA tensors when triton imports; "cpu" for CPU tensors when the C++
                kernels build (or are cached); else "torch". Never "cuda": it is chosen only by name
                (no measurement says it is faster for a shape yet). The one fallback rule on CPU: when
                the C++ kernels cannot be built, "auto" warns once, saying why, and runs "torch"; an
                explicitly requested backend that cannot run raises instead.

The environment variable FASTVQ_BACKEND (torch | triton | cuda | cpu | auto) overrides the `backend=` argument
of every call, so a whole program can be switched without editing it.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType, SimpleNamespace

import torch

from . import reference, reference_soft
from .common import triton_interpret_requested

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")

CUDA_OPS = ("nearest_code", "topk_codes", "code_stats")
"""The ops the CUDA C++ backend implements. The one fallback rule: with backend="cuda" every other
op (sample_code, code_cross_entropy and its gradient) runs on the Triton backend, and raises Triton's
reason when Triton cannot run. (lookup_codes is plain indexing on every backend; its backward is code_stats.)"""

CPU_KERNEL_OPS = ("nearest_code", "topk_codes")
"""The ops the "cpu" backend runs in C++; it runs every other op with the reference."""

SOFT_OPS = ("code_entropy", "code_entropy_grad", "soft_quantize", "soft_quantize_grad")
"""The soft ops over a codebook: `fastvq.ops.reference_soft` on the "torch" and "cpu" backends (a C++
version is not written yet), the Triton kernels on "triton" and "cuda"."""


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


class _TorchBackend:
    """backend='torch': `fastvq.ops.reference`, and `fastvq.ops.reference_soft` for SOFT_OPS."""

    def __getattr__(self, op: str):
        return getattr(reference_soft if op in SOFT_OPS else reference, op)


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


@functools.cache
def _load_cpu_kernels() -> tuple[ModuleType | None, str]:
    """The C++ CPU backend module with its extension loaded (compiling it the first time), or None
    and the reason it cannot be built. Tried once per process."""
    cpu = importlib.import_module("fastvq.ops.cpu")
    try:
        cpu.load_extension()
    except cpu.CpuKernelsUnavailable as err:
        return None, str(err)
    return cpu, ""


@torch.compiler.assume_constant_result  # torch.compile evaluates it once instead of tracing the build
def cpu_unavailable_reason(device: torch.device) -> str:
    """Why the C++ CPU backend cannot run on `device` ('' when it can; builds it the first time)."""
    if device.type != "cpu":
        return f"backend='cpu' needs CPU tensors (got device '{device.type}'); use backend='auto'"
    return _load_cpu_kernels()[1]


@functools.cache
def _warn_cpu_fallback(reason: str) -> None:
    warnings.warn(f"fastvq: running the plain-PyTorch CPU path, slower than the C++ kernels: {reason}",
                  RuntimeWarning, stacklevel=4)


def check_backend(name: str, source: str = "backend") -> None:
    """Raise ValueError naming `source` unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend ('torch', 'triton', 'cuda' or 'cpu') that runs an op on `device`.

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
        if device.type == "cpu":
            reason = cpu_unavailable_reason(device)
            if not reason:
                return "cpu"
            _warn_cpu_fallback(reason)
        return "torch"
    if requested == "cuda":
        reason = cuda_unavailable_reason(device)
    else:
        reason = (triton_unavailable_reason if requested == "triton" else cpu_unavailable_reason)(device)
    if reason:
        raise RuntimeError(f"fastvq backend '{requested}' cannot run: {reason}")
    return requested


def backend_module(name: str) -> ModuleType | SimpleNamespace | _TorchBackend | _CudaBackend:
    """The module implementing backend `name` ('torch', 'triton', 'cuda' or 'cpu')."""
    if name == "torch":
        return _TorchBackend()
    if name == "cuda":
        return _CudaBackend()
    if name == "cpu":
        cpu, reason = _load_cpu_kernels()
        if cpu is None:
            raise RuntimeError(f"fastvq backend 'cpu' cannot run: {reason}")
        return _cpu_backend(cpu)
    module, reason = _import_triton_kernels()
    if module is None:
        raise RuntimeError(f"fastvq backend 'triton' cannot run: {reason}")
    return module


@functools.cache
def _cpu_backend(cpu: ModuleType) -> SimpleNamespace:
    """The "cpu" backend: the C++ kernels' ops, the reference's for the rest."""
    ops = ("nearest_code", "topk_codes", "sample_code", "code_stats", "code_cross_entropy",
           "code_cross_entropy_grad")
    return SimpleNamespace(**{op: getattr(cpu if op in CPU_KERNEL_OPS else reference, op) for op in ops},
                           **{op: getattr(reference_soft, op) for op in SOFT_OPS})


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process (on CPU, this builds the C++ kernels the
    first time)."""
    device = torch.device(device)
    return (["torch"] + ([] if triton_unavailable_reason(device) else ["triton"])
            + ([] if cuda_unavailable_reason(device, build=False) else ["cuda"])
            + ([] if device.type != "cpu" or cpu_unavailable_reason(device) else ["cpu"]))
