"""Triton twins of `fastvq.ops.chunked_soft` (canonical shapes): `code_entropy`, `soft_quantize` and
their gradients, each a sequence of the streamed passes of `_softmax_passes`.

code_entropy: stats (normaliser, exact entropy) -> [token sums: clamped entropy] -> code sums (mean of p).
Its gradient: [token sums: sum_k p_nk b_k] -> one gradient pass per side.
soft_quantize: stats with the argmax and the soft values (attention's forward). Its gradient: one
pass per side (attention's backward), plus the chosen codes' sums (`code_stats`) for the hard value.
"""

from __future__ import annotations

import torch

from ..common import (
    chosen_code_sums,
    code_bias,
    entropy_grad_coefs,
    entropy_outputs,
    soft_grad_inputs,
    soft_quantize_grad_inputs,
    softmax_kept,
)
from ._launch import interpreted_precision
from ._softmax_grad import softmax_grad
from ._softmax_passes import code_sums, softmax_stats, token_sums
from .code_stats import code_stats


def code_entropy(
    x: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float,
    log_clamp_min: float | None,
    metric: str = "l2",
    precision: str = "ieee",
):
    """Triton twin of `fastvq.ops.chunked_soft.code_entropy`: (entropy (H, N), mean_probs (H, K), norm
    (2, H, N), kept_mass (H, N)), fp32."""
    precision = interpreted_precision(precision)
    norm = torch.full((2, *x.shape[:2]), float("nan"), device=x.device, dtype=torch.float32)
    entropy, kept_mass = (
        torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32),
        torch.ones(x.shape[:2], device=x.device, dtype=torch.float32),
    )
    prob_sums = torch.zeros(x.shape[0], codebook.shape[1], device=x.device, dtype=torch.float32)
    if x.shape[1]:
        bias = code_bias(codebook, metric, precision)
        stats = softmax_stats(x, codebook, bias, metric, precision, 1.0 / temperature, entropy=log_clamp_min is None)
        norm = stats["norm"]
        if log_clamp_min is None:
            entropy = stats["entropy"]
        else:
            p_log_p, kept_mass = token_sums(
                x, codebook, bias, norm, metric, precision, 1.0 / temperature, log_clamp_min=log_clamp_min
            )
            entropy = -p_log_p
        prob_sums = code_sums(x, codebook, bias, norm, softmax_kept(norm, mask), metric, precision, 1.0 / temperature)
    return *entropy_outputs(entropy, prob_sums, norm, mask), norm, kept_mass


def code_entropy_grad(
    x: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    norm: torch.Tensor,
    entropy: torch.Tensor,
    kept_mass: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_mean_probs: torch.Tensor | None,
    *,
    temperature: float,
    log_clamp_min: float | None,
    metric: str = "l2",
    precision: str = "ieee",
    x_grad: bool = True,
    codebook_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.chunked_soft.code_entropy_grad`."""
    precision = interpreted_precision(precision)
    bias = code_bias(codebook, metric, precision)
    kept = softmax_kept(norm, mask)
    x, norm = soft_grad_inputs(x, norm, kept)
    expectation = None
    if grad_mean_probs is not None and x.shape[1]:
        expectation = token_sums(
            x, codebook, bias, norm, metric, precision, 1.0 / temperature, code_values=grad_mean_probs
        )[0]
    coefs = entropy_grad_coefs(kept, entropy, kept_mass, grad_entropy, expectation)
    return softmax_grad(
        x,
        codebook,
        bias,
        norm,
        coefs,
        metric,
        precision,
        1.0 / temperature,
        log_term=True,
        log_clamp_min=log_clamp_min,
        code_values=grad_mean_probs,
        x_grad=x_grad,
        codebook_grad=codebook_grad,
    )


def soft_quantize(
    x: torch.Tensor, codebook: torch.Tensor, *, temperature: float, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.chunked_soft.soft_quantize`: (indices (H, N) int64, norm (2, H, N)
    fp32, soft values (H, N, D) fp32)."""
    if not x.shape[1]:
        return (
            torch.empty(x.shape[:2], dtype=torch.int64, device=x.device),
            torch.empty((2, *x.shape[:2]), device=x.device, dtype=torch.float32),
            torch.empty(x.shape, device=x.device, dtype=torch.float32),
        )
    precision = interpreted_precision(precision)
    stats = softmax_stats(
        x, codebook, code_bias(codebook, metric, precision), metric, precision, 1.0 / temperature, soft=True
    )
    kept = softmax_kept(stats["norm"], None)
    return (stats["indices"].masked_fill(~kept, -1), stats["norm"], stats["values"].masked_fill(~kept[..., None], 0.0))


def soft_quantize_grad(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    norm: torch.Tensor,
    soft_values: torch.Tensor,
    grad: torch.Tensor,
    *,
    hard: bool,
    temperature: float,
    metric: str = "l2",
    precision: str = "ieee",
    x_grad: bool = True,
    codebook_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.chunked_soft.soft_quantize_grad`."""
    precision = interpreted_precision(precision)
    kept, x_kept, norm, grad_kept, coefs = soft_quantize_grad_inputs(x, indices, norm, soft_values, grad)
    bias = code_bias(codebook, metric, precision)
    out_x, out_c = softmax_grad(
        x_kept,
        codebook,
        bias,
        norm,
        coefs,
        metric,
        precision,
        1.0 / temperature,
        grad_values=grad_kept,
        soft_value_path=not hard,
        x_grad=x_grad,
        codebook_grad=codebook_grad,
    )
    if codebook_grad and hard:
        out_c += chosen_code_sums(code_stats, grad_kept, indices, codebook.shape)
    return (torch.where(kept[..., None], out_x, grad.float()) if x_grad else out_x), out_c
