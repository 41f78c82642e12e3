"""Tile helpers every fastvq kernel shares: operand loads, the x.c product tile and its scores.

A score tile always pairs BLOCK_N tokens (rows) with BLOCK_K codes (columns). Operands are loaded
as fp32 (CAST=0), bf16 (1) or fp16 (2) for `tl.dot`; accumulation is fp32. When a token row fits
one BLOCK_D tile (SINGLE_D_TILE) a kernel loads the side it keeps for the whole loop once (a
"resident" tile) and passes both tiles in; otherwise the tiles are None and D is streamed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import common

COSINE_NORM_EPS = tl.constexpr(common.COSINE_NORM_EPS)
L2_LOGIT_EPS = tl.constexpr(common.L2_LOGIT_EPS)


def dot_options(precision: str) -> dict:
    """The INPUT_PRECISION and CAST constexprs of a product in `precision` (see `fastvq.ops.common.PRECISIONS`)."""
    return dict(
        INPUT_PRECISION="tf32" if precision == "tf32" else "ieee",
        CAST={"ieee": 0, "tf32": 0, "bf16": 1, "fp16": 2}[precision],
    )


@triton.jit
def load_tile(ptr, row_offs, col_offs, row_stride, col_stride, row_mask, col_mask, CAST: tl.constexpr):
    """A (rows, cols) tile, zero-padded, as fp32 (CAST=0), bf16 (1) or fp16 (2) for tl.dot."""
    tile = tl.load(
        ptr + row_offs[:, None] * row_stride + col_offs[None, :] * col_stride,
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    if CAST == 1:
        return tile.to(tl.bfloat16)
    elif CAST == 2:
        return tile.to(tl.float16)
    else:
        return tile.to(tl.float32)


@triton.jit
def resident_tile(
    ptr,
    offs,
    mask,
    D,
    stride_row,
    stride_d,
    CAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    AS_CODES: tl.constexpr,
):
    """Whole rows `offs` of a (rows, D) matrix: (len, BLOCK_D), or (BLOCK_D, len) when AS_CODES (the
    right operand of the product); None when D is streamed in chunks instead."""
    if SINGLE_D_TILE:
        offs_d = tl.arange(0, BLOCK_D)
        if AS_CODES:
            return load_tile(ptr, offs_d, offs, stride_d, stride_row, offs_d < D, mask, CAST)
        else:
            return load_tile(ptr, offs, offs_d, stride_row, stride_d, mask, offs_d < D, CAST)
    else:
        return  # a bare return: triton 3.6 rejects `return None` here (3.9 accepts both)


@triton.jit
def dot_tile(
    x_head,
    c_head,
    x_tile,
    c_tile,
    offs_n,
    n_mask,
    offs_k,
    k_mask,
    D,
    stride_xn,
    stride_xd,
    stride_ck,
    stride_cd,
    INPUT_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
):
    """x.c (BLOCK_N, BLOCK_K) and |x|^2 (BLOCK_N,), fp32, both from the operands the product sees.

    SINGLE_D_TILE: x_tile (BLOCK_N, BLOCK_D) and c_tile (BLOCK_D, BLOCK_K) hold the whole rows (see
    `resident_tile`); otherwise they are None and D is streamed in BLOCK_D chunks. A caller that
    does not use |x|^2 pays nothing for it (the compiler drops it).
    """
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if SINGLE_D_TILE:
        acc = tl.dot(x_tile, c_tile, acc, input_precision=INPUT_PRECISION)
        x_f32 = x_tile.to(tl.float32)
        x_sq = tl.sum(x_f32 * x_f32, axis=1)
    else:
        x_sq = tl.zeros([BLOCK_N], tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d_mask = (d0 + offs_d) < D
            xt = load_tile(x_head, offs_n, d0 + offs_d, stride_xn, stride_xd, n_mask, d_mask, CAST)
            ct = load_tile(c_head, d0 + offs_d, offs_k, stride_cd, stride_ck, d_mask, k_mask, CAST)
            acc = tl.dot(xt, ct, acc, input_precision=INPUT_PRECISION)
            x_f32 = xt.to(tl.float32)
            x_sq += tl.sum(x_f32 * x_f32, axis=1)
    return acc, x_sq


@triton.jit
def rank_score(dot, bias, METRIC: tl.constexpr):
    """Score that ranks codes as the distance does, without the per-token constant; lower is nearer.
    bias (BLOCK_K,) is `fastvq.ops.common.code_bias`: |c|^2 (l2: score |c|^2 - 2 x.c), 1 / |c| (cosine:
    score -(x.c) / |c|) or 0 (dot: score -(x.c)); NaN for a non-finite code."""
    if METRIC == "cosine":
        return -dot * bias[None, :]
    elif METRIC == "dot":
        return bias[None, :] - dot
    else:
        return bias[None, :] - 2.0 * dot


@triton.jit
def inv_norm(sq):
    """1 / max(sqrt(sq), eps), as `torch.nn.functional.normalize` scales a vector."""
    return 1.0 / tl.maximum(tl.sqrt(sq), COSINE_NORM_EPS)


@triton.jit
def logits(dot, x_sq, bias, METRIC: tl.constexpr):
    """vector-quantize-pytorch 1.32.0's logits of a tile (higher is nearer), fp32 (BLOCK_N, BLOCK_K).

    l2: -sqrt(max(|x|^2 + |c|^2 - 2 x.c, 1e-8)) with bias = |c|^2; cosine: x.c / (max(|x|, eps)
    max(|c|, eps)) with bias = 1 / max(|c|, eps); dot: x.c + bias (0, NaN for a non-finite code).
    x_sq is |x|^2 (BLOCK_N,) from `dot_tile`.
    """
    if METRIC == "cosine":
        return dot * bias[None, :] * inv_norm(x_sq)[:, None]
    elif METRIC == "dot":
        return dot + bias[None, :]
    else:
        sq_dist = x_sq[:, None] + bias[None, :] - 2.0 * dot
        return -tl.sqrt(tl.maximum(sq_dist, L2_LOGIT_EPS, propagate_nan=tl.PropagateNan.ALL))  # NaN stays NaN


@triton.jit
def logit_grad_factors(w, logit, dot, x_sq, bias, METRIC: tl.constexpr, CODE_SIDE: tl.constexpr):
    """(m, q), fp32 (BLOCK_N, BLOCK_K), that turn a tile of w = dL/dlogit into gradients:
    sum_k w dlogit/dx_n = sum_k m c_k - x_n sum_k q (tokens' side) and sum_n w dlogit/dc_k =
    sum_n m x_n - c_k sum_n q (CODE_SIDE). l2: m = q = w / sqrt(d) where the clamp d >= 1e-8 is
    inactive; cosine: m = w / (|x| |c|), q = w logit / |x|^2 (tokens' side) or / |c|^2 (codes' side);
    dot: m = w, q = 0. dot, x_sq, bias as for `logits`."""
    if METRIC == "dot":
        m = w
        q = tl.zeros_like(w)
    elif METRIC == "cosine":
        inv_x = inv_norm(x_sq)
        m = w * inv_x[:, None] * bias[None, :]
        if CODE_SIDE:  # bias = 1 / max(|c|, eps): the clamp is active where bias reaches 1 / eps
            q = w * logit * tl.where(bias < 1.0 / COSINE_NORM_EPS, bias * bias, 0.0)[None, :]
        else:
            q = w * logit * tl.where(tl.sqrt(x_sq) >= COSINE_NORM_EPS, inv_x * inv_x, 0.0)[:, None]
    else:
        sq_dist = x_sq[:, None] + bias[None, :] - 2.0 * dot
        m = tl.where(sq_dist >= L2_LOGIT_EPS, w / -logit, 0.0)
        q = m
    return m, q
