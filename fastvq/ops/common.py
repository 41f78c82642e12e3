"""Math every backend shares: constants, operand rounding, the per-code score term, which tokens
count, marking tokens with no code, how many programs fill a GPU. The backends (`fastvq.ops.chunked`,
`fastvq.ops.triton`, `fastvq.ops.cuda`, `fastvq.ops.cpu`) import this module; none imports another.

Shapes are canonical (see `fastvq.ops.functional`): codebook (Hc, K, D), indices (H, N) int64.
"""

from __future__ import annotations

import functools
import os

import torch

COSINE_NORM_EPS = 1e-12
"""Norms below this are clamped when the cosine metric normalises x or a code (as
`torch.nn.functional.normalize`). Not the layer's l2norm eps (`fastvq.nn.codebook.L2NORM_EPS`)."""

L2_LOGIT_EPS = 1e-8
"""The l2 logit is -sqrt(max(squared distance, L2_LOGIT_EPS)), as vector-quantize-pytorch 1.32.0's `cdist`."""

PRECISIONS = ("ieee", "tf32", "bf16", "fp16")
"""What the matrix product that ranks codes may use (see `fastvq.ops.functional.resolve_precision`)."""

METRICS = ("l2", "cosine", "dot")

MAX_TOPK = 16
"""Largest k of `topk_codes` and `sample_code` (the Triton kernels keep the running list in registers)."""


def triton_interpret_requested() -> bool:
    """True when the environment asks Triton to interpret kernels on CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def gumbel_scales(temperature: float) -> tuple[float, float]:
    """(a, b) with argmax_k(a logit_k + b g_k) = argmax_k(logit_k / temperature + g_k), temperature > 0:
    (1 / T, 1) for T >= 1 and (1, T) below, so that neither product overflows fp32 (1 / T would for
    T < 3e-39, and logit / T once |logit| > 3.4e38 T) and T -> 0 tends to the nearest code by logit."""
    return (1.0 / temperature, 1.0) if temperature >= 1.0 else (1.0, temperature)


def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """`t` as fp32 after rounding to what the matrix product of `precision` sees.

    ieee: exact fp32. tf32: 10-bit mantissa, round to nearest with ties away from zero (as the
    tensor cores' cvt.rna). bf16 / fp16: round to nearest even in that dtype.
    """
    if precision == "ieee":
        return t.float()
    if precision == "tf32":
        bits = t.float().view(torch.int32)
        # Add half an ulp of tf32 to the magnitude, then drop the 13 low mantissa bits. Inf/NaN keep
        # their exponent (all ones); a NaN payload may change but stays NaN.
        finite = torch.isfinite(t.float())
        rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
        return torch.where(finite, rounded, t.float())
    if precision == "bf16":
        return t.to(torch.bfloat16).float()
    if precision == "fp16":
        return t.to(torch.float16).float()
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def code_bias(codebook: torch.Tensor, metric: str, precision: str) -> torch.Tensor:
    """Per-code term of the search score, (Hc, K) fp32; NaN for codes with a non-finite entry.

    l2: |c|^2, so that score = |c|^2 - 2 x.c ranks codes as |x - c|^2 does.
    cosine: 1 / max(|c|, eps), so that score = -(x.c) / |c| ranks codes as 1 - cos(x, c) does.
    dot: 0, so that score = -(x.c) ranks codes by their logit x.c (maximum inner product).
    Computed from the same rounded operands as the product (fewer flips near ties).
    """
    rounded = round_operand(codebook, precision)
    sq = rounded.pow(2).sum(-1)
    if metric == "l2":
        bias = sq
    elif metric == "cosine":
        bias = sq.sqrt().clamp_min(COSINE_NORM_EPS).reciprocal()
    else:
        bias = torch.zeros_like(sq)
    # a NaN or infinite entry (or one that overflows when rounded or squared) makes sq non-finite
    return bias.masked_fill(~torch.isfinite(sq), float("nan"))


def gather_codes(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of codebook (Hc, K, D) picked by indices (H, N) -> (H, N, D); index -1 reads code 0."""
    safe = indices.clamp_min(0)
    if codebook.shape[0] == 1:
        return codebook[0][safe]
    return codebook[torch.arange(codebook.shape[0], device=codebook.device)[:, None], safe]


def mark_unassigned(indices: torch.Tensor, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give index -1 and distance NaN to tokens whose search found no finite distance."""
    bad = (indices < 0) | ~torch.isfinite(distances)
    return indices.masked_fill(bad, -1), distances.masked_fill(bad, float("nan"))


def valid_first(indices: torch.Tensor, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k lists (..., k) with their -1 entries (distance NaN) moved behind the valid ones, which keep
    their order: a chosen code whose exact distance is not finite leaves no hole before a valid one."""
    order = (indices < 0).to(torch.int8).argsort(dim=-1, stable=True)
    return indices.gather(-1, order), distances.gather(-1, order)


def counted_tokens(indices: torch.Tensor, num_codes: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Which tokens `code_stats` adds up, (H, N) bool: index in [0, num_codes) and mask True. An index
    out of range (possible only with check_indices=False) is skipped, never written outside the outputs."""
    counted = (indices >= 0) & (indices < num_codes)
    return counted if mask is None else counted & mask


@functools.cache
def target_programs(device: torch.device) -> int:
    """Programs (CUDA blocks) one launch needs to keep every SM of `device` busy: two per SM. 8 where
    there are no SMs (Triton's interpreter on CPU): few, so that small test shapes also split the codes."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count
