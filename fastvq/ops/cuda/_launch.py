"""What every CUDA launcher passes the extension: dtypes it compiles for, blocks per launch, the stream."""

from __future__ import annotations

import functools

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dtype the kernels are compiled for: unchanged when they share fp32, fp16 or
    bf16, else fp32 copies (exact for fp16/bf16; fp64 is rounded to fp32 as the reference does)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and tensors[0].dtype in KERNEL_DTYPES:
        return tensors
    return tuple(t.float() for t in tensors)


@functools.cache
def target_blocks(device: torch.device) -> int:
    """Blocks a launch needs to keep every SM busy (two per SM)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def current_stream(device: torch.device) -> int:
    """The raw handle of torch's current stream on `device` (the kernels run on it)."""
    return torch.cuda.current_stream(device).cuda_stream
