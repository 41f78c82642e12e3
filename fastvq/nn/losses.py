"""Auxiliary losses of the quantizer layers, in fp32: the commitment loss (codes vs tokens), the
orthogonal regularisation of a codebook and the codebook diversity loss (an entropy over the codes).
None builds an N x K or K x K tensor."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.functional_soft import code_entropy
from .kmeans import l2norm
from .layout import expand_like


def commitment_loss(
    codes: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, *, per_token: bool = False
) -> torch.Tensor:
    """Mean squared error between codes and z (B, S, G, D) fp32 (G heads or top-k candidates):
    over the tokens where mask (B, S) is True (all without a mask) -> () fp32; with per_token, per
    (token, head or candidate) -> (B, S, G) fp32, 0 where masked."""
    sq = F.mse_loss(codes, z, reduction="none")  # saves its inputs, no (codes - z) tensor
    if per_token:
        loss = sq.mean(-1)
        return loss if mask is None else torch.where(expand_like(mask, loss), loss, 0.0)
    if mask is None:
        return sq.mean()
    return torch.where(expand_like(mask, sq), sq, 0.0).sum() / (mask.sum() * math.prod(sq.shape[2:]))


def orthogonal_loss(codes: torch.Tensor) -> torch.Tensor:
    """Orthogonal regularisation (Shin et al. 2021, arXiv:2112.00384, eq. 2) of codes (H, n, D):
    mean squared cosine similarity over all code pairs minus 1/n, from the (H, D, D) Gram matrix
    (sum_ij (c_i . c_j)^2 = |C^T C|_F^2), never the n x n one."""
    heads, n = codes.shape[:2]
    normed = l2norm(codes)
    gram = normed.transpose(1, 2) @ normed
    return gram.pow(2).sum() / (heads * n**2) - 1 / n


def orthogonal_reg_loss(
    codes: torch.Tensor, indices: torch.Tensor, *, active_codes_only: bool = False, max_codes: int | None = None
) -> torch.Tensor:
    """`orthogonal_loss` of codes (H, K, D) as 1.32.0's VectorQuantize selects them: only the codes
    in indices (any shape, -1 ignored) with active_codes_only, then at most max_codes of them drawn
    by torch.randperm (None: all). -> () fp32."""
    if active_codes_only:
        codes = codes[:, torch.unique(indices[indices >= 0])]
    num_codes = codes.shape[1]
    if max_codes is not None and num_codes > max_codes:
        codes = codes[:, torch.randperm(num_codes, device=codes.device)[:max_codes]]
    return orthogonal_loss(codes)


def code_diversity_loss(
    z: torch.Tensor,
    codes: torch.Tensor,
    *,
    temperature: float,
    metric: str,
    precision: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """vector-quantize-pytorch 1.32.0's codebook diversity loss: minus the entropy (log clamped at
    1e-5) of each sequence position's distribution over the codes, p = softmax(logits * temperature),
    averaged over the batch and the heads, then averaged over the positions -> () fp32.

    z: (B, S, heads, D) tokens as the codes are compared with them; codes: (C, K, D), one codebook
    shared by the heads (C = 1) or one per head. Logits as `fastvq.code_entropy`'s for `metric`
    ("l2": minus the distance). Every token counts (1.32.0 applies no mask); a token with a
    non-finite value is left out of the means. Each position's mean comes from the fused
    `code_entropy` with the positions as its heads: no (N, K) tensor, only the (S, K) means.
    """
    shared = codes.shape[0] == 1
    groups = [z] if shared else [z[:, :, c : c + 1] for c in range(codes.shape[0])]
    mean_probs = 0.0
    for group, codebook in zip(groups, codes.unbind(0)):
        tokens = group.transpose(0, 1).flatten(1, 2)  # (S, B * heads of this codebook, D)
        _, probs = code_entropy(
            tokens,
            codebook.expand(tokens.shape[0], -1, -1),
            temperature=1.0 / temperature,
            metric=metric,
            precision=precision,
            backend=backend,
        )
        mean_probs = mean_probs + probs / len(groups)
    entropy = -(mean_probs * mean_probs.clamp_min(1e-5).log()).sum(-1)
    return -entropy.mean()
