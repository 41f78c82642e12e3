"""What every CUDA launcher passes the extension: the dtypes it is compiled for, the stream. (Blocks
per launch: `fastvq.ops.common.target_programs`, the Triton launchers' rule too.)"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dtype the kernels are compiled for: unchanged when they share fp32, fp16 or
    bf16, else fp32 copies (exact for fp16/bf16; fp64 is rounded to fp32 as the torch backend does)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and tensors[0].dtype in KERNEL_DTYPES:
        return tensors
    return tuple(t.float() for t in tensors)


def current_stream(device: torch.device) -> int:
    """The raw handle of torch's current stream on `device` (the kernels run on it)."""
    return torch.cuda.current_stream(device).cuda_stream
