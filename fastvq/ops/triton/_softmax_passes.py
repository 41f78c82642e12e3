"""The streamed passes of the soft ops over a codebook (`code_softmax`): kernels and their launchers.
None writes an N x K tensor; notation and the gradient's form are in `fastvq.ops.chunked_soft`.

- `softmax_stats` (programs own tokens, stream the codes of a split): online max m of s = logit / T,
  sum S of exp(s - m) and, for the exact entropy, A = sum exp(s - m)(s - m); or the argmax of the
  logits and V = sum exp(s - m) c over one chunk of D (soft values, attention's forward). The splits'
  partials are merged exactly afterwards.
- `token_sums` (tokens, the normaliser known): per token, sum_k p log max(p, c) and sum of the p >= c (clamped
  entropy), or sum_k p b_k (the entropy gradient's expectation).
- `code_sums` (programs own codes, stream tokens): per code, the sum of p over the kept tokens.
(The gradient pass is in `_softmax_grad`.)
Split partials are added in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED, STREAMED_BLOCK_D, grad_config, search_config
from ._tiles import dot_options, dot_tile, load_tile, logits, resident_tile


def grad_precision(precision: str) -> str:
    """Input precision of the products with softmax weights (as code_cross_entropy's gradient)."""
    return "ieee" if precision == "ieee" else "tf32"


def pass_config(cfg: dict, dim: int, precision: str) -> dict:
    """A pass's tiles from `search_config` / `grad_config`, with one rule for how D is cut, so that every
    pass of an op computes bit-identical logits (at temperature 0.01 a rounding difference between
    two passes' logits is multiplied by 100 in log p): one D tile up to 64, else chunks of
    STREAMED_BLOCK_D (a 128-wide tile, which search_config and grad_config allow, spills registers in
    these kernels on sm_90). Exact products on a GPU run on CUDA cores with both operands in registers,
    and every pass here keeps per-pair softmax terms too, so they take 32 x 32 tiles at 4 warps and
    one D tile only up to 32 (one pipeline stage when D is streamed). All without register spills on
    sm_90 under triton 3.6 and 3.9 (tests/gpu_compile.py). Splits stay multiples of the blocks (the
    old ones are multiples of 32)."""
    padded_d = max(16, triton.next_power_of_2(dim))
    single = padded_d <= 64
    if precision == "ieee" and not INTERPRETED:
        single = padded_d <= 32
        cfg.update(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2 if single else 1)
    cfg.update(SINGLE_D_TILE=single, BLOCK_D=padded_d if single else STREAMED_BLOCK_D)
    if "BLOCK_DO" in cfg:
        cfg["BLOCK_DO"] = cfg["BLOCK_D"]
    return cfg
    padded_d = max(16, triton.next_power_of_2(dim))
    single = padded_d <= 32
    cfg.update(
        BLOCK_N=32,
        BLOCK_K=32,
        num_warps=4,
        SINGLE_D_TILE=single,
        BLOCK_D=padded_d if single else 32,
        num_stages=2 if single else 1,
    )
    if "BLOCK_DO" in cfg:
        cfg["BLOCK_DO"] = cfg["BLOCK_D"]
    return cfg


@triton.jit
def load_norm(norm_ptr, offs, stride_np, mask):
    """The normaliser (max of s, log sum exp(s - max)) of tokens offs from norm (2, H, N); +inf and 0
    outside the mask (p = 0 there)."""
    return (
        tl.load(norm_ptr + offs, mask=mask, other=float("inf")),
        tl.load(norm_ptr + stride_np + offs, mask=mask, other=0.0),
    )


@triton.jit
def _softmax_stats_kernel(
    x_ptr,
    code_ptr,
    bias_ptr,
    max_ptr,
    sum_ptr,
    aux_ptr,
    arg_ptr,
    value_ptr,
    N,
    K,
    D,
    codes_per_split,
    d_chunks,
    inv_temperature,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ch,
    stride_ck,
    stride_cd,
    stride_bh,
    stride_oh,
    stride_os,
    stride_vh,
    stride_vs,
    stride_vn,
    METRIC: tl.constexpr,
    ENTROPY: tl.constexpr,
    SOFT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Per split (H, S, N): running max and sum; ENTROPY: aux = A; SOFT: aux = best logit, arg its
    index (int64, -1 when none), values (H, S, N, D) = V over this program's chunk of D (d_chunks
    programs per token block)."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    pid_n = (pid_r // d_chunks).to(tl.int64)
    chunk = pid_r % d_chunks
    offs_dv = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_head = x_ptr + pid_h * stride_xh
    c_head = code_ptr + pid_h * stride_ch
    k_lo = pid_s.to(tl.int64) * codes_per_split
    k_hi = tl.minimum(k_lo + codes_per_split, K)
    x_tile = resident_tile(x_head, offs_n, n_mask, D, stride_xn, stride_xd, CAST, BLOCK_D, SINGLE_D_TILE, False)

    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    run_aux = tl.full([BLOCK_N], float("-inf") if SOFT else 0.0, tl.float32)
    run_arg = tl.full([BLOCK_N], -1, tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
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
        ranked = tl.where(logit == logit, logit, float("-inf"))  # NaN never wins (it still poisons S)
        if SOFT:
            tile_best, tile_arg = tl.max(ranked, axis=1, return_indices=True)  # leftmost on ties
            better = tile_best > run_aux  # strict: an earlier tile keeps a tie
            run_aux = tl.where(better, tile_best, run_aux)
            run_arg = tl.where(better, k0 + tile_arg, run_arg)
            tile_max = tile_best * inv_temperature
        else:
            tile_max = tl.max(ranked, axis=1) * inv_temperature  # = max of s: rounding is monotone
        s = logit * inv_temperature
        new_max = tl.maximum(run_max, tile_max)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - safe)
        e = tl.exp(s - safe[:, None])
        if ENTROPY:  # A' = rescale (A + (m - m') S) + sum e (s - m')
            shift = tl.where(run_sum > 0, (run_max - safe) * run_sum, 0.0)
            run_aux = rescale * (run_aux + shift) + tl.sum(tl.where(e > 0, e * (s - safe[:, None]), 0.0), axis=1)
        if SOFT:
            if SINGLE_D_TILE:
                c_val = tl.trans(c_tile).to(tl.float32)
            else:
                c_val = load_tile(c_head, offs_k, offs_dv, stride_ck, stride_cd, k_mask, dv_mask, CAST).to(tl.float32)
            acc = acc * rescale[:, None] + tl.dot(e, c_val, input_precision=GRAD_PRECISION)
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        run_max = new_max

    out = pid_h * stride_oh + pid_s.to(tl.int64) * stride_os + offs_n
    stats_mask = n_mask & (offs_n * 0 + chunk == 0)  # the first chunk's program stores them
    tl.store(max_ptr + out, run_max, mask=stats_mask)
    tl.store(sum_ptr + out, run_sum, mask=stats_mask)
    tl.store(aux_ptr + out, run_aux, mask=stats_mask)
    if SOFT:
        tl.store(arg_ptr + out, run_arg, mask=stats_mask)
        v_out = pid_h * stride_vh + pid_s.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vn + offs_dv[None, :]
        tl.store(value_ptr + v_out, acc, mask=n_mask[:, None] & dv_mask[None, :])


def _stats_config(n_tokens, n_codes, dim, heads, precision, device, soft: bool) -> dict:
    """`pass_config`'s tiles (from search_config) for per-pair logits. With soft values a (BLOCK_N,
    BLOCK_DV) accumulator joins them, leaving D cut as every pass cuts it: the whole row when D is one
    tile, else chunks of 64, one program per chunk; code blocks of at most 64."""
    cfg = pass_config(search_config(n_tokens, n_codes, dim, heads, precision, device, logits=True), dim, precision)
    cfg["BLOCK_DV"] = 16
    if soft:
        cfg["BLOCK_DV"] = cfg["BLOCK_D"] if cfg["SINGLE_D_TILE"] else 64
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 64)
    return cfg


