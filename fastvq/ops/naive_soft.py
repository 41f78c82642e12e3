"""Dense float64 oracle of the soft ops over a codebook, `code_entropy` and `soft_quantize`: their
formulas as written, on (H, N, K) tables, differentiable by autograd. Obviously right and O(N K)
memory: for tests at small sizes, never for real ones.

Canonical shapes as the backends: x (H, N, D), codebook (Hc, K, D) with Hc in (1, H), mask (H, N) bool.
`dtype` is the one every step computes in: float64 for the oracle; float32 measures how far the same
dense formulas drift in fp32, from which the tests derive their tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as tF


def logits(x: torch.Tensor, codebook: torch.Tensor, metric: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """vector-quantize-pytorch 1.32.0's logits (H, N, K): -sqrt(max(|x - c|^2, 1e-8)) ("l2"), the cosine
    similarity ("cosine") or x . c ("dot")."""
    x, codebook = x.to(dtype), codebook.to(dtype).expand(x.shape[0], -1, -1)
    if metric == "l2":
        sq = x.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1).unsqueeze(1) - 2 * x @ codebook.mT
        return -sq.clamp(min=1e-8).sqrt()
    if metric == "cosine":
        return tF.normalize(x, dim=-1) @ tF.normalize(codebook, dim=-1).mT
    return x @ codebook.mT


def _kept_tokens(x, codebook, mask, metric, temperature, dtype):
    """(tokens counted: unmasked with a finite log-sum-exp, x with the others' rows zeroed so that no
    NaN reaches a gradient)."""
    with torch.no_grad():
        kept = torch.isfinite(torch.logsumexp(logits(x, codebook, metric, dtype) / temperature, -1))
    if mask is not None:
        kept = kept & mask
    return kept, torch.where(kept[..., None], x.to(dtype), 0.0)


def code_entropy(x: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor | None = None, *,
                 temperature: float = 1.0, log_clamp_min: float | None = None,
                 metric: str = "l2", dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token entropy (H, N) of p = softmax(logits / T): -sum p log p, or -sum p log(max(p,
    log_clamp_min)); 0 for a masked token, NaN for a non-finite one. And the mean of p over the
    kept tokens of each head (H, K)."""
    kept, x_kept = _kept_tokens(x, codebook, mask, metric, temperature, dtype)
    scaled = logits(x_kept, codebook, metric, dtype) / temperature
    probs = scaled.softmax(-1)
    log_probs = scaled.log_softmax(-1) if log_clamp_min is None else probs.clamp(min=log_clamp_min).log()
    entropy = -(probs * log_probs).sum(-1)
    entropy = torch.where(kept, entropy, float("nan") if mask is None else torch.where(mask, float("nan"), 0.0))
    mean_probs = (probs * kept[..., None]).sum(1) / kept.sum(1, keepdim=True)
    return entropy, mean_probs


def soft_quantize(x: torch.Tensor, codebook: torch.Tensor, *, temperature: float = 1.0, metric: str = "l2",
                  hard: bool = True, indices: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """IBQ's index backpropagation (SEED-Voken `IndexPropagationQuantize`): soft = softmax(logits / T),
    hard = one_hot(argmax logits), quantized = (hard - soft.detach() + soft) @ codebook (hard=False:
    soft @ codebook). indices (H, N) replaces the argmax when given (a test's tie-break). Non-finite
    tokens get index -1 and pass x through. Returns (quantized (H, N, D), indices (H, N))."""
    kept, x_kept = _kept_tokens(x, codebook, None, metric, temperature, dtype)
    logit = logits(x_kept, codebook, metric, dtype)
    soft = (logit / temperature).softmax(-1)
    chosen = logit.argmax(-1) if indices is None else indices
    chosen = torch.where(kept, chosen, -1)
    if hard:
        one_hot = tF.one_hot(chosen.clamp_min(0), codebook.shape[1]).to(dtype)
        soft = one_hot - soft.detach() + soft
    value = soft @ codebook.to(dtype).expand(x.shape[0], -1, -1)
    return torch.where(kept[..., None], value, x.to(dtype)), chosen
