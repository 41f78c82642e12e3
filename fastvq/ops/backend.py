"""The one place that chooses which implementation runs an op.

Backends:
    "torch"  -- `fastvq.ops.reference`: plain PyTorch, chunked, any device (the CPU fallback).
    "triton" -- `fastvq.ops.triton`: fused Triton kernels; CUDA tensors, or CPU tensors when the
                process was started with TRITON_INTERPRET=1 (how CI checks the kernels).
    "auto"   -- "triton" for CUDA tensors when triton imports, else "torch".

The environment variable FASTVQ_BACKEND (torch | triton | auto) overrides the `backend=` argument
of every call, so a whole program can be switched without editing it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import reference
from .common import triton_interpret_requested

BACKENDS = ("auto", "torch", "triton")


def _import_triton_kernels() -> tuple[ModuleType | None, str]:
    """The Triton backend module, or None and the reason it cannot load."""
    try:
        return importlib.import_module("fastvq.ops.triton"), ""
    except ImportError as err:  # triton missing or broken
        return None, f"triton could not be imported ({err})"


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


def check_backend(name: str, source: str = "backend") -> None:
    """Raise ValueError naming `source` unless `name` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend ('torch' or 'triton') that runs an op on `device`.

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
    reason = triton_unavailable_reason(device)
    if reason:
        raise RuntimeError(f"fastvq backend 'triton' cannot run: {reason}")
    return "triton"


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` ('torch' or 'triton')."""
    if name == "torch":
        return reference
    module, reason = _import_triton_kernels()
    if module is None:
        raise RuntimeError(f"fastvq backend 'triton' cannot run: {reason}")
    return module


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process."""
    device = torch.device(device)
    return ["torch"] + ([] if triton_unavailable_reason(device) else ["triton"])
