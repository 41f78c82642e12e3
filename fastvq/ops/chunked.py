"""The "torch" backend: every fastvq op in plain PyTorch, chunked into tiles of scores.

It runs on any device, so it is the fallback where no kernel backend can (CPU without a C++
compiler, a GPU without triton), and the ops that the C++ CPU backend has no kernel for. Like every
backend it is tested against the dense float64 oracle `fastvq.ops.naive`. Same signatures as the
other backends, on canonical shapes:
    x: (H, N, D) float, codebook: (Hc, K, D) float with Hc == H (one codebook per head) or Hc == 1
    (shared), indices: (H, N) int64, mask: (H, N) bool.
The public functions in `fastvq.ops.functional` validate arguments and reshape to these.

Never holds an N x K tensor: scores are computed on tiles of at most `SCORE_TILE_ELEMENTS` entries,
so the extra memory is bounded by about 3 * SCORE_TILE_ELEMENTS * 4 bytes (score tile, matmul
output, comparison temporaries: 6 MiB) + one fp32 copy of the codebook (K * D * 4 bytes) + O(N * D)
for the exact distance of the chosen codes. Exceptions, still O(tile): `topk_codes` sorts a tile with
its int64 indices (about twice that), and `sample_code` adds an int64 tile of noise counters.
Scores are fp32 products of operands rounded to the precision, except when some product x.c could
overflow fp32 in some order of its additions (`_products_may_overflow`: values near the fp32
limit): then the call ranks with float64 products rounded to fp32, so that whether a score is finite
(a code whose score is not is never chosen) does not depend on where a token sits in its tile.
This module never imports triton; the math it shares with the kernels is in `fastvq.ops.common`.
"""

from __future__ import annotations

import torch

from . import philox
from .common import (
    COSINE_NORM_EPS,
    L2_LOGIT_EPS,
    code_bias,
    counted_tokens,
    gather_codes,
    gumbel_scales,
    mark_unassigned,
    round_operand,
    valid_first,
)

SCORE_TILE_ELEMENTS = 1 << 19
"""Largest number of (token, code) scores held at once: 512K fp32 = 2 MiB, so that a tile stays in
the CPU's cache between the matrix product that writes it and the reduction that reads it."""

CODES_PER_TILE = 512
"""Codes per tile (at most); the tile takes as many tokens as SCORE_TILE_ELEMENTS allows."""


