"""The oracle: every op computed the obvious way, in float64, on the whole N x K matrix.

No tiles, no fusion, no speed: what the tests check every backend against (the chunked "torch"
backend included). Same signatures as the backends' functions, on canonical shapes (x (H, N, D),
codebook (Hc, K, D) with Hc in (1, H), indices (H, N) int64); results are float64 where the backends
return fp32. It imports no backend and no dispatch. The rules it states are the ops' contract:

- Ranking: operands rounded to `precision` (`fastvq.ops.common.round_operand`), then the exact score
  l2 |c|^2 - 2 x.c, cosine -(x.c) / max(|c|, eps), dot -(x.c) (the distance less a per-token term).
- A code is never chosen when its |c|^2 or its score is not finite in fp32 (NaN, inf, overflow);
  ties go to the lowest index.
- A chosen code whose exact distance (from the unrounded inputs) is not finite in fp32 becomes
  index -1, distance NaN; in a top-k list these entries come after the valid ones.
- Sampling: the Gumbel noise is the Philox stream of `fastvq.ops.philox` at counter (h N + n) K + k,
  so a draw is a function of the seed: the oracle replays it densely. (That the draws follow
  softmax(logit / T) is checked separately, by their frequencies.)
- The soft ops (`code_entropy`, `soft_quantize`) are their public formulas on (H, N, K) tables,
  differentiated by autograd: the tests compare the public ops' values and gradients with these.
  Their `dtype` is the one every step computes in (float32 measures the dense formulas' own fp32
  drift). A token whose scaled logits have no finite log-sum-exp (a NaN or inf in it, an overflow) or
  that the mask leaves out is not counted: its row is zeroed so no NaN reaches a gradient.

Backends compute in fp32 where this computes exactly: near the fp32 limit, when a partial sum of x.c
overflows although the exact score does not, a backend may drop a code that the oracle keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as tF

from . import philox
from .common import COSINE_NORM_EPS, L2_LOGIT_EPS, round_operand

INF = float("inf")


def _rounded(x: torch.Tensor, codebook: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (H, N, D) and the codebook broadcast to (H, K, D), rounded to `precision`, as float64."""
    return (
        round_operand(x, precision).double(),
        round_operand(codebook, precision).double().expand(x.shape[0], -1, -1),
    )


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(COSINE_NORM_EPS)


def _finite_fp32(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t.float())


