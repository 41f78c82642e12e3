"""The one place that chooses which implementation runs an op: a record per backend, one registry.

Backends (`REGISTRY`; each a `Backend` record: name, devices, ops, why it cannot run):
    "torch"  -- `fastvq.ops.chunked` (and `fastvq.ops.chunked_soft` for SOFT_OPS): plain PyTorch, chunked
                into tiles; any device.
    "triton" -- `fastvq.ops.triton`: fused Triton kernels; CUDA tensors, or CPU tensors when the
                process was started with TRITON_INTERPRET=1 (how CI checks the kernels).
    "cuda"   -- `fastvq.ops.cuda`: CUDA C++ kernels (kernels/), built at first use (`fastvq.ops.jit`);
                CUDA tensors only. It implements CUDA_OPS; every other op (SOFT_OPS too) runs on the Triton backend.
    "cpu"    -- `fastvq.ops.cpu`: fused C++ search kernels (CPU_KERNEL_OPS) for CPU tensors, built at
                the first call that needs them (`fastvq.ops.jit`); every other op (SOFT_OPS too) runs on "torch".
    "auto"   -- "triton" for CUDA tensors when triton runs; "cpu" for CPU tensors when the C++
                kernels build (or are cached); else "torch". Never "cuda": it is chosen only by name
                (no measurement says it is faster for a shape yet). The one fallback rule on CPU: when
                the C++ kernels cannot be built, "auto" warns once, saying why, and runs "torch"; an
                explicitly requested backend that cannot run raises instead, saying why.

The environment variable FASTVQ_BACKEND (torch | triton | cuda | cpu | auto) overrides the `backend=`
argument of every call, so a whole program can be switched without editing it. It is read once, at the
first call; each (requested name, device) is resolved once and remembered. `clear_cache()` forgets
both (tests that set FASTVQ_BACKEND, or swap a record of REGISTRY, call it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Mapping

import torch

from . import chunked, chunked_soft, cpu
from .common import triton_interpret_requested

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
"""The names `backend=` and FASTVQ_BACKEND accept."""

OPS = ("nearest_code", "topk_codes", "sample_code", "code_stats", "code_cross_entropy", "code_cross_entropy_grad")
"""What every backend implements, with the signatures of `fastvq.ops.naive` (canonical shapes). (lookup_codes is
plain indexing on every backend; its backward is code_stats.)"""

CUDA_OPS = ("nearest_code", "topk_codes", "code_stats")
"""The ops the CUDA C++ backend implements. The one fallback rule: with backend="cuda" every other
op (sample_code, code_cross_entropy and its gradient) runs on the Triton backend, and raises Triton's
reason when Triton cannot run."""

CPU_KERNEL_OPS = ("nearest_code", "topk_codes")
"""The ops the "cpu" backend runs in C++; it runs every other op with the "torch" backend."""

SOFT_OPS = ("code_entropy", "code_entropy_grad", "soft_quantize", "soft_quantize_grad")
"""The soft ops over a codebook, which every backend also implements, with the signatures of
`fastvq.ops.chunked_soft` (their oracle, `fastvq.ops.naive`, computes the public results instead)."""

ALL_OPS = OPS + SOFT_OPS
"""Every op a `Backend` record maps."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the ops.

    name: what `backend=` calls it. devices: the device types whose tensors it takes (None: any).
    ops: op name -> function, for every name of ALL_OPS. why_not(device, build): why it cannot run on a
    device it takes ('' when it can); with build=False nothing is compiled (a JIT-built backend not
    built yet answers from its prerequisites).
    """

    name: str
    devices: frozenset[str] | None
    ops: Mapping[str, Callable]
    why_not: Callable[[torch.device, bool], str]

    def unavailable_reason(self, device: torch.device, build: bool = True) -> str:
        """Why this backend cannot run on `device` ('' when it can)."""
        if self.devices is not None and device.type not in self.devices:
            takes = " or ".join(sorted(d.upper() for d in self.devices))
            return (
                f"backend='{self.name}' needs {takes} tensors (got device '{device.type}'); use "
                "backend='torch' (any device) or backend='auto'"
            )
        return self.why_not(device, build)


def _deferred(module: str, op: str) -> Callable:
    """`module.op`, imported at its first call: choosing a backend imports neither triton nor the CUDA launchers."""

    def run(*args, **kwargs):
        return getattr(importlib.import_module(module), op)(*args, **kwargs)

    run.__qualname__ = run.__name__ = f"{module}.{op}"
    return run


def _on_triton(op: str) -> Callable:
    """backend='cuda''s `op` without a CUDA C++ kernel: the Triton backend's, or an error saying why it cannot run."""

    def run(x: torch.Tensor, *args, **kwargs):
        triton_backend = REGISTRY["triton"]
        reason = triton_backend.unavailable_reason(x.device)
        if reason:
            raise RuntimeError(
                f"backend='cuda' runs {op} on the Triton backend (it has no CUDA C++ kernel), which "
                f"cannot run: {reason}"
            )
        return triton_backend.ops[op](x, *args, **kwargs)

    return run


def _triton_why_not(device: torch.device, build: bool) -> str:
    try:
        interpreted = importlib.import_module("fastvq.ops.triton").INTERPRETED
    except ImportError as err:  # triton missing or broken
        return f"triton could not be imported ({err}); install it with `pip install triton`"
    if device.type == "cuda" and interpreted:
        return (
            "the Triton kernels were loaded under TRITON_INTERPRET=1, which runs them on CPU tensors only; "
            "unset TRITON_INTERPRET to run them on the GPU"
        )
    if device.type == "cpu" and not interpreted:
        if triton_interpret_requested():
            return (
                "TRITON_INTERPRET=1 was set after fastvq's Triton kernels were imported; set it before the "
                "first fastvq call (e.g. in the environment of the process)"
            )
        return (
            "backend='triton' needs CUDA tensors (got device 'cpu'); start the process with TRITON_INTERPRET=1 "
            "to run the kernels on CPU through Triton's interpreter, or use backend='torch'"
        )
    return ""


def _cuda_why_not(device: torch.device, build: bool) -> str:
    return importlib.import_module("fastvq.ops.cuda").extension().unavailable_reason(build)


def _cpu_why_not(device: torch.device, build: bool) -> str:
    return cpu.extension().unavailable_reason(build)


def _ops(module, names=OPS) -> dict[str, Callable]:
    return {op: getattr(module, op) for op in names}


_TORCH_OPS = {**_ops(chunked), **_ops(chunked_soft, SOFT_OPS)}


REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("torch", None, _TORCH_OPS, lambda device, build: ""),
        Backend(
            "triton",
            frozenset({"cuda", "cpu"}),
            {op: _deferred("fastvq.ops.triton", op) for op in ALL_OPS},
            _triton_why_not,
        ),
        Backend(
            "cuda",
            frozenset({"cuda"}),
            {op: _deferred("fastvq.ops.cuda", op) if op in CUDA_OPS else _on_triton(op) for op in ALL_OPS},
            _cuda_why_not,
        ),
        Backend("cpu", frozenset({"cpu"}), {**_TORCH_OPS, **_ops(cpu, CPU_KERNEL_OPS)}, _cpu_why_not),
    )
}
"""Every backend but "auto", by name."""


def check_backend(name: str, source: str = "backend") -> None:
    """Raise ValueError naming `source` unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")


