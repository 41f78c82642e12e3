"""Math every backend shares: constants, operand rounding, the per-code score term, which tokens
count, marking tokens with no code, how many programs fill a GPU. The backends (`fastvq.ops.chunked`,
`fastvq.ops.triton`, `fastvq.ops.cuda`, `fastvq.ops.cpu`) import this module; none imports another.

Shapes are canonical (see `fastvq.ops.functional`): codebook (Hc, K, D), indices (H, N) int64.
"""

from __future__ import annotations

import functools
import math
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


def softmax_kept(norm: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens (H, N) bool that the soft ops over codes count: unmasked (mask True or None) and with a
    finite normaliser `norm` (2, H, N) = (max_k s_nk, log sum_k exp(s_nk - max)) of their scaled logits
    s (a NaN or inf in the token, an overflowing logit or a code with a non-finite entry make it not
    finite). Kept apart, the two parts give log p = (s - max) - log sum without the rounding of a
    large log-sum-exp (|s| reaches thousands at temperature 0.01)."""
    kept = torch.isfinite(norm.sum(0))
    return kept if mask is None else kept & mask


def entropy_outputs(
    entropy: torch.Tensor, prob_sums: torch.Tensor, norm: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of `code_entropy` applied to raw per-token entropies (H, N) and per-code sums of the
    kept tokens' probabilities (H, K): masked tokens get entropy 0, unmasked non-finite ones NaN;
    the mean over the kept tokens of each head (NaN for a head without one, as torch's empty mean)."""
    count = softmax_kept(norm, mask).sum(-1, keepdim=True)
    entropy = torch.where(torch.isfinite(norm.sum(0)), entropy, float("nan"))
    if mask is not None:
        entropy = torch.where(mask, entropy, 0.0)
    return entropy, prob_sums / count


def soft_grad_inputs(x: torch.Tensor, norm: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x with the rows of the tokens not kept zeroed and norm (2, H, N) with max +inf and log-sum 0
    there, so that a gradient pass gives them p = 0 and no NaN of theirs reaches a sum (0 * NaN)."""
    excluded = torch.tensor([math.inf, 0.0], device=norm.device, dtype=torch.float32)[:, None, None]
    return torch.where(kept[..., None], x, 0.0), torch.where(kept, norm, excluded)


def entropy_grad_coefs(
    kept: torch.Tensor,
    entropy: torch.Tensor,
    kept_mass: torch.Tensor,
    grad_entropy: torch.Tensor,
    expectation: torch.Tensor | None,
) -> torch.Tensor:
    """The gradient coefficients (5, H, N) fp32 (see `fastvq.ops.chunked_soft`) of
    L = sum_n a_n entropy_n + sum_k b_k mean_probs_k of `code_entropy` (a = grad_entropy, b the gradient
    of mean_probs): u = -a, Psi = kept_mass - entropy (= sum_k p psi), w = 1 / count (the mean's
    weight), B = expectation (sum_k p_nk b_k; 0 when b is 0, given as None), G . z = 0. All 0 on the
    tokens not kept (their entropy is a constant 0 or NaN)."""
    count = kept.sum(-1, keepdim=True)
    coefs = torch.zeros((5, *kept.shape), device=kept.device, dtype=torch.float32)
    coefs[0] = torch.where(kept, -grad_entropy.float(), 0.0)
    coefs[1] = torch.where(kept, kept_mass - entropy, 0.0)
    coefs[2] = torch.where(kept, 1.0 / count.clamp_min(1), 0.0)
    if expectation is not None:
        coefs[3] = torch.where(kept, expectation, 0.0)
    return coefs


def soft_quantize_grad_inputs(
    x: torch.Tensor, indices: torch.Tensor, norm: torch.Tensor, soft_values: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """What `soft_quantize`'s gradient pass takes: (kept = indices >= 0, x and norm cleaned as
    `soft_grad_inputs`, G = grad (H, N, D) fp32 with 0 on the other tokens, the coefficients (5, H, N)
    with G . z = G . soft_values and the others 0)."""
    kept = indices >= 0
    x, norm = soft_grad_inputs(x, norm, kept)
    grad = torch.where(kept[..., None], grad.float(), 0.0)
    coefs = torch.zeros((5, *kept.shape), device=kept.device, dtype=torch.float32)
    coefs[4] = (grad * soft_values).sum(-1)
    return kept, x, norm, grad, coefs


def chosen_code_sums(code_stats, grad: torch.Tensor, indices: torch.Tensor, codebook_shape) -> torch.Tensor:
    """Per code, the sum of the rows of grad (H, N, D) over the tokens whose index chose it (-1 skipped):
    (Hc, K, D) fp32 by a backend's `code_stats` (a shared codebook takes every head's rows)."""
    heads, n_codes, dim = codebook_shape
    return code_stats(grad.reshape(heads, -1, dim), indices.reshape(heads, -1), n_codes)[1]
