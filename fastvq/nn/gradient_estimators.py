"""Gradient estimators of the quantize step: how the gradient of the quantized output reaches the
input, whose value it replaces by a code. Both are O(N D) and keep no D x D matrix.

`straight_through`: the identity (van den Oord et al. 2017). `rotate_to`: the rotation trick (Fifty
et al. 2024), vector-quantize-pytorch 1.32.0's default for dim > 1.
"""

from __future__ import annotations

import torch

from .kmeans import L2NORM_EPS

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
