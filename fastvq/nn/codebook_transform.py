"""`VectorQuantize.forward(codebook_transform_fn=...)`: every token searched against its own codebook,
`codebook_transform_fn(codes)`, as vector-quantize-pytorch 1.32.0 does (the hook of its implicit neural
codebooks).

The function maps the codes (C, K, D) to per-token codebooks (C, B', S, K, D) in 1.32.0's layout of
the heads: C = 1, B' = B for one head; C = heads, B' = B with one codebook per head; C = 1, B' = B *
heads (batch-major) with a shared codebook. Those codebooks are the caller's dense (N, K, D) tensor,
so the (N, K) distances here are smaller than what the caller already holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .arguments import describe
from .kmeans import l2norm
from .layout import from_head_layout, to_head_layout
from .token_quantizer import finite_rows


def nearest_transformed_codes(
    z: torch.Tensor,
    codes: torch.Tensor,
    transform_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    separate: bool,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code of each token z (B, S, H, D) among its own codebook transform_fn(codes).

    codes: (C, K, D), passed to transform_fn as they are (with their gradient, if any). Distances as
    1.32.0: F.pairwise_distance (its eps of 1e-6 included) for "l2", the dot product with the
    l2-normalised transformed codes for "cosine" (z is normalised already). -> chosen codes
    (B, S, H, D) fp32, differentiable in the transformed codes, and indices (B, S, H) int64; a token
    with a non-finite value in any head gets index -1 in every head and passes through.
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
    indices = logits.argmax(-1)
    chosen = transformed.gather(-2, indices[..., None, None].expand(*indices.shape, 1, z.shape[-1])).squeeze(-2)
    chosen, indices = from_head_layout(chosen, heads, separate), from_head_layout(indices, heads, separate)
    finite = finite_rows(z).all(-1, keepdim=True)  # (B, S, 1): every head finite
    return torch.where(finite.unsqueeze(-1), chosen, z.float()), indices.masked_fill(~finite, -1)