@functools.cache
def _environment_backend() -> str:
    """FASTVQ_BACKEND, checked ('' when unset), read once per process (until `clear_cache`)."""
    value = os.environ.get("FASTVQ_BACKEND", "").strip().lower()
    if value:
        check_backend(value, "FASTVQ_BACKEND")
    return value


@functools.cache
def _resolve(requested: str, device: torch.device) -> tuple[str, str]:
    """(the backend that runs, '') or ('', why the requested one cannot run); "auto" always finds one."""
    if requested == "auto":
        if device.type == "cuda" and not REGISTRY["triton"].unavailable_reason(device):
            return "triton", ""
        if device.type == "cpu":
            reason = REGISTRY["cpu"].unavailable_reason(device)
            if not reason:
                return "cpu", ""
            warnings.warn(
                f"fastvq: running the plain-PyTorch CPU path, slower than the C++ kernels: {reason}",
                RuntimeWarning,
                stacklevel=5,
            )
        return "torch", ""
    reason = REGISTRY[requested].unavailable_reason(device)
    return ("", f"fastvq backend '{requested}' cannot run: {reason}") if reason else (requested, "")


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing (it imports and builds)
def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend ('torch', 'triton', 'cuda' or 'cpu') that runs an op on `device`.

    Raises ValueError for an unknown name and RuntimeError, saying why, when an explicitly
    requested backend cannot run here.
    """
    requested = _environment_backend() or backend
    check_backend(requested)
    name, error = _resolve(requested, device)
    if error:
        raise RuntimeError(error)
    return name


def implementation(backend: str, op: str) -> Callable:
    """The function of backend `backend` (a name `resolve_backend` returned) that runs `op`."""
    return REGISTRY[backend].ops[op]


def unavailable_reason(backend: str, device: torch.device | str, build: bool = True) -> str:
    """Why backend `backend` cannot run on `device` ('' when it can); build=False compiles nothing."""
    return REGISTRY[backend].unavailable_reason(torch.device(device), build)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process. On CPU this builds the C++ kernels the
    first time (seconds); the CUDA backend is listed when it could be built, without compiling it."""
    device = torch.device(device)
    return [
        name for name, backend in REGISTRY.items() if not backend.unavailable_reason(device, build=device.type == "cpu")
    ]


def clear_cache() -> None:
    """Forget FASTVQ_BACKEND and every resolved backend: the next call reads and resolves them again."""
    _environment_backend.cache_clear()
    _resolve.cache_clear()