def softmax_stats(x, codebook, bias, metric, precision, inv_temperature, *, entropy=False, soft=False):
    """The normaliser norm (2, H, N) fp32 (`fastvq.ops.common.softmax_kept`) and, with entropy, the exact
    entropy (H, N); with soft, the argmax (H, N) int64 (-1 when no finite logit) and the soft values
    sum_k p c_k (H, N, D) fp32."""
    heads, n_tokens, dim = x.shape
    cfg = _stats_config(n_tokens, codebook.shape[1], dim, heads, precision, x.device, soft)
    splits, codes_per_split = cfg.pop("splits"), cfg.pop("codes_per_split")
    d_chunks = triton.cdiv(dim, cfg["BLOCK_DV"]) if soft else 1
    run_max, run_sum, aux = torch.empty((3, heads, splits, n_tokens), dtype=torch.float32, device=x.device)
    arg = torch.empty((heads, splits, n_tokens) if soft else 0, dtype=torch.int64, device=x.device)
    values = torch.empty((heads, splits, n_tokens, dim) if soft else (1, 1, 1), dtype=torch.float32, device=x.device)
    shared = codebook.shape[0] == 1
    _softmax_stats_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_N"]) * d_chunks, splits, heads)](
        x,
        codebook,
        bias,
        run_max,
        run_sum,
        aux,
        arg,
        values,
        n_tokens,
        codebook.shape[1],
        dim,
        codes_per_split,
        d_chunks,
        inv_temperature,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        0 if shared else bias.stride(0),
        run_max.stride(0),
        run_max.stride(1),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        METRIC=metric,
        ENTROPY=entropy,
        SOFT=soft,
        GRAD_PRECISION=grad_precision(precision),
        **dot_options(precision),
        **cfg,
    )
    top = run_max.amax(dim=1, keepdim=True)
    live = run_max != -math.inf  # a split whose codes all have logit -inf weighs 0
    scale = torch.where(live, (run_max - torch.where(top == -math.inf, 0.0, top)).exp(), 0.0)
    total = (run_sum * scale).sum(dim=1)
    out = {"norm": torch.stack([top[:, 0], total.log()])}
    if entropy:
        log_sum = (scale * (aux + torch.where(live, (run_max - top) * run_sum, 0.0))).sum(dim=1)
        out["entropy"] = total.log() - log_sum / total
    if soft:
        best = aux.amax(dim=1, keepdim=True)
        first = (aux == best).to(torch.int32).argmax(dim=1, keepdim=True)  # the lowest split on ties
        out["indices"] = arg.gather(1, first)[:, 0]
        out["values"] = (scale[..., None] * values).sum(dim=1) / total[..., None]
    return out


