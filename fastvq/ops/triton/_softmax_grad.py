"""The gradient pass of the soft ops over a codebook (`code_softmax`): kernel and launcher.

As code_cross_entropy's gradient, with other weights: every tile recomputes its logits and
    dL/dl = p (u (psi - Psi) + w (b - B) + G . c - G . z) / T      (`fastvq.ops.chunked_soft`),
then programs that own tokens stream the codes and accumulate sum_k m c - x sum_k q, or programs that
own codes stream the tokens and accumulate sum_n m x - c sum_n q (plus sum_n p G_n for the soft value
path), m and q from `logit_grad_factors`. Splits of the streamed side write partials added in a fixed
order: deterministic, no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, grad_config
from ._softmax_passes import grad_precision, load_norm, pass_config
from ._tiles import dot_options, dot_tile, load_tile, logit_grad_factors, logits, resident_tile


@triton.jit
def _grad_dot(
    g_head,
    c_head,
    g_tile,
    c_tile,
    offs_n,
    n_mask,
    offs_k,
    k_mask,
    D,
    stride_gn,
    stride_gd,
    stride_ck,
    stride_cd,
    GRAD_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
):
    """G . c (BLOCK_N, BLOCK_K) fp32 with G (H, N, D) fp32 and the codes as fp32 operands."""
    if SINGLE_D_TILE:
        return tl.dot(g_tile, c_tile.to(tl.float32), input_precision=GRAD_PRECISION)
    else:
        gdot, _ = dot_tile(
            g_head,
            c_head,
            None,
            None,
            offs_n,
            n_mask,
            offs_k,
            k_mask,
            D,
            stride_gn,
            stride_gd,
            stride_ck,
            stride_cd,
            GRAD_PRECISION,
            0,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            False,
        )
        return gdot


@triton.jit
def _grad_weights(
    dot,
    x_sq,
    bias,
    row_max,
    log_sum,
    coef_ptr,
    coef_offs,
    stride_cp,
    n_mask,
    b,
    gdot,
    k_mask,
    inv_temperature,
    clamp_min,
    log_clamp_min,
    METRIC: tl.constexpr,
    LOG_TERM: tl.constexpr,
    MEAN_TERM: tl.constexpr,
    G_TERM: tl.constexpr,
):
    """(dL/dlogit = p (u (psi - Psi) + w (b - B) + G.c - G.z) / T, p, logit), each (BLOCK_N, BLOCK_K) fp32,
    coef (5, H, N) holding u, Psi, w, B, G.z; 0 outside the masks and where p = 0."""
    logit = logits(dot, x_sq, bias, METRIC)
    log_p = (logit * inv_temperature - row_max[:, None]) - log_sum[:, None]
    p = tl.where(n_mask[:, None] & k_mask[None, :], tl.exp(log_p), 0.0)
    phi = tl.zeros_like(p)
    if LOG_TERM:
        u = tl.load(coef_ptr + coef_offs, mask=n_mask, other=0.0)
        psi_mean = tl.load(coef_ptr + stride_cp + coef_offs, mask=n_mask, other=0.0)
        phi += u[:, None] * (tl.where(p >= clamp_min, log_p + 1.0, log_clamp_min) - psi_mean[:, None])
    if MEAN_TERM:
        w = tl.load(coef_ptr + 2 * stride_cp + coef_offs, mask=n_mask, other=0.0)
        b_mean = tl.load(coef_ptr + 3 * stride_cp + coef_offs, mask=n_mask, other=0.0)
        phi += w[:, None] * (b[None, :] - b_mean[:, None])
    if G_TERM:
        g_mean = tl.load(coef_ptr + 4 * stride_cp + coef_offs, mask=n_mask, other=0.0)
        phi += gdot - g_mean[:, None]
    return tl.where(p > 0, p * phi, 0.0) * inv_temperature, p, logit


@triton.jit
def _code_rows(
    x_head,
    c_head,
    g_head,
    bias_ptr,
    norm_ptr,
    coef_ptr,
    value_ptr,
    pid_row,
    lo,
    offs_do,
    do_mask,
    N,
    K,
    D,
    per_split,
    token_offset,
    inv_temperature,
    clamp_min,
    log_clamp_min,
    stride_xn,
    stride_xd,
    stride_ck,
    stride_cd,
    stride_gn,
    stride_gd,
    stride_np,
    stride_cp,
    METRIC: tl.constexpr,
    LOG_TERM: tl.constexpr,
    MEAN_TERM: tl.constexpr,
    G_TERM: tl.constexpr,
    SOFT_VALUES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """A block of codes streaming the tokens of one split: (sum_n m x (+ p G), sum_n q, offs_k, k_mask)."""
    offs_k = pid_row * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    c_tile = resident_tile(c_head, offs_k, k_mask, D, stride_ck, stride_cd, CAST, BLOCK_D, SINGLE_D_TILE, True)
    bias = tl.load(bias_ptr + offs_k, mask=k_mask, other=0.0)
    b = tl.zeros([BLOCK_K], tl.float32)
    if MEAN_TERM:
        b = tl.load(value_ptr + offs_k, mask=k_mask, other=0.0)
    acc = tl.zeros([BLOCK_K, BLOCK_DO], tl.float32)
    q_sum = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(lo, tl.minimum(lo + per_split, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < tl.minimum(lo + per_split, N)
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
        row_max, log_sum = load_norm(norm_ptr, token_offset + offs_n, stride_np, n_mask)
        gdot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if G_TERM:
            g_tile = resident_tile(g_head, offs_n, n_mask, D, stride_gn, stride_gd, 0, BLOCK_D, SINGLE_D_TILE, False)
            gdot = _grad_dot(
                g_head,
                c_head,
                g_tile,
                c_tile,
                offs_n,
                n_mask,
                offs_k,
                k_mask,
                D,
                stride_gn,
                stride_gd,
                stride_ck,
                stride_cd,
                GRAD_PRECISION,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
                SINGLE_D_TILE,
            )
        w, p, logit = _grad_weights(
            dot,
            x_sq,
            bias,
            row_max,
            log_sum,
            coef_ptr,
            token_offset + offs_n,
            stride_cp,
            n_mask,
            b,
            gdot,
            k_mask,
            inv_temperature,
            clamp_min,
            log_clamp_min,
            METRIC,
            LOG_TERM,
            MEAN_TERM,
            G_TERM,
        )
        m, q = logit_grad_factors(w, logit, dot, x_sq, bias, METRIC, True)
        if SINGLE_D_TILE:
            x_out = x_tile.to(tl.float32)
        else:
            x_out = load_tile(x_head, offs_n, offs_do, stride_xn, stride_xd, n_mask, do_mask, CAST).to(tl.float32)
        acc = tl.dot(tl.trans(m), x_out, acc, input_precision=GRAD_PRECISION)
        if SOFT_VALUES:
            if SINGLE_D_TILE:  # the whole rows of G, loaded above
                g_out = g_tile
            else:
                g_out = load_tile(g_head, offs_n, offs_do, stride_gn, stride_gd, n_mask, do_mask, 0)
            acc = tl.dot(tl.trans(p), g_out, acc, input_precision=GRAD_PRECISION)
        q_sum += tl.sum(q, axis=0)
    return acc, q_sum, offs_k, k_mask


@triton.jit
def _token_rows(
    x_head,
    c_head,
    g_head,
    bias_ptr,
    norm_ptr,
    coef_ptr,
    value_ptr,
    pid_row,
    lo,
    offs_do,
    do_mask,
    N,
    K,
    D,
    per_split,
    token_offset,
    inv_temperature,
    clamp_min,
    log_clamp_min,
    stride_xn,
    stride_xd,
    stride_ck,
    stride_cd,
    stride_gn,
    stride_gd,
    stride_np,
    stride_cp,
    METRIC: tl.constexpr,
    LOG_TERM: tl.constexpr,
    MEAN_TERM: tl.constexpr,
    G_TERM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """A block of tokens streaming the codes of one split: (sum_k m c, sum_k q, offs_n, n_mask)."""
    offs_n = pid_row * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_tile = resident_tile(x_head, offs_n, n_mask, D, stride_xn, stride_xd, CAST, BLOCK_D, SINGLE_D_TILE, False)
    g_tile = resident_tile(g_head, offs_n, n_mask, D, stride_gn, stride_gd, 0, BLOCK_D, SINGLE_D_TILE and G_TERM, False)
    row_max, log_sum = load_norm(norm_ptr, token_offset + offs_n, stride_np, n_mask)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    q_sum = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(lo, tl.minimum(lo + per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < tl.minimum(lo + per_split, K)
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
        bias = tl.load(bias_ptr + offs_k, mask=k_mask, other=0.0)
        b = tl.zeros([BLOCK_K], tl.float32)
        if MEAN_TERM:
            b = tl.load(value_ptr + offs_k, mask=k_mask, other=0.0)
        gdot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if G_TERM:
            gdot = _grad_dot(
                g_head,
                c_head,
                g_tile,
                c_tile,
                offs_n,
                n_mask,
                offs_k,
                k_mask,
                D,
                stride_gn,
                stride_gd,
                stride_ck,
                stride_cd,
                GRAD_PRECISION,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
                SINGLE_D_TILE,
            )
        w, _, logit = _grad_weights(
            dot,
            x_sq,
            bias,
            row_max,
            log_sum,
            coef_ptr,
            token_offset + offs_n,
            stride_cp,
            n_mask,
            b,
            gdot,
            k_mask,
            inv_temperature,
            clamp_min,
            log_clamp_min,
            METRIC,
            LOG_TERM,
            MEAN_TERM,
            G_TERM,
        )
        m, q = logit_grad_factors(w, logit, dot, x_sq, bias, METRIC, False)
        if SINGLE_D_TILE:
            c_out = tl.trans(c_tile).to(tl.float32)
        else:
            c_out = load_tile(c_head, offs_k, offs_do, stride_ck, stride_cd, k_mask, do_mask, CAST).to(tl.float32)
        acc = tl.dot(m, c_out, acc, input_precision=GRAD_PRECISION)
        q_sum += tl.sum(q, axis=1)
    return acc, q_sum, offs_n, n_mask


@triton.jit
def _softmax_grad_kernel(
    x_ptr,
    code_ptr,
    bias_ptr,
    norm_ptr,
    coef_ptr,
    value_ptr,
    g_ptr,
    out_ptr,
    N,
    K,
    D,
    per_split,
    inv_temperature,
    clamp_min,
    log_clamp_min,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ch,
    stride_ck,
    stride_cd,
    stride_bh,
    stride_np,
    stride_cp,
    stride_gh,
    stride_gn,
    stride_gd,
    stride_os,
    stride_oh,
    stride_or,
    CODE_SIDE: tl.constexpr,
    METRIC: tl.constexpr,
    LOG_TERM: tl.constexpr,
    MEAN_TERM: tl.constexpr,
    G_TERM: tl.constexpr,
    SOFT_VALUES: tl.constexpr,
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
    codes of token head h when CODE_SIDE) and one BLOCK_DO chunk of D, and streams the other side.
    norm (2, H, N) and coef (5, H, N) contiguous; values b (H, K) contiguous; G (H, N, D) fp32."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    d_chunks = tl.cdiv(D, BLOCK_DO)
    pid_row = (pid_r // d_chunks).to(tl.int64)
    offs_do = (pid_r % d_chunks) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_mask = offs_do < D
    x_head = x_ptr + pid_h * stride_xh
    c_head = code_ptr + pid_h * stride_ch
    g_head = g_ptr + pid_h * stride_gh
    lo = pid_s.to(tl.int64) * per_split
    if CODE_SIDE:
        acc, q_sum, offs_r, r_mask = _code_rows(
            x_head,
            c_head,
            g_head,
            bias_ptr + pid_h * stride_bh,
            norm_ptr,
            coef_ptr,
            value_ptr + pid_h * K,
            pid_row,
            lo,
            offs_do,
            do_mask,
            N,
            K,
            D,
            per_split,
            pid_h * N,
            inv_temperature,
            clamp_min,
            log_clamp_min,
            stride_xn,
            stride_xd,
            stride_ck,
            stride_cd,
            stride_gn,
            stride_gd,
            stride_np,
            stride_cp,
            METRIC,
            LOG_TERM,
            MEAN_TERM,
            G_TERM,
            SOFT_VALUES,
            INPUT_PRECISION,
            GRAD_PRECISION,
            CAST,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            SINGLE_D_TILE,
            BLOCK_DO,
        )
        rows = load_tile(c_head, offs_r, offs_do, stride_ck, stride_cd, r_mask, do_mask, CAST).to(tl.float32)
    else:
        acc, q_sum, offs_r, r_mask = _token_rows(
            x_head,
            c_head,
            g_head,
            bias_ptr + pid_h * stride_bh,
            norm_ptr,
            coef_ptr,
            value_ptr + pid_h * K,
            pid_row,
            lo,
            offs_do,
            do_mask,
            N,
            K,
            D,
            per_split,
            pid_h * N,
            inv_temperature,
            clamp_min,
            log_clamp_min,
            stride_xn,
            stride_xd,
            stride_ck,
            stride_cd,
            stride_gn,
            stride_gd,
            stride_np,
            stride_cp,
            METRIC,
            LOG_TERM,
            MEAN_TERM,
            G_TERM,
            INPUT_PRECISION,
            GRAD_PRECISION,
            CAST,
            BLOCK_N,
            BLOCK_K,
            BLOCK_D,
            SINGLE_D_TILE,
            BLOCK_DO,
        )
        rows = load_tile(x_head, offs_r, offs_do, stride_xn, stride_xd, r_mask, do_mask, CAST).to(tl.float32)
    out = pid_s.to(tl.int64) * stride_os + pid_h * stride_oh + offs_r[:, None] * stride_or + offs_do[None, :]
    tl.store(out_ptr + out, acc - rows * q_sum[:, None], mask=r_mask[:, None] & do_mask[None, :])


def grad_pass_config(n_tokens, n_codes, dim, heads, precision, device, code_side: bool, g_term: bool) -> dict:
    """Tiles, splits and launch options of one side of the gradient: code_cross_entropy's (`grad_config`),
    shrunk for exact products (`pass_config`), with three changes that keep every variant free of
    register spills on sm_90 under both triton 3.6 and 3.9 (ptxas allocates differently; measured by
    tests/gpu_compile.py): soft_quantize's codes side (g_term, a G tile more) pipelines 3 stages with
    one D tile (bf16, D = 16: 2 stages spill 12 B under 3.9) and takes 32-wide blocks and 1 stage when
    D is streamed (64-wide spill 148 B under 3.6, 2 stages 24 B under 3.9); the tokens side of exact
    products with one D tile pipelines 3 stages (2 spill 8 B under 3.6)."""
    n_rows, n_stream = (n_codes, n_tokens) if code_side else (n_tokens, n_codes)
    cfg = pass_config(grad_config(n_rows, n_stream, dim, heads, device, code_side), dim, precision)
    if INTERPRETED:
        return cfg
    if code_side and g_term and not cfg["SINGLE_D_TILE"]:
        cfg.update(BLOCK_N=32, BLOCK_K=32, num_stages=1)
    if cfg["SINGLE_D_TILE"] and ((code_side and g_term) or (not code_side and precision == "ieee")):
        cfg["num_stages"] = 3
    return cfg


def softmax_grad(
    x,
    codebook,
    bias,
    norm,
    coefs,
    metric,
    precision,
    inv_temperature,
    *,
    log_term=False,
    log_clamp_min=None,
    code_values=None,
    grad_values=None,
    soft_value_path=False,
    x_grad=True,
    codebook_grad=True,
):
    """Gradients (fp32) w.r.t. x (H, N, D) and the codebook (Hc, K, D) (empty when not asked for) of
    dL/dl_nk = p_nk (u_n (psi_nk - Psi_n) + w_n (b_k - B_n) + G_n . c_k - G_n . z_n) / T
    (`fastvq.ops.chunked_soft`): coefs (5, H, N) fp32 = (u, Psi, w, B, G . z); the first term only
    with log_term, the second with b = code_values (H, K), the third with G = grad_values (H, N, D)
    fp32; soft_value_path adds sum_n p_nk G_n to the codebook's. Tokens without gradient: norm's max
    +inf and finite rows of x."""
    heads, n_tokens, dim = x.shape
    n_codes = codebook.shape[1]
    clamp = log_clamp_min or 0.0
    shared = codebook.shape[0] == 1
    norm, coefs = norm.contiguous(), coefs.contiguous()
    values = norm if code_values is None else code_values.float().contiguous()
    g = norm.new_zeros((1, 1, 1)) if grad_values is None else grad_values.contiguous()
    grads = []
    for code_side, needed in ((False, x_grad), (True, codebook_grad)):
        out_shape = (heads, n_codes, dim) if code_side else x.shape
        if not needed or n_tokens == 0:
            grads.append(torch.zeros(out_shape if needed else 0, dtype=torch.float32, device=x.device))
            continue
        cfg = grad_pass_config(n_tokens, n_codes, dim, heads, precision, x.device, code_side, grad_values is not None)
        splits, per_split = cfg.pop("splits"), cfg.pop("per_split")
        partial = torch.empty((splits, *out_shape), dtype=torch.float32, device=x.device)
        row_blocks = triton.cdiv(n_codes if code_side else n_tokens, cfg["BLOCK_K" if code_side else "BLOCK_N"])
        _softmax_grad_kernel[(row_blocks * triton.cdiv(dim, cfg["BLOCK_DO"]), splits, heads)](
            x,
            codebook,
            bias,
            norm,
            coefs,
            values,
            g,
            partial,
            n_tokens,
            n_codes,
            dim,
            per_split,
            inv_temperature,
            clamp,
            math.log(clamp) if clamp else 0.0,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            0 if shared else codebook.stride(0),
            codebook.stride(1),
            codebook.stride(2),
            0 if shared else bias.stride(0),
            norm.stride(0),
            coefs.stride(0),
            g.stride(0),
            g.stride(1),
            g.stride(2),
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            CODE_SIDE=code_side,
            METRIC=metric,
            LOG_TERM=log_term,
            MEAN_TERM=code_values is not None,
            G_TERM=grad_values is not None,
            SOFT_VALUES=soft_value_path,
            GRAD_PRECISION=grad_precision(precision),
            **dot_options(precision),
            **cfg,
        )
        grad = partial.sum(dim=0)
        grads.append(grad.sum(dim=0, keepdim=True) if code_side and shared else grad)
    return tuple(grads)