def chosen_distance(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 distance from each token to its chosen code, and the final indices.

    x (H, N, D), codebook (Hc, K, D), indices (H, N) int64 with -1 for "no code found" ->
    (indices, distances), both (H, N); tokens with no finite distance get index -1 and NaN. Summed in
    float64 (products of fp32 values are exact there) and rounded once, so the result is within
    ~D 2^-53 of the exact distance relative to sum |x_d c_d| at any D, for dot and cosine too.
    """
    xf, cf = x.double(), gather_codes(codebook, indices).double()
    if metric == "l2":
        dist = (xf - cf).pow(2).sum(-1)
    elif metric == "dot":
        dist = -(xf * cf).sum(-1)
    else:
        dot = (xf * cf).sum(-1)
        norms = xf.norm(dim=-1).clamp_min(COSINE_NORM_EPS) * cf.norm(dim=-1).clamp_min(COSINE_NORM_EPS)
        dist = 1.0 - dot / norms
    return mark_unassigned(indices, dist.float())


PRODUCT_LIMIT = 2.0**126
"""Below it, no partial sum of 2 x.c (nor 2 x itself) can overflow fp32, whatever the order of the additions."""


def _products_may_overflow(x: torch.Tensor, codebook: torch.Tensor) -> bool:
    """True when 2 D max|x| max|c| or max(max|x|, max|c|), over the finite entries, reaches PRODUCT_LIMIT
    (one device sync). Non-finite entries make their scores non-finite in any order."""

    def finite_max(t: torch.Tensor) -> float:
        return t.detach().abs().nan_to_num(nan=0.0, posinf=0.0).amax().double().item() if t.numel() else 0.0

    x_max, code_max = finite_max(x), finite_max(codebook)
    return max(2.0 * x.shape[-1] * x_max * code_max, x_max, code_max) >= PRODUCT_LIMIT


def _score_tile(x_rows: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor, metric: str, wide: bool) -> torch.Tensor:
    """Scores (n, k) fp32 of rounded fp32 rows (n, D) against rounded fp32 codes (k, D); NaN and
    +-inf -> +inf. wide: computed in float64, then rounded to fp32 (see the module doc)."""
    if wide:
        x_rows, codes, bias = x_rows.double(), codes.double(), bias.double()
    if metric == "cosine":
        score = (x_rows @ codes.T).mul_(bias).neg_()
    else:  # l2: |c|^2 - 2 x.c; dot: 0 - x.c (bias NaN for a non-finite code)
        score = torch.addmm(bias, x_rows, codes.T, alpha=-2.0 if metric == "l2" else -1.0)
    return _never_chosen_if_not_finite(score.float())


def _never_chosen_if_not_finite(score: torch.Tensor) -> torch.Tensor:
    """score with every NaN and +-inf replaced by +inf, in place: a non-finite score never wins."""
    inf = float("inf")
    return score.nan_to_num_(nan=inf, posinf=inf, neginf=inf)


def _tiles(x: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor, precision: str):
    """Yield (h, hc, token slice, rows, code tiles) over heads and tiles of tokens.

    rows: the tokens x[h, slice] rounded to `precision`, (n, D) fp32; code tiles: list of (k0,
    rounded codes (k, D) fp32, bias (k,)) covering codebook[hc]. A (row tile, code tile) pair has at
    most SCORE_TILE_ELEMENTS scores.
    """
    heads, n_tokens, _ = x.shape
    n_codes = codebook.shape[1]
    codes_per_tile = min(n_codes, CODES_PER_TILE)
    rows_per_tile = max(1, min(n_tokens, SCORE_TILE_ELEMENTS // codes_per_tile))
    for h in range(heads):
        hc = h if codebook.shape[0] > 1 else 0
        codes = round_operand(codebook[hc], precision)
        code_tiles = [
            (k0, codes[k0 : k0 + codes_per_tile], bias[hc, k0 : k0 + codes_per_tile])
            for k0 in range(0, n_codes, codes_per_tile)
        ]
        for n0 in range(0, n_tokens, rows_per_tile):
            rows = slice(n0, n0 + rows_per_tile)
            yield h, hc, rows, round_operand(x[h, rows], precision), code_tiles


def _select(
    x: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor, precision: str, k: int, score_fn
) -> torch.Tensor:
    """The k lowest-scoring codes of every token, (H, N, k) int64, lowest score first, ties to the
    lowest index; -1 where fewer than k codes have a finite score.

    score_fn(h, token slice, rows, k0, codes, bias) -> (n, k) fp32 scores with NaN replaced by +inf.
    """
    heads, n_tokens, _ = x.shape
    indices = torch.full((heads, n_tokens, k), -1, dtype=torch.int64, device=x.device)
    for h, _, token_slice, rows, code_tiles in _tiles(x, codebook, bias, precision):
        best = torch.full((rows.shape[0], k), float("inf"), device=x.device, dtype=torch.float32)
        best_index = indices[h, token_slice]
        for k0, codes, code_bias_tile in code_tiles:
            score = score_fn(h, token_slice, rows, k0, codes, code_bias_tile)
            if k == 1:
                tile_best, tile_index = score.min(dim=1, keepdim=True)  # first index on ties
                better = tile_best < best  # strict: an earlier tile keeps a tie
                best = torch.where(better, tile_best, best)
                best_index.copy_(torch.where(better, tile_index + k0, best_index))
            else:  # the running list (sorted, lower index first on ties) precedes the tile's codes
                tile_index = torch.arange(k0, k0 + codes.shape[0], device=x.device).expand_as(score)
                merged, order = torch.cat([best, score], dim=1).sort(dim=1, stable=True)
                best = merged[:, :k]
                best_index.copy_(torch.cat([best_index, tile_index], dim=1).gather(1, order[:, :k]))
        best_index.masked_fill_(best == float("inf"), -1)
    return indices


def _search(x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str, k: int) -> torch.Tensor:
    """The k lowest scores' codes per token, (H, N, k) int64 (see `_select`)."""
    bias = code_bias(codebook, metric, precision)
    wide = _products_may_overflow(x, codebook)
    return _select(
        x,
        codebook,
        bias,
        precision,
        k,
        lambda h, token_slice, rows, k0, codes, b: _score_tile(rows, codes, b, metric, wide),
    )


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per token, never holding the N x K score matrix.

    x (H, N, D) and codebook (Hc, K, D), any float dtype -> indices (H, N) int64 and distances
    (H, N) fp32 (squared L2, or 1 - cosine similarity). Ties go to the lowest index; codes with a
    non-finite score are never chosen; tokens with no finite distance get -1 / NaN.
    """
    return chosen_distance(x, codebook, _search(x, codebook, metric, precision, 1)[..., 0], metric)


def code_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts (H, K) and sums of assigned rows (H, K, D), both fp32, without a one-hot.

    x (H, N, D) float, indices (H, N) int64 in [-1, K), mask (H, N) bool or None. Tokens with index
    -1 (or out of [0, K): never written outside the outputs) or mask False are skipped.
    """
    heads, n, dim = x.shape
    keep = counted_tokens(indices, num_codes, mask)
    # rows h * K + code of every head's codes, then one spare row that takes the skipped tokens
    offsets = torch.arange(heads, device=x.device).unsqueeze(1) * num_codes
    rows = torch.where(keep, indices + offsets, heads * num_codes).reshape(-1)
    counts = torch.zeros(heads * num_codes + 1, device=x.device, dtype=torch.float32)
    sums = torch.zeros(heads * num_codes + 1, dim, device=x.device, dtype=torch.float32)
    # on CPU the same bits every run and thread count (tests/ops/test_code_stats.py)
    counts.index_add_(0, rows, torch.ones(heads * n, device=x.device, dtype=torch.float32))
    sums.index_add_(0, rows, x.reshape(heads * n, dim).float())
    return counts[:-1].view(heads, num_codes), sums[:-1].view(heads, num_codes, dim)


# ---------------------------------------------------------------------------------------------
# logits: sampling, cross-entropy, top-k
# ---------------------------------------------------------------------------------------------


def _logit_tile(
    rows: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """vector-quantize-pytorch 1.32.0's logits (n, k) fp32 of rounded rows (n, D) against rounded codes (k, D), and
    where the clamp inside them is inactive (so gradients flow): (n, k) for l2, (n, 1) for cosine.

    l2: -sqrt(max(|x|^2 + |c|^2 - 2 x.c, L2_LOGIT_EPS)) (bias = |c|^2); cosine: x.c / (max(|x|, eps)
    max(|c|, eps)) (bias = 1 / max(|c|, eps)); dot: x.c + bias (0; NaN for a non-finite code), never
    clamped. `code_bias` gives the bias.
    """
    dot = rows @ codes.T
    if metric == "dot":
        return dot.add_(bias), torch.ones_like(dot[:, :1], dtype=torch.bool)
    row_sq = rows.pow(2).sum(-1, keepdim=True)
    if metric == "l2":
        sq_dist = (row_sq + bias).sub_(dot, alpha=2.0)
        return sq_dist.clamp_min(L2_LOGIT_EPS).sqrt_().neg_(), sq_dist >= L2_LOGIT_EPS
    row_norm = row_sq.sqrt()
    return dot.mul_(bias).div_(row_norm.clamp_min(COSINE_NORM_EPS)), row_norm >= COSINE_NORM_EPS


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
    """One code per token drawn from softmax(logits / temperature) by the Gumbel-max trick.

    x (H, N, D), codebook (Hc, K, D), temperature > 0, seed in [0, 2^63) -> indices (H, N) int64:
    argmax_k(logit_nk / temperature + g_nk) with g = -log(-log(u)) and u = `philox.uniform(seed,
    (h N + n) K + k)`, computed per tile (no N x K noise). With k (1 <= k <= K): (H, N, k) int64,
    the k highest perturbed logits, highest first (Gumbel top-k). Codes with a non-finite logit are
    never drawn; -1 for a token with none finite (or in the slots past the finite ones).
    """
    n_tokens, n_codes = x.shape[1], codebook.shape[1]
    logit_scale, noise_scale = gumbel_scales(temperature)

    def score(h, token_slice, rows, k0, codes, bias):
        logit, _ = _logit_tile(rows, codes, bias, metric)
        tokens = torch.arange(token_slice.start, token_slice.start + rows.shape[0], device=x.device)
        offsets = (h * n_tokens + tokens)[:, None] * n_codes + torch.arange(k0, k0 + codes.shape[0], device=x.device)
        gumbel = -torch.log(-torch.log(philox.uniform(seed, offsets)))
        return _never_chosen_if_not_finite((logit * logit_scale + gumbel * noise_scale).neg_())

    bias = code_bias(codebook, metric, precision)
    indices = _select(x, codebook, bias, precision, k or 1, score)
    return indices[..., 0] if k is None else indices


def topk_codes(
    x: torch.Tensor, codebook: torch.Tensor, k: int, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codes of every token, nearest first, ties to the lowest index.

    x (H, N, D), codebook (Hc, K, D), 1 <= k <= K -> indices (H, N, k) int64 and distances (H, N, k)
    fp32 (as `nearest_code`: recomputed exactly for each chosen code). Slots past the codes with a
    finite score, and codes whose distance is not finite, get -1 / NaN, after the valid ones.
    """
    indices = _search(x, codebook, metric, precision, k)
    pairs = [chosen_distance(x, codebook, indices[..., j], metric) for j in range(k)]
    return valid_first(torch.stack([p[0] for p in pairs], dim=-1), torch.stack([p[1] for p in pairs], dim=-1))


def code_cross_entropy(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits against target codes, by an online log-sum-exp over code tiles.

    x (H, N, D), codebook (Hc, K, D), indices (H, N) int64 in [-1, K) -> loss (H, N) fp32 =
    logsumexp_k(logit_k) - logit_target (0 where the index is -1), and the log-sum-exp (H, N) fp32
    that the backward pass reuses.
    """
    bias = code_bias(codebook, metric, precision)
    lse = torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)
    target = torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)
    for h, _, token_slice, rows, code_tiles in _tiles(x, codebook, bias, precision):
        run_max = torch.full((rows.shape[0],), float("-inf"), device=x.device, dtype=torch.float32)
        run_sum = torch.zeros(rows.shape[0], device=x.device, dtype=torch.float32)
        local = indices[h, token_slice]
        for k0, codes, code_bias_tile in code_tiles:
            logit, _ = _logit_tile(rows, codes, code_bias_tile, metric)
            new_max = torch.maximum(run_max, logit.amax(dim=1))
            run_sum = run_sum * (run_max - new_max).exp() + (logit - new_max[:, None]).exp().sum(dim=1)
            run_max = new_max
            hit = (local >= k0) & (local < k0 + codes.shape[0])
            picked = logit.gather(1, (local - k0).clamp(0, codes.shape[0] - 1)[:, None])[:, 0]
            target[h, token_slice] += torch.where(hit, picked, 0.0)
        lse[h, token_slice] = run_max + run_sum.log()
    return torch.where(indices < 0, 0.0, lse - target), lse


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
    """Gradient of sum(grad * loss) of `code_cross_entropy` w.r.t. x (wrt="x": (H, N, D) fp32) or the
    codebook (wrt="codebook": (Hc, K, D) fp32), from softmax weights recomputed per tile.

    With w_nk = grad_n (p_nk - [k = target_n]) and p = exp(logit - lse): grad_x_n = sum_k w_nk
    dlogit_nk/dx_n and grad_c_k = sum_n w_nk dlogit_nk/dc_k, where dlogit/dx = (c - x) / sqrt(d)
    (l2), (c^ - logit x^) / |x| (cosine) or c (dot), and symmetrically for c.
    """
    bias = code_bias(codebook, metric, precision)
    out = torch.zeros(x.shape if wrt == "x" else codebook.shape, device=x.device, dtype=torch.float32)
    weight = torch.where(indices < 0, 0.0, grad.float())
    for h, hc, token_slice, rows, code_tiles in _tiles(x, codebook, bias, precision):
        local = indices[h, token_slice]
        for k0, codes, code_bias_tile in code_tiles:
            logit, active = _logit_tile(rows, codes, code_bias_tile, metric)
            onehot = torch.arange(k0, k0 + codes.shape[0], device=x.device) == local[:, None]
            w = weight[h, token_slice, None] * ((logit - lse[h, token_slice, None]).exp() - onehot.float())
            grad_tile = logit_vjp(w, logit, active, rows, codes, code_bias_tile, metric, wrt)
            if wrt == "x":
                out[h, token_slice] += grad_tile
            else:
                out[hc, k0 : k0 + codes.shape[0]] += grad_tile
    return out


def logit_vjp(
    w: torch.Tensor,
    logit: torch.Tensor,
    active: torch.Tensor,
    rows: torch.Tensor,
    codes: torch.Tensor,
    code_bias_tile: torch.Tensor,
    metric: str,
    wrt: str,
) -> torch.Tensor:
    """sum_k w_nk dlogit_nk/dx_n (wrt="x": (n, D)) or sum_n w_nk dlogit_nk/dc_k (wrt="codebook": (k, D)),
    fp32, of one tile of `_logit_tile` (logit and active from it, w (n, k)).

    dlogit/dx = (c - x) / s, dlogit/dc = (x - c) / s with s = -logit where the clamp is inactive (l2);
    r_x r_c c - logit r_x^2 x with r = 1 / max(|.|, eps), symmetric for c (cosine); c and x (dot).
    """
    if metric == "dot":
        mix, scale = w, torch.zeros_like(w)
    elif metric == "l2":
        mix = scale = torch.where(active, w / -logit, 0.0)
    else:
        inv_row = rows.norm(dim=-1, keepdim=True).clamp_min(COSINE_NORM_EPS).reciprocal()
        mix = w * inv_row * code_bias_tile
        if wrt == "x":
            scale = w * logit * torch.where(active, inv_row.square(), 0.0)
        else:
            code_active = codes.norm(dim=-1) >= COSINE_NORM_EPS
            scale = w * logit * torch.where(code_active, code_bias_tile.square(), 0.0)
    if wrt == "x":
        return mix @ codes - rows * scale.sum(dim=1, keepdim=True)
    return mix.T @ rows - codes * scale.sum(dim=0)[:, None]
