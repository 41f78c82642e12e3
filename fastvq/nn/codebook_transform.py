"""`VectorQuantize.forward(codebook_transform_fn=...)`: every token searched against its own codebook,
`codebook_transform_fn(codes)`, as vector-quantize-pytorch 1.32.0 does (the hook of its implicit neural
codebooks).

The function maps the codes (C, K, D) to per-token codebooks (C, B', S, K, D) in 1.32.0's layout of
the heads: C = 1, B' = B for one head; C = heads, B' = B with one codebook per head; C = 1, B' = B *
heads (batch-major) with a shared codebook. Those codebooks are the caller's dense (N, K, D) tensor,
so the dense (N, K) logits here (search, sampling, the soft terms) are smaller than what the caller
already holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .arguments import describe
from .code_soft_terms import SoftTerms
from .kmeans import l2norm
from .layout import from_head_layout, to_head_layout
from .token_quantizer import finite_rows


class TransformedCodes(NamedTuple):
    """What `transformed_codes` returns: chosen (B, S, H, D) fp32 codes, differentiable in the
    transformed codes; indices (B, S, H) int64 (-1: a token with a non-finite value); logits
    (C, B', S, K) fp32 and transformed (C, B', S, K, D) fp32, in 1.32.0's head layout."""

    chosen: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor
    transformed: torch.Tensor


def transformed_codes(
    z: torch.Tensor,
    codes: torch.Tensor,
    transform_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    separate: bool,
    metric: str,
    sample_temperature: float = 0.0,
) -> TransformedCodes:
    """The code of each token z (B, S, H, D) among its own codebook transform_fn(codes).

    codes: (C, K, D), passed to transform_fn as they are (with their gradient, if any). Logits as
    1.32.0: minus F.pairwise_distance (its eps of 1e-6 included) for "l2", the dot product with the
    l2-normalised transformed codes for "cosine" (z is normalised already). The nearest code, or with
    sample_temperature T > 0 the argmax of logits / T plus Gumbel noise drawn as 1.32.0 draws it (a
    seed gives its sample). A token with a non-finite value in any head gets index -1 in every head
    and passes through.
    """
    heads = z.shape[2]
    tokens = to_head_layout(z.float(), separate)  # (C, B', S, D)
    transformed = transform_fn(codes)
    expected = (*tokens.shape[:3], codes.shape[1], codes.shape[2])
    if not isinstance(transformed, torch.Tensor) or tuple(transformed.shape) != expected:
        raise ValueError(
            f"codebook_transform_fn must return a tensor of shape {expected} (codebooks, batch, sequence, "
            f"codes, dim), got {describe(transformed)}"
        )
    transformed = transformed.float()
    if metric == "cosine":
        transformed = l2norm(transformed)
        logits = torch.einsum("cbsd,cbskd->cbsk", tokens, transformed)
    else:
        logits = -F.pairwise_distance(tokens.unsqueeze(-2), transformed)
    scores = logits
    if sample_temperature > 0:
        uniform = torch.zeros_like(logits).uniform_(0, 1)
        scores = logits / sample_temperature - uniform.clamp_min(1e-20).log().neg().clamp_min(1e-20).log()
    indices = scores.argmax(-1)
    chosen = transformed.gather(-2, indices[..., None, None].expand(*indices.shape, 1, z.shape[-1])).squeeze(-2)
    chosen, indices = from_head_layout(chosen, heads, separate), from_head_layout(indices, heads, separate)
    finite = finite_rows(z).all(-1, keepdim=True)  # (B, S, 1): every head finite
    chosen = torch.where(finite.unsqueeze(-1), chosen, z.float())
    return TransformedCodes(chosen, indices.masked_fill(~finite, -1), logits, transformed)


def transformed_soft_terms(
    terms: SoftTerms,
    found: TransformedCodes,
    mask: torch.Tensor | None,
    *,
    separate: bool,
    temperature: float,
    softmax_gradient: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """`SoftTerms` on per-token codebooks, from found's dense logits (the per-token codebooks are
    dense already): (chosen (B, S, H, D) with straight_through's softmax gradient, (p - p.detach())
    @ transformed with p = softmax(logits / temperature), added where softmax_gradient; (the diversity
    loss, the cross-entropy commitment against the indices, masked tokens (mask (B, S) False)
    ignored), each () fp32 or None where off)."""
    heads, chosen = found.chosen.shape[2], found.chosen
    diversity = cross_entropy = None
    if terms.diversity_weight > 0:
        probs = (found.logits * terms.diversity_temperature).softmax(-1).flatten(0, 1).mean(0)  # (S, K)
        diversity = (probs * probs.clamp_min(1e-5).log()).sum(-1).mean()
    if terms.cross_entropy_commitment:
        targets = found.indices if mask is None else found.indices.masked_fill(~mask.unsqueeze(-1), -1)
        targets = to_head_layout(targets, separate)
        cross_entropy = F.cross_entropy(found.logits.flatten(0, 2), targets.flatten(), ignore_index=-1)
    if softmax_gradient:
        probs = (found.logits / temperature).softmax(-1)
        soft = torch.einsum("cbsk,cbskd->cbsd", probs - probs.detach(), found.transformed)
        chosen = chosen + from_head_layout(soft, heads, separate)
    return chosen, (diversity, cross_entropy)
