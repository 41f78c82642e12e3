"""Fused cross-entropy of the code logits against target codes, forward and backward.

Forward: each program owns BLOCK_N tokens of one head and streams the codes of its split, keeping
an online log-sum-exp (running max, running sum of exp(logit - max)) and the target's logit; the
splits' partials are merged exactly afterwards (max, rescaled sums), as `nearest_code` merges its
splits. Backward: a second streamed pass recomputes each logit tile, weights it by
w = grad (softmax - onehot) with the saved log-sum-exp, and accumulates
    grad_x_n = sum_k m_nk c_k - x_n sum_k q_nk     (programs own tokens, stream codes), or
    grad_c_k = sum_n m_nk x_n - c_k sum_n q_nk     (programs own codes, stream tokens),
where m, q are w times the derivative factors of the logit (see `_grad_weights`). Both sides are
split over the streamed axis and the partial sums added in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import code_bias
from ._launch import grad_config, interpreted_precision, search_config
from ._tiles import dot_options, dot_tile, load_tile, logit_grad_factors, logits, resident_tile


@triton.jit
def _ce_forward_kernel(
    x_ptr,
    code_ptr,
    bias_ptr,
    index_ptr,
    max_ptr,
    sum_ptr,
    target_ptr,
    N,
    K,
    D,
    codes_per_split,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ch,
    stride_ck,
    stride_cd,
    stride_bh,
    stride_oh,
    stride_os,
    METRIC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
):
    """Per split: running max, sum of exp(logit - max) and the target's logit (0 when the target is
    outside the split), each (H, S, N) fp32."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_head = x_ptr + pid_h * stride_xh
    c_head = code_ptr + pid_h * stride_ch
    k_lo = pid_s.to(tl.int64) * codes_per_split
    k_hi = tl.minimum(k_lo + codes_per_split, K)
    x_tile = resident_tile(x_head, offs_n, n_mask, D, stride_xn, stride_xd, CAST, BLOCK_D, SINGLE_D_TILE, False)
    target = tl.load(index_ptr + pid_h * N + offs_n, mask=n_mask, other=-1)

    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    target_logit = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        c_tile = resident_tile(c_head, offs_k, k_mask, D, stride_ck, stride_cd, CAST, BLOCK_D, SINGLE_D_TILE, True)
        dot, x_sq = dot_tile(
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
            INPUT_PRECISION,
            CAST,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            SINGLE_D_TILE,
        )
        bias = tl.load(bias_ptr + pid_h * stride_bh + offs_k, mask=k_mask, other=0.0)
        logit = tl.where(k_mask[None, :], logits(dot, x_sq, bias, METRIC), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logit, axis=1))  # finite: every tile has a code
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logit - new_max[:, None]), axis=1)
        run_max = new_max
        target_logit += tl.sum(tl.where(offs_k[None, :] == target[:, None], logit, 0.0), axis=1)

    out = pid_h * stride_oh + pid_s.to(tl.int64) * stride_os + offs_n
    tl.store(max_ptr + out, run_max, mask=n_mask)
    tl.store(sum_ptr + out, run_sum, mask=n_mask)
    tl.store(target_ptr + out, target_logit, mask=n_mask)


@triton.jit
def _grad_weights(
    dot, x_sq, bias, offs_k, target, lse, grad, n_mask, k_mask, METRIC: tl.constexpr, CODE_SIDE: tl.constexpr
):
    """(m, q), fp32 (BLOCK_N, BLOCK_K), of one tile (`logit_grad_factors`) for
    w = dL/dlogit = grad (exp(logit - lse) - onehot)."""
    logit = logits(dot, x_sq, bias, METRIC)
    onehot = tl.where(offs_k[None, :] == target[:, None], 1.0, 0.0)
    w = grad[:, None] * (tl.exp(logit - lse[:, None]) - onehot)
    w = tl.where(n_mask[:, None] & k_mask[None, :], w, 0.0)
    return logit_grad_factors(w, logit, dot, x_sq, bias, METRIC, CODE_SIDE)