@triton.jit
def _token_sums_kernel(
    x_ptr,
    code_ptr,
    bias_ptr,
    norm_ptr,
    value_ptr,
    out_ptr,
    N,
    K,
    D,
    codes_per_split,
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
    stride_op,
    stride_os,
    METRIC: tl.constexpr,
    CLAMPED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
):
    """Per split, out (2, S, H, N) fp32: CLAMPED: sum_k p log max(p, clamp_min) and the sum of the
    p >= clamp_min; else sum_k p b_k with b = values (H, K) contiguous (plane 1 unused)."""
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
    row_max, log_sum = load_norm(norm_ptr, pid_h * N + offs_n, stride_np, n_mask)
    first = tl.zeros([BLOCK_N], tl.float32)
    second = tl.zeros([BLOCK_N], tl.float32)
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
        log_p = (logits(dot, x_sq, bias, METRIC) * inv_temperature - row_max[:, None]) - log_sum[:, None]
        p = tl.where(k_mask[None, :], tl.exp(log_p), 0.0)
        if CLAMPED:
            above = p >= clamp_min
            first += tl.sum(p * tl.where(above, log_p, log_clamp_min), axis=1)
            second += tl.sum(tl.where(above, p, 0.0), axis=1)
        else:
            b = tl.load(value_ptr + pid_h * K + offs_k, mask=k_mask, other=0.0)
            first += tl.sum(tl.where(p > 0, p * b[None, :], 0.0), axis=1)
    out = pid_s.to(tl.int64) * stride_os + pid_h * N + offs_n
    tl.store(out_ptr + out, first, mask=n_mask)
    tl.store(out_ptr + stride_op + out, second, mask=n_mask)


