"""Fused code search: score tiles + a running selection, never writing an N x K tensor.

One kernel serves three ops. Each program owns BLOCK_N tokens of one head and streams the codes
of its split in BLOCK_K tiles, keeping per token either the running best (score, index)
(TOPK = 1) or an unsorted running list of the TOPK best. Lower scores win:
    nearest_code / topk_codes: a score that ranks codes exactly as the distance does, without the
        per-token constant (l2: |c|^2 - 2 x.c; cosine: -(x.c) / |c|; dot: -(x.c));
    sample_code (GUMBEL): -(a logit + b g), g = -log(-log(u)) with u drawn in the kernel
        by Philox from the counter (h N + n) K + k (Gumbel-max: a draw from softmax(logit / T);
        (a, b) from `fastvq.ops.common.gumbel_scales`, so that no product overflows).
When the token blocks alone cannot fill the GPU (small N, large K) the codes are split across
programs; each split writes its candidates and a deterministic merge keeps the lowest index among
equal scores, whatever the split. A second small kernel recomputes the exact fp32 distance of
every chosen code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import code_bias, gumbel_scales, mark_unassigned, valid_first
from ._launch import distance_config, interpreted_precision, search_config
from ._tiles import COSINE_NORM_EPS, dot_options, dot_tile, load_tile, logits, rank_score, resident_tile


@triton.jit
def _merge_topk(score, k0, best, best_index, TOPK: tl.constexpr, KPAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """Move the TOPK lowest scores of a tile (BLOCK_N, BLOCK_K) into the running list (BLOCK_N, KPAD).

    The list is unsorted; each round replaces its worst entry (highest score, then highest index)
    when the tile's best is strictly lower, so equal scores keep the lower index (earlier tiles and
    earlier rounds hold lower indices). Slots >= TOPK hold -inf and are never replaced.
    """
    cols = tl.arange(0, BLOCK_K)
    for _ in range(TOPK):
        tile_best, tile_col = tl.min(score, axis=1, return_indices=True)  # lowest index on ties
        worst = tl.max(best, axis=1)
        worst_index = tl.max(tl.where(best == worst[:, None], best_index, -KPAD - 1), axis=1)
        replace = (best_index == worst_index[:, None]) & (tile_best < worst)[:, None]
        best = tl.where(replace, tile_best[:, None], best)
        best_index = tl.where(replace, (tile_col.to(tl.int64) + k0)[:, None], best_index)
        score = tl.where(cols[None, :] == tile_col[:, None], float("inf"), score)
    return best, best_index


@triton.jit
def _search_kernel(
    x_ptr,
    code_ptr,
    bias_ptr,
    best_score_ptr,
    best_index_ptr,
    N,
    K,
    D,
    codes_per_split,
    seed,
    logit_scale,
    noise_scale,
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
    GUMBEL: tl.constexpr,
    TOPK: tl.constexpr,
    KPAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
):
    """Writes each split's best (score, index) per token: (H, S, N), or (H, S, N, TOPK) when TOPK > 1."""
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

    if TOPK == 1:
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_index = tl.full([BLOCK_N], -1, tl.int64)
    else:
        slots = tl.arange(0, KPAD)
        # empty slots: +inf with distinct negative indices; padding slots (>= TOPK): -inf
        slot_init = tl.where(slots < TOPK, float("inf"), float("-inf"))
        best = tl.zeros([BLOCK_N, KPAD], tl.float32) + slot_init[None, :]
        best_index = tl.zeros([BLOCK_N, KPAD], tl.int64) + (-1 - slots.to(tl.int64))[None, :]
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
        if GUMBEL:
            u = tl.rand(seed, (pid_h * N + offs_n)[:, None] * K + offs_k[None, :])
            score = -(logits(dot, x_sq, bias, METRIC) * logit_scale - tl.log(-tl.log(u)) * noise_scale)
        else:
            score = rank_score(dot, bias, METRIC)
        # codes past the split and non-finite scores (non-finite inputs) never win
        score = tl.where(k_mask[None, :] & (tl.abs(score) < float("inf")), score, float("inf"))
        if TOPK == 1:
            tile_best, tile_index = tl.min(score, axis=1, return_indices=True)  # lowest index on ties
            better = tile_best < best  # strict: an earlier tile keeps a tie
            best = tl.where(better, tile_best, best)
            best_index = tl.where(better, tile_index.to(tl.int64) + k0, best_index)
        else:
            best, best_index = _merge_topk(score, k0, best, best_index, TOPK, KPAD, BLOCK_K)

    out = pid_h * stride_oh + pid_s.to(tl.int64) * stride_os
    if TOPK == 1:
        tl.store(best_score_ptr + out + offs_n, best, mask=n_mask)
        tl.store(best_index_ptr + out + offs_n, best_index, mask=n_mask)
    else:
        out_tile = out + offs_n[:, None] * TOPK + slots[None, :]
        out_mask = n_mask[:, None] & (slots < TOPK)[None, :]
        tl.store(best_score_ptr + out_tile, best, mask=out_mask)
        tl.store(best_index_ptr + out_tile, best_index, mask=out_mask)