@triton.jit
def _ce_grad_kernel(
    x_ptr,
    code_ptr,
    bias_ptr,
    index_ptr,
    lse_ptr,
    grad_ptr,
    out_ptr,
    N,
    K,
    D,
    per_split,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ch,
    stride_ck,
    stride_cd,
    stride_bh,
    stride_os,
    stride_oh,
    stride_or,
    CODE_SIDE: tl.constexpr,
    METRIC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """Partial gradient (S, H, rows, D) fp32 of one split: a program owns a block of rows (tokens, or
    codes when CODE_SIDE) and one BLOCK_DO chunk of D (the whole D when SINGLE_D_TILE), and streams
    the other side. index, lse and grad are (H, N) contiguous."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    d_chunks = tl.cdiv(D, BLOCK_DO)
    pid_row = (pid_r // d_chunks).to(tl.int64)
    offs_do = (pid_r % d_chunks) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_mask = offs_do < D
    x_head = x_ptr + pid_h * stride_xh
    c_head = code_ptr + pid_h * stride_ch
    lo = pid_s.to(tl.int64) * per_split

    if CODE_SIDE:
        offs_k = pid_row * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        c_tile = resident_tile(c_head, offs_k, k_mask, D, stride_ck, stride_cd, CAST, BLOCK_D, SINGLE_D_TILE, True)
        bias = tl.load(bias_ptr + pid_h * stride_bh + offs_k, mask=k_mask, other=0.0)
        acc = tl.zeros([BLOCK_K, BLOCK_DO], tl.float32)
        q_sum = tl.zeros([BLOCK_K], tl.float32)
        hi = tl.minimum(lo + per_split, N)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            x_tile = resident_tile(x_head, offs_n, n_mask, D, stride_xn, stride_xd, CAST, BLOCK_D, SINGLE_D_TILE, False)
            dot, x_sq = dot_tile(
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
                INPUT_PRECISION,
                CAST,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
                SINGLE_D_TILE,
            )
            target = tl.load(index_ptr + pid_h * N + offs_n, mask=n_mask, other=-1)
            lse = tl.load(lse_ptr + pid_h * N + offs_n, mask=n_mask, other=0.0)
            grad = tl.load(grad_ptr + pid_h * N + offs_n, mask=n_mask, other=0.0)
            m, q = _grad_weights(dot, x_sq, bias, offs_k, target, lse, grad, n_mask, k_mask, METRIC, CODE_SIDE)
            if SINGLE_D_TILE:
                x_out = x_tile.to(tl.float32)
            else:
                x_out = load_tile(x_head, offs_n, offs_do, stride_xn, stride_xd, n_mask, do_mask, CAST).to(tl.float32)
            acc = tl.dot(tl.trans(m), x_out, acc, input_precision=GRAD_PRECISION)
            q_sum += tl.sum(q, axis=0)
        rows = load_tile(c_head, offs_k, offs_do, stride_ck, stride_cd, k_mask, do_mask, CAST).to(tl.float32)
        offs_r = offs_k
        r_mask = k_mask
    else:
        offs_n = pid_row * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_tile = resident_tile(x_head, offs_n, n_mask, D, stride_xn, stride_xd, CAST, BLOCK_D, SINGLE_D_TILE, False)
        target = tl.load(index_ptr + pid_h * N + offs_n, mask=n_mask, other=-1)
        lse = tl.load(lse_ptr + pid_h * N + offs_n, mask=n_mask, other=0.0)
        grad = tl.load(grad_ptr + pid_h * N + offs_n, mask=n_mask, other=0.0)
        acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
        q_sum = tl.zeros([BLOCK_N], tl.float32)
        hi = tl.minimum(lo + per_split, K)
        for k0 in range(lo, hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hi
            c_tile = resident_tile(c_head, offs_k, k_mask, D, stride_ck, stride_cd, CAST, BLOCK_D, SINGLE_D_TILE, True)
            dot, x_sq = dot_tile(
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
                INPUT_PRECISION,
                CAST,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
                SINGLE_D_TILE,
            )
            bias = tl.load(bias_ptr + pid_h * stride_bh + offs_k, mask=k_mask, other=0.0)
            m, q = _grad_weights(dot, x_sq, bias, offs_k, target, lse, grad, n_mask, k_mask, METRIC, CODE_SIDE)
            if SINGLE_D_TILE:
                c_out = tl.trans(c_tile).to(tl.float32)
            else:
                c_out = load_tile(c_head, offs_k, offs_do, stride_ck, stride_cd, k_mask, do_mask, CAST).to(tl.float32)
            acc = tl.dot(m, c_out, acc, input_precision=GRAD_PRECISION)
            q_sum += tl.sum(q, axis=1)
        rows = load_tile(x_head, offs_n, offs_do, stride_xn, stride_xd, n_mask, do_mask, CAST).to(tl.float32)
        offs_r = offs_n
        r_mask = n_mask

    out = pid_s.to(tl.int64) * stride_os + pid_h * stride_oh + offs_r[:, None] * stride_or + offs_do[None, :]
    tl.store(out_ptr + out, acc - rows * q_sum[:, None], mask=r_mask[:, None] & do_mask[None, :])


def code_cross_entropy(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.chunked.code_cross_entropy`: x (H, N, D), codebook (Hc, K, D), indices
    (H, N) int64 in [-1, K) -> loss (H, N) fp32 (0 where the index is -1), log-sum-exp (H, N) fp32."""
    heads, n_tokens, dim = x.shape
    n_codes = codebook.shape[1]
    if n_tokens == 0:
        empty = torch.zeros((heads, 0), dtype=torch.float32, device=x.device)
        return empty, empty.clone()
    precision = interpreted_precision(precision)
    bias = code_bias(codebook, metric, precision)
    cfg = search_config(n_tokens, n_codes, dim, heads, precision, x.device, logits=True)
    splits = cfg.pop("splits")
    codes_per_split = cfg.pop("codes_per_split")
    shared = codebook.shape[0] == 1
    indices = indices.contiguous()
    run_max, run_sum, target_logit = torch.empty((3, heads, splits, n_tokens), dtype=torch.float32, device=x.device)
    _ce_forward_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_N"]), splits, heads)](
        x,
        codebook,
        bias,
        indices,
        run_max,
        run_sum,
        target_logit,
        n_tokens,
        n_codes,
        dim,
        codes_per_split,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        0 if shared else bias.stride(0),
        run_max.stride(0),
        run_max.stride(1),
        METRIC=metric,
        **dot_options(precision),
        **cfg,
    )
    top = run_max.amax(dim=1, keepdim=True)
    lse = top[:, 0] + (run_sum * (run_max - top).exp()).sum(dim=1).log()
    return torch.where(indices < 0, 0.0, lse - target_logit.sum(dim=1)), lse