def distances(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of every token to every code, (H, N, K) float64: squared L2, 1 - cosine similarity or -(x.c)."""
    xd, cd = x.double(), codebook.double().expand(x.shape[0], -1, -1)
    if metric == "l2":
        return torch.cdist(xd, cd, compute_mode="donot_use_mm_for_euclid_dist").square()
    if metric == "dot":
        return -(xd @ cd.mT)
    return 1.0 - _unit(xd) @ _unit(cd).mT


def scores(x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str = "ieee") -> torch.Tensor:
    """Ranking scores (H, N, K) float64, lower is nearer; +inf where the code may not be chosen."""
    xr, cr = _rounded(x, codebook, precision)
    code_sq = cr.square().sum(-1).unsqueeze(1)
    dot = xr @ cr.mT
    if metric == "l2":
        score = code_sq - 2.0 * dot
    elif metric == "cosine":
        score = -dot / code_sq.sqrt().clamp_min(COSINE_NORM_EPS)
    else:
        score = -dot
    return score.masked_fill(~(_finite_fp32(score) & _finite_fp32(code_sq)), INF)


def topk_codes(
    x: torch.Tensor, codebook: torch.Tensor, k: int, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k lowest scores' codes, lowest first (stable sort: ties to the lowest index) -> indices
    (H, N, k) int64 and their `distances` (H, N, k) float64; -1 / NaN entries after the valid ones."""
    ranked = scores(x, codebook, metric, precision).sort(dim=-1, stable=True)
    indices = ranked.indices[..., :k]
    dist = distances(x, codebook, metric).gather(-1, indices)
    bad = (ranked.values[..., :k] == INF) | ~_finite_fp32(dist)
    order = bad.to(torch.int8).argsort(dim=-1, stable=True)
    return indices.masked_fill(bad, -1).gather(-1, order), dist.masked_fill(bad, float("nan")).gather(-1, order)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_codes` with k = 1: indices (H, N) int64, distances (H, N) float64."""
    indices, dist = topk_codes(x, codebook, 1, metric=metric, precision=precision)
    return indices[..., 0], dist[..., 0]


def code_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (H, K) and sums (H, K, D), float64, through a one-hot matrix; tokens with an index
    outside [0, K) or mask False are left out."""
    onehot = indices.unsqueeze(-1) == torch.arange(num_codes, device=indices.device)
    if mask is not None:
        onehot &= mask.unsqueeze(-1)
    onehot = onehot.double()
    return onehot.sum(1), onehot.mT @ x.double()


def logits(
    x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str = "ieee", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """vector-quantize-pytorch 1.32.0's logits (H, N, K) float64, differentiable: l2
    -sqrt(max(|x|^2 + |c|^2 - 2 x.c, 1e-8)), cosine x.c / (max(|x|, eps) max(|c|, eps)), dot x.c.
    dtype=torch.float32 computes the same formulas in fp32 (how far they drift there is what the soft
    ops' tests derive their tolerances from)."""
    return _logits(*(t.to(dtype) for t in _rounded(x, codebook, precision)), metric)


def _logits(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """`logits` of float64 operands x (H, N, D) and codebook (H, K, D), as they are."""
    dot = x @ codebook.mT
    if metric == "l2":
        sq = x.square().sum(-1, keepdim=True) + codebook.square().sum(-1).unsqueeze(1) - 2.0 * dot
        return -sq.clamp_min(L2_LOGIT_EPS).sqrt()
    if metric == "dot":
        return dot
    return _unit(x) @ _unit(codebook).mT


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
    """argmax_k(logit_k / temperature + g_k), g = -log(-log(u)) with u the Philox stream: (H, N)
    int64; with k, the k largest, largest first, (H, N, k). Codes whose logit is not finite in fp32
    (or whose |c|^2 is not, or of a token with a non-finite entry) are never drawn: -1 past them."""
    heads, n_tokens, _ = x.shape
    n_codes = codebook.shape[1]
    counters = torch.arange(heads * n_tokens * n_codes, device=x.device).view(heads, n_tokens, n_codes)
    gumbel = -torch.log(-torch.log(philox.uniform(seed, counters).double()))
    xr, cr = _rounded(x, codebook, precision)
    logit = _logits(xr, cr, metric)
    usable = (
        _finite_fp32(logit) & _finite_fp32(cr.square().sum(-1)).unsqueeze(1) & torch.isfinite(x).all(-1, keepdim=True)
    )
    ranked = (logit / temperature + gumbel).masked_fill(~usable, -INF).sort(dim=-1, descending=True, stable=True)
    indices = ranked.indices[..., : k or 1].masked_fill(ranked.values[..., : k or 1] == -INF, -1)
    return indices[..., 0] if k is None else indices


def code_cross_entropy(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, *, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor]:
    """loss (H, N) = logsumexp_k(logit_k) - logit_target (0 where the index is -1), and the
    logsumexp (H, N); float64."""
    logit = logits(x, codebook, metric, precision)
    lse = logit.logsumexp(-1)
    target = logit.gather(-1, indices.clamp_min(0).unsqueeze(-1)).squeeze(-1)
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
    """Gradient of sum(grad * loss) w.r.t. x (wrt="x", (H, N, D)) or the codebook ((Hc, K, D)), float64:
    sum_nk grad_n (exp(logit_nk - lse_n) - [k = target_n]) dlogit_nk, by autograd through `logits`
    (the rounding to `precision` passes the gradient straight through)."""
    x_leaf = round_operand(x.detach(), precision).double().requires_grad_()
    code_leaf = round_operand(codebook.detach(), precision).double().requires_grad_()
    logit = _logits(x_leaf, code_leaf.expand(x.shape[0], -1, -1), metric)
    onehot = indices.unsqueeze(-1) == torch.arange(logit.shape[-1], device=x.device)
    weight = torch.where(indices < 0, 0.0, grad.double()).unsqueeze(-1) * (
        (logit - lse.double().unsqueeze(-1)).exp() - onehot.double()
    )
    (out,) = torch.autograd.grad((weight.detach() * logit).sum(), x_leaf if wrt == "x" else code_leaf)
    return out


def _kept_tokens(x, codebook, mask, metric, temperature, dtype):
    """(tokens counted: unmasked with a finite log-sum-exp, x with the others' rows zeroed)."""
    with torch.no_grad():
        kept = torch.isfinite(torch.logsumexp(logits(x, codebook, metric, dtype=dtype) / temperature, -1))
    if mask is not None:
        kept = kept & mask
    return kept, torch.where(kept[..., None], x.to(dtype), 0.0)


def code_entropy(
    x: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    log_clamp_min: float | None = None,
    metric: str = "l2",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token entropy (H, N) of p = softmax(logits / T): -sum p log p, or -sum p log(max(p,
    log_clamp_min)); 0 for a masked token, NaN for a non-finite one. And the mean of p over the
    kept tokens of each head (H, K)."""
    kept, x_kept = _kept_tokens(x, codebook, mask, metric, temperature, dtype)
    scaled = logits(x_kept, codebook, metric, dtype=dtype) / temperature
    probs = scaled.softmax(-1)
    log_probs = scaled.log_softmax(-1) if log_clamp_min is None else probs.clamp(min=log_clamp_min).log()
    entropy = -(probs * log_probs).sum(-1)
    entropy = torch.where(kept, entropy, float("nan") if mask is None else torch.where(mask, float("nan"), 0.0))
    mean_probs = (probs * kept[..., None]).sum(1) / kept.sum(1, keepdim=True)
    return entropy, mean_probs


def soft_quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    temperature: float = 1.0,
    metric: str = "l2",
    hard: bool = True,
    indices: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IBQ's index backpropagation (SEED-Voken `IndexPropagationQuantize`): soft = softmax(logits / T),
    hard = one_hot(argmax logits), quantized = (hard - soft.detach() + soft) @ codebook (hard=False:
    soft @ codebook). indices (H, N) replaces the argmax when given (a test's tie-break). Non-finite
    tokens get index -1 and pass x through. Returns (quantized (H, N, D), indices (H, N))."""
    kept, x_kept = _kept_tokens(x, codebook, None, metric, temperature, dtype)
    logit = logits(x_kept, codebook, metric, dtype=dtype)
    soft = (logit / temperature).softmax(-1)
    chosen = logit.argmax(-1) if indices is None else indices
    chosen = torch.where(kept, chosen, -1)
    if hard:
        one_hot = tF.one_hot(chosen.clamp_min(0), codebook.shape[1]).to(dtype)
        soft = one_hot - soft.detach() + soft
    value = soft @ codebook.to(dtype).expand(x.shape[0], -1, -1)
    return torch.where(kept[..., None], value, x.to(dtype)), chosen