@triton.jit
def _chosen_distance_kernel(
    x_ptr,
    code_ptr,
    index_ptr,
    dist_ptr,
    N,
    D,
    J,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_ch,
    stride_ck,
    stride_cd,
    METRIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Exact fp32 distance between each token and its j-th chosen code; index and dist are (H, N, J)
    contiguous (code 0 is read for index -1). Summed in fp64, where products of fp32 values are exact,
    and rounded once: as the other backends, within ~D 2^-53 of the exact value at any D."""
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    out = (pid_h * N + offs_n) * J + pid_j
    index = tl.maximum(tl.load(index_ptr + out, mask=n_mask, other=0), 0)
    offs_d = tl.arange(0, BLOCK_D)
    x_head = x_ptr + pid_h * stride_xh
    c_head = code_ptr + pid_h * stride_ch
    sq_diff = tl.zeros([BLOCK_N], tl.float64)
    dot = tl.zeros([BLOCK_N], tl.float64)
    x_sq = tl.zeros([BLOCK_N], tl.float64)
    c_sq = tl.zeros([BLOCK_N], tl.float64)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + offs_d) < D
        xv = load_tile(x_head, offs_n, d0 + offs_d, stride_xn, stride_xd, n_mask, d_mask, 0).to(tl.float64)
        cv = load_tile(c_head, index, d0 + offs_d, stride_ck, stride_cd, n_mask, d_mask, 0).to(tl.float64)
        if METRIC == "l2":
            diff = xv - cv
            sq_diff += tl.sum(diff * diff, axis=1)
        else:
            dot += tl.sum(xv * cv, axis=1)
        if METRIC == "cosine":
            x_sq += tl.sum(xv * xv, axis=1)
            c_sq += tl.sum(cv * cv, axis=1)
    if METRIC == "cosine":
        norms = tl.maximum(tl.sqrt(x_sq), COSINE_NORM_EPS) * tl.maximum(tl.sqrt(c_sq), COSINE_NORM_EPS)
        dist = 1.0 - dot / norms
    elif METRIC == "dot":
        dist = -dot
    else:
        dist = sq_diff
    tl.store(dist_ptr + out, dist.to(tl.float32), mask=n_mask)


def _search(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    precision: str,
    *,
    topk: int = 1,
    seed: int = 0,
    temperature: float | None = None,
) -> torch.Tensor:
    """Launch the search kernel and merge its splits: indices (H, N) int64, or (H, N, topk) lowest
    score first; -1 where no code has a finite score. temperature: None ranks by distance, a
    positive value draws by Gumbel-max with `seed`."""
    heads, n_tokens, dim = x.shape
    n_codes = codebook.shape[1]
    precision = interpreted_precision(precision)
    bias = code_bias(codebook, metric, precision)  # (Hc, K) fp32, O(K) extra
    cfg = search_config(n_tokens, n_codes, dim, heads, precision, x.device, topk, logits=temperature is not None)
    splits = cfg.pop("splits")
    codes_per_split = cfg.pop("codes_per_split")
    shared = codebook.shape[0] == 1
    candidates = (heads, splits, n_tokens) + ((topk,) if topk > 1 else ())
    best_score = torch.empty(candidates, dtype=torch.float32, device=x.device)
    best_index = torch.empty(candidates, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_N"]), splits, heads)
    _search_kernel[grid](
        x,
        codebook,
        bias,
        best_score,
        best_index,
        n_tokens,
        n_codes,
        dim,
        codes_per_split,
        seed,
        *gumbel_scales(temperature or 1.0),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        0 if shared else bias.stride(0),
        best_score.stride(0),
        best_score.stride(1),
        METRIC=metric,
        GUMBEL=temperature is not None,
        TOPK=topk,
        KPAD=triton.next_power_of_2(topk),
        **dot_options(precision),
        **cfg,
    )
    if topk == 1:
        if splits == 1:
            return best_index[:, 0]
        # argmin returns the first (lowest) split among equal scores: the lowest code index
        winner = best_score.argmin(dim=1, keepdim=True)
        return best_index.gather(1, winner)[:, 0]
    # every split's list, sorted by (score, index): sort by index, then stably by score
    score = best_score.transpose(1, 2).reshape(heads, n_tokens, splits * topk)
    index, order = best_index.transpose(1, 2).reshape(heads, n_tokens, splits * topk).sort(dim=-1)
    score, order = score.gather(-1, order).sort(dim=-1, stable=True)
    index = index.gather(-1, order[..., :topk])
    return index.masked_fill(score[..., :topk] == float("inf"), -1)


def _chosen_distance(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 distances of the chosen codes, indices (H, N) or (H, N, J) -> (indices, distances)
    of that shape, with -1 / NaN where no finite distance was found."""
    heads, n_tokens, dim = x.shape
    indices = indices.contiguous()
    distances = torch.empty(indices.shape, dtype=torch.float32, device=x.device)
    cfg = distance_config(dim)
    n_chosen = indices.shape[2] if indices.dim() == 3 else 1
    shared = codebook.shape[0] == 1
    _chosen_distance_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_N"]), n_chosen, heads)](
        x,
        codebook,
        indices,
        distances,
        n_tokens,
        dim,
        n_chosen,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        METRIC=metric,
        **cfg,
    )
    return mark_unassigned(indices, distances)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.chunked.nearest_code`: x (H, N, D), codebook (Hc, K, D) ->
    indices (H, N) int64 (-1: no finite distance), distances (H, N) fp32."""
    return _chosen_distance(x, codebook, _search(x, codebook, metric, precision), metric)


def topk_codes(
    x: torch.Tensor, codebook: torch.Tensor, k: int, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fastvq.ops.chunked.topk_codes`: x (H, N, D), codebook (Hc, K, D), 1 <= k <= K ->
    indices (H, N, k) int64 nearest first, distances (H, N, k) fp32; -1 / NaN after the valid entries."""
    indices = _search(x, codebook, metric, precision, topk=k).reshape(*x.shape[:2], k)
    return valid_first(*_chosen_distance(x, codebook, indices, metric))


def sample_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    temperature: float,
    seed: int,
    k: int | None = None,
    metric: str = "l2",
    precision: str = "ieee",
) -> torch.Tensor:
    """Triton twin of `fastvq.ops.chunked.sample_code`: x (H, N, D), codebook (Hc, K, D), temperature > 0
    -> indices (H, N) int64 drawn from softmax(logits / temperature), or with k (H, N, k) int64 by
    Gumbel top-k, highest first (-1: no finite logit)."""
    if k is None:
        return _search(x, codebook, metric, precision, seed=seed, temperature=temperature)
    indices = _search(x, codebook, metric, precision, topk=k, seed=seed, temperature=temperature)
    return indices.reshape(*x.shape[:2], k)
