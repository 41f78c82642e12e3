"""IBQ's reference formula: TencentARC SEED-Voken's `IndexPropagationQuantize.forward` and its
`compute_entropy_loss`, written densely with their N x K tables (logits, softmax, hard and straight-
through one-hots, the entropy's probabilities and log-probabilities) as its source reads. The twin of
`fastvq.nn.IBQ`, which computes the same without any N x K tensor: what the tests check the soft ops
and the layer against, and what the benchmarks time it against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ibq import AVG_ENTROPY_EPS


def ibq_reference(z, embedding, *, beta=0.25, temperature=0.01, sample_weight=1.0, batch_weight=1.0):
    """SEED-Voken's forward on z (B, D, H, W) with the codebook embedding (K, D), in their dtype:
    (z_q (B, D, H, W), indices (B H W,) int64, quant_loss, sample_entropy, avg_entropy, entropy_loss),
    the last four 0-d."""
    logits = torch.einsum("bdhw,nd->bnhw", z, embedding)
    soft_one_hot = F.softmax(logits, dim=1)
    ind = soft_one_hot.max(1, keepdim=True)[1]
    hard_one_hot = torch.zeros_like(logits).scatter_(1, ind, 1.0)
    one_hot = hard_one_hot - soft_one_hot.detach() + soft_one_hot
    z_q = torch.einsum("bnhw,nd->bdhw", one_hot, embedding)
    z_q_2 = torch.einsum("bnhw,nd->bdhw", hard_one_hot, embedding)
    quant_loss = (
        torch.mean((z_q - z) ** 2)
        + torch.mean((z_q_2.detach() - z) ** 2)
        + beta * torch.mean((z_q_2 - z.detach()) ** 2)
    )
    flat = logits.permute(0, 2, 3, 1).reshape(-1, embedding.shape[0])  # compute_entropy_loss
    probs = F.softmax(flat / temperature, -1)
    log_probs = F.log_softmax(flat / temperature + AVG_ENTROPY_EPS, -1)
    avg_probs = probs.mean(0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + AVG_ENTROPY_EPS))
    sample_entropy = torch.mean(-torch.sum(probs * log_probs, -1))
    entropy_loss = sample_weight * sample_entropy - batch_weight * avg_entropy
    return z_q, ind.flatten(), quant_loss, sample_entropy, avg_entropy, entropy_loss
