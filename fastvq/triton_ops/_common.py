"""What the Triton launchers share: interpreter mode and how many programs fill the device."""

from __future__ import annotations

import functools
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
"""True when this process loaded the kernels under TRITON_INTERPRET=1 (they then run on CPU tensors)."""

_INTERPRETER_PROGRAMS = 8  # small, so that CI's small shapes also exercise the split-over-codes path


@functools.cache
def num_programs_target(device: torch.device) -> int:
    """Programs a launch needs to keep every SM busy (two per SM)."""
    if INTERPRETED or device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def interpreted_precision(precision: str) -> str:
    """The precision the kernels really rank with: under the interpreter, TF32 is not emulated and
    bf16 arithmetic is unreliable, so both rank in exact fp32 there."""
    if INTERPRETED and precision in ("tf32", "bf16"):
        return "ieee"
    return precision