def code_cross_entropy_grad(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    wrt: str,
    *,
    metric: str = "l2",
    precision: str = "ieee",
) -> torch.Tensor:
    """Triton twin of `fastvq.ops.chunked.code_cross_entropy_grad`: the gradient w.r.t. x (wrt="x",
    (H, N, D) fp32) or the codebook (wrt="codebook", (Hc, K, D) fp32); lse and grad are (H, N)."""
    code_side = wrt == "codebook"
    precision = interpreted_precision(precision)
    bias = code_bias(codebook, metric, precision)
    grad = torch.where(indices < 0, 0.0, grad.float())  # ignored tokens carry no gradient
    indices, lse = indices.contiguous(), lse.contiguous()
    if code_side and codebook.shape[0] == 1 and x.shape[0] > 1:  # a shared codebook sums over all heads
        x = x.reshape(1, -1, x.shape[2])
        indices, lse, grad = indices.reshape(1, -1), lse.reshape(1, -1), grad.reshape(1, -1)
    heads, n_tokens, dim = x.shape
    n_codes = codebook.shape[1]
    out_shape = codebook.shape if code_side else x.shape
    if n_tokens == 0:
        return torch.zeros(out_shape, dtype=torch.float32, device=x.device)
    n_rows, n_stream = (n_codes, n_tokens) if code_side else (n_tokens, n_codes)
    cfg = grad_config(n_rows, n_stream, dim, heads, x.device, code_side)
    splits = cfg.pop("splits")
    per_split = cfg.pop("per_split")
    partial = torch.empty((splits,) + tuple(out_shape), dtype=torch.float32, device=x.device)
    shared = codebook.shape[0] == 1
    row_blocks = triton.cdiv(n_rows, cfg["BLOCK_K" if code_side else "BLOCK_N"])
    grid = (row_blocks * triton.cdiv(dim, cfg["BLOCK_DO"]), splits, heads)
    _ce_grad_kernel[grid](
        x,
        codebook,
        bias,
        indices,
        lse,
        grad,
        partial,
        n_tokens,
        n_codes,
        dim,
        per_split,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        0 if shared else bias.stride(0),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        CODE_SIDE=code_side,
        METRIC=metric,
        GRAD_PRECISION="ieee" if precision == "ieee" else "tf32",
        **dot_options(precision),
        **cfg,
    )
    return partial.sum(dim=0) if splits > 1 else partial[0]
