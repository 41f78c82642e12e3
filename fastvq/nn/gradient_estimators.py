"""Gradient estimators of the quantize step: how the gradient of the quantized output reaches the
input, whose value it replaces by a code. All are O(N D) and keep no D x D matrix.

`straight_through`: the identity (van den Oord et al. 2017). `rotate_to`: the rotation trick (Fifty
et al. 2024), vector-quantize-pytorch 1.32.0's default for dim > 1. `directional_reparam`: DiVeQ's
directional reparametrisation (vector-quantize-pytorch's `directional_reparam` and
`ResidualVQ(diveq=True)`). `softmax_straight_through`: the codes' values with the gradient of the
softmax over every code (the straight-through Gumbel softmax of 1.32.0's `straight_through=True`).
"""

from __future__ import annotations

import math

import torch

from ..ops.functional_soft import soft_quantize
from .kmeans import L2NORM_EPS, l2norm
from .layout import from_head_layout, to_head_layout

SAFE_DIV_EPS = 1e-6


def _rotation(src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row terms (..., 1) of the rotation trick for src, tgt (..., D), from three row reductions.

    With u = src / |src|, q = tgt / |tgt| (norms clamped to SAFE_DIV_EPS) and w = l2norm(u + q) =
    src / (|src| n) + tgt / (|tgt| n), n = max(|u + q|, L2NORM_EPS), the rotation R v = v - 2 (v.w) w +
    2 (v.u) q and its transpose (q and u swapped) are v + a src + b tgt, with a and b from v.src and
    v.tgt (`_rotate`). -> 1 / (|src| n), 1 / (|tgt| n), 1 / (|src| |tgt|), the rescaling |tgt| / |src|,
    src.src and src.tgt. |u + q| is the norm of the sum itself (a transient (..., D) tensor): from the
    reductions, sqrt(|u|^2 + 2 u.q + |q|^2) cancels where src and tgt point nearly opposite ways.
    """
    src_norm = torch.linalg.vector_norm(src, dim=-1, keepdim=True)
    tgt_norm = torch.linalg.vector_norm(tgt, dim=-1, keepdim=True)
    src_tgt = (src * tgt).sum(-1, keepdim=True)
    src_safe, tgt_safe = src_norm.clamp_min(SAFE_DIV_EPS), tgt_norm.clamp_min(SAFE_DIV_EPS)
    inv_st = 1 / (src_safe * tgt_safe)
    n = torch.linalg.vector_norm(src / src_safe + tgt / tgt_safe, dim=-1, keepdim=True).clamp_min(L2NORM_EPS)
    return 1 / (src_safe * n), 1 / (tgt_safe * n), inv_st, tgt_norm / src_safe, src_norm.square(), src_tgt


def _rotate(v, src, tgt, v_src, v_tgt, terms, transpose: bool) -> torch.Tensor:
    """(R v or R^T v) times the rescaling, for v (..., D) with its row products v_src, v_tgt (..., 1)
    and `terms` of `_rotation`: two fused multiply-adds over the rows, no (..., D) constant."""
    inv_sn, inv_tn, inv_st, scale = terms[:4]
    vw2 = 2 * (v_src * inv_sn + v_tgt * inv_tn)  # 2 (v.w) / n, less the 1 / |src|, 1 / |tgt| factors
    if transpose:  # v - 2 (v.w) w + 2 (v.q) u
        on_src, on_tgt = 2 * v_tgt * inv_st - vw2 * inv_sn, -vw2 * inv_tn
    else:  # v - 2 (v.w) w + 2 (v.u) q
        on_src, on_tgt = -vw2 * inv_sn, 2 * v_src * inv_st - vw2 * inv_tn
    return (v * scale).addcmul_(src, on_src * scale).addcmul_(tgt, on_tgt * scale)


class _RotateTo(torch.autograd.Function):
    """Forward: the rotation R = I - 2 w w^T + 2 q u^T applied to src, times |tgt| / |src|, which
    equals tgt; backward: the transpose applied to the gradient. Saves src, tgt and six numbers per
    row (autograd of the plain formula keeps three more (..., D) tensors)."""

    @staticmethod
    def forward(ctx, src, tgt):
        terms = _rotation(src, tgt)
        ctx.save_for_backward(src, tgt, *terms)
        return _rotate(src, src, tgt, terms[4], terms[5], terms, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        src, tgt, *terms = ctx.saved_tensors
        grad_src, grad_tgt = (grad * src).sum(-1, keepdim=True), (grad * tgt).sum(-1, keepdim=True)
        return _rotate(grad, src, tgt, grad_src, grad_tgt, terms, transpose=True), None


def rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024, arXiv:2410.06424, sec. 4.2): the values of tgt, with the
    gradient reaching src through the rotation and rescaling that map src onto tgt (treated as
    constants; tgt gets no gradient, and is detached so that nothing upstream of it runs a backward).
    src, tgt (..., D) of one dtype; O(N D), no D x D matrix."""
    return _RotateTo.apply(src, tgt.detach())


def straight_through(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The values of codes with the gradient passed to x unchanged: x + (codes - x).detach().
    x, codes (..., D) of one dtype; codes get no gradient."""
    return x + (codes - x).detach()


def synchronous_update(quantized: torch.Tensor, v: float) -> torch.Tensor:
    """The synchronous update rule (21) of vqtorch (Huh et al. 2023): quantized + v (quantized -
    sg(quantized)), the same values with every gradient through it scaled by 1 + v."""
    return quantized + v * (quantized - quantized.detach())


DIVEQ_VARIANCE = 5e-3
"""The noise variance of `directional_reparam` (1.32.0's default, which `ResidualVQ(diveq=True)` uses)."""


def directional_reparam(src: torch.Tensor, tgt: torch.Tensor, variance: float = DIVEQ_VARIANCE) -> torch.Tensor:
    """DiVeQ's directional reparametrisation (arXiv openreview KRVnpTbx7R, fig. 1; vector-quantize-pytorch
    1.32.0's `directional_reparam`): src plus |tgt - src| along the direction of tgt - src with
    Gaussian noise of `variance` per entry added (drawn with torch.randn_like, then treated as a
    constant). The value is tgt up to that noise; the gradient reaches src and tgt through the length
    |tgt - src| only. src, tgt (..., D) of one dtype -> (..., D)."""
    error = tgt - src
    noisy = error + math.sqrt(variance) * torch.randn_like(error)
    direction = l2norm(noisy).to(error.dtype).detach()
    return src + direction * torch.linalg.vector_norm(error, dim=-1, keepdim=True)


def directional_reparam_heads(
    src: torch.Tensor, tgt: torch.Tensor, variance: float, heads: int, separate: bool
) -> torch.Tensor:
    """`directional_reparam` of a layer's tokens toward their codes, src, tgt (B, S, G, D), with the
    noise drawn in 1.32.0's layout of the heads (`to_head_layout`; with one head, G top-k candidates
    as they are), so that a seed gives 1.32.0's values."""
    if heads == 1:
        return directional_reparam(src, tgt, variance)
    src, tgt = (to_head_layout(t, separate).contiguous() for t in (src, tgt))
    return from_head_layout(directional_reparam(src, tgt, variance), heads, separate)


def softmax_straight_through(
    chosen: torch.Tensor,
    z: torch.Tensor,
    codes: torch.Tensor,
    *,
    temperature: float,
    metric: str,
    precision: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The values of chosen with the gradient of softmax(logits(z) / temperature) as 1.32.0's
    `gumbel_sample(straight_through=True)` sends it: (one_hot + p - p.detach()) @ codes, where the
    gradient reaches z and the codes through p only (the product's value is the one-hot's).

    chosen: (B, S, heads, D) fp32, the chosen (possibly sampled) codes, keeping their own gradient
    (a lookup's, to the chosen codes); z: (B, S, heads, D) the tokens as the codes are compared with
    them; codes: (C, K, D), shared (C = 1) or one codebook per head. The term comes from the fused
    `soft_quantize` (hard=False), whose codebook gradient also has p's value path sum_n p_nk g_n:
    where the codes need a gradient, it runs on [z, 0] and [codes, codes - codes.detach()] (value 0,
    identity gradient) and takes the first half minus the second, so that value path cancels while
    the logits, hence p, are unchanged (the zero half moves no logit or its gradient). No (N, K)
    tensor, forward or backward.
    """
    shared, dim = codes.shape[0] == 1, z.shape[-1]
    rows = z.reshape(1, -1, dim) if shared else z.flatten(0, 1).transpose(0, 1)
    if codes.requires_grad:
        rows = torch.cat([rows, torch.zeros_like(rows)], -1)
        codes = torch.cat([codes, codes - codes.detach()], -1)
    soft, _ = soft_quantize(
        rows, codes, temperature=temperature, metric=metric, hard=False, precision=precision, backend=backend
    )
    if soft.shape[-1] > dim:
        soft = soft[..., :dim] - soft[..., dim:]
    soft = soft.reshape(z.shape) if shared else soft.transpose(0, 1).reshape(z.shape)
    return chosen + (soft - soft.detach())