def token_sums(x, codebook, bias, norm, metric, precision, inv_temperature, *, log_clamp_min=None, code_values=None):
    """(first, second), each (H, N) fp32: with log_clamp_min, sum_k p log max(p, c) and sum of the p >= c;
    with code_values b (H, K), sum_k p b_k (and zeros)."""
    heads, n_tokens, dim = x.shape
    cfg = pass_config(
        search_config(n_tokens, codebook.shape[1], dim, heads, precision, x.device, logits=True), dim, precision
    )
    splits, codes_per_split = cfg.pop("splits"), cfg.pop("codes_per_split")
    out = torch.empty((2, splits, heads, n_tokens), dtype=torch.float32, device=x.device)
    norm = norm.contiguous()
    values = norm if code_values is None else code_values.float().contiguous()
    shared = codebook.shape[0] == 1
    clamped = log_clamp_min is not None
    _token_sums_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_N"]), splits, heads)](
        x,
        codebook,
        bias,
        norm,
        values,
        out,
        n_tokens,
        codebook.shape[1],
        dim,
        codes_per_split,
        inv_temperature,
        log_clamp_min if clamped else 0.0,
        math.log(log_clamp_min) if clamped else 0.0,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        0 if shared else bias.stride(0),
        norm.stride(0),
        out.stride(0),
        out.stride(1),
        METRIC=metric,
        CLAMPED=clamped,
        **dot_options(precision),
        **cfg,
    )
    return out.sum(dim=1)


@triton.jit
def _code_sums_kernel(
    x_ptr,
    code_ptr,
    bias_ptr,
    norm_ptr,
    keep_ptr,
    out_ptr,
    N,
    K,
    D,
    per_split,
    inv_temperature,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ch,
    stride_ck,
    stride_cd,
    stride_bh,
    stride_np,
    stride_os,
    METRIC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
):
    """Per split of the tokens, out (S, H, K) fp32 = sum_n keep_n p_nk (keep (H, N) fp32, 0 or 1)."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x_head = x_ptr + pid_h * stride_xh
    c_head = code_ptr + pid_h * stride_ch
    c_tile = resident_tile(c_head, offs_k, k_mask, D, stride_ck, stride_cd, CAST, BLOCK_D, SINGLE_D_TILE, True)
    bias = tl.load(bias_ptr + pid_h * stride_bh + offs_k, mask=k_mask, other=0.0)
    lo = pid_s.to(tl.int64) * per_split
    hi = tl.minimum(lo + per_split, N)
    acc = tl.zeros([BLOCK_K], tl.float32)
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
        row_max, log_sum = load_norm(norm_ptr, pid_h * N + offs_n, stride_np, n_mask)
        keep = tl.load(keep_ptr + pid_h * N + offs_n, mask=n_mask, other=0.0)
        p = tl.exp((logits(dot, x_sq, bias, METRIC) * inv_temperature - row_max[:, None]) - log_sum[:, None])
        acc += tl.sum(tl.where((keep[:, None] != 0) & k_mask[None, :], p, 0.0), axis=0)
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + pid_h * K + offs_k, acc, mask=k_mask)


def code_sums(x, codebook, bias, norm, kept, metric, precision, inv_temperature):
    """sum over the kept tokens n of p_nk, (H, K) fp32 (kept (H, N) bool)."""
    heads, n_tokens, dim = x.shape
    n_codes = codebook.shape[1]
    cfg = pass_config(grad_config(n_codes, n_tokens, dim, heads, x.device, code_side=True), dim, precision)
    splits, per_split = cfg.pop("splits"), cfg.pop("per_split")
    cfg.pop("BLOCK_DO")
    out = torch.empty((splits, heads, n_codes), dtype=torch.float32, device=x.device)
    shared = codebook.shape[0] == 1
    norm = norm.contiguous()
    _code_sums_kernel[(triton.cdiv(n_codes, cfg["BLOCK_K"]), splits, heads)](
        x,
        codebook,
        bias,
        norm,
        kept.float().contiguous(),
        out,
        n_tokens,
        n_codes,
        dim,
        per_split,
        inv_temperature,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        0 if shared else bias.stride(0),
        norm.stride(0),
        out.stride(0),
        METRIC=metric,
        **dot_options(precision),
        **cfg,
    )
    return out.sum(dim=0)
