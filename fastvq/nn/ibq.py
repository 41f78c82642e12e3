"""`IBQ`: index backpropagation quantization (Shi et al. 2024, TencentARC SEED-Voken
`IndexPropagationQuantize`) on the fused soft ops: a learned codebook whose every code gets a gradient.

SEED-Voken's formulas, for tokens z (N, D) and the codebook E = `embedding.weight` (K, D), logits
l = z E^T:

    soft = softmax(l); hard = one_hot(argmax l); z_q = (hard - soft.detach() + soft) @ E
    quant_loss = mean((z_q - z)^2) + mean(((hard @ E).detach() - z)^2) + beta mean((hard @ E - z.detach())^2)
    p = softmax(l / T); sample_entropy = mean_n(-sum_k p log p); avg = mean_n(p)
    avg_entropy = -sum_k avg log(avg + 1e-5)
    entropy_loss = sample_minimization_weight sample_entropy - batch_maximization_weight avg_entropy

Each of l, soft, hard, one_hot, p and log p is an N x K table in SEED-Voken (1.07 GB each at 1024
tokens and 262,144 codes); here z_q and its gradient come from `fastvq.soft_quantize` and the
entropies from `fastvq.code_entropy`, which stream (token, code) tiles: O(N + K) extra memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..ops.functional_soft import code_entropy, soft_quantize
from .arguments import check_arguments
from .layout import from_tokens, sequence_mask, to_index_layout, to_tokens
from .losses import commitment_loss
from .token_quantizer import TokenQuantizer, finite_rows

AVG_ENTROPY_EPS = 1e-5
"""SEED-Voken's eps in avg_entropy = -sum avg log(avg + eps)."""


class IBQLossBreakdown(NamedTuple):
    """The terms of `IBQ`'s loss, 0-d fp32: quant_loss (SEED-Voken's three terms), sample_entropy,
    avg_entropy and entropy_loss (the last three 0 without `use_entropy_loss`)."""

    quant_loss: torch.Tensor
    sample_entropy: torch.Tensor
    avg_entropy: torch.Tensor
    entropy_loss: torch.Tensor


class IBQ(TokenQuantizer):
    """Index backpropagation quantizer: SEED-Voken's `IndexPropagationQuantize` with fastvq's
    interface, never an N x K tensor.

    Args:
        dim: D, the channels of a token and the size of a code.
        codebook_size: K.
        beta: weight of the codebook term mean((hard code - z.detach())^2) of the quantization loss.
        use_entropy_loss: add SEED-Voken's entropy loss (per-token entropy of softmax(logits /
            entropy_temperature) minus the entropy of its batch mean, with the two weights).
        entropy_temperature: T > 0 of that softmax (the quantization's softmax has T = 1).
        sample_minimization_weight, batch_maximization_weight: its weights.
        precision, backend: passed to the ops (see `fastvq.nearest_code`; at T = 0.01 "ieee" keeps
            TF32's rounding of a logit from being multiplied by 100).

    The codebook is the parameter `embedding.weight` (K, D), SEED-Voken's name and initialisation
    (`nn.Embedding`'s N(0, 1)), so its state_dict loads. Logits are z . c ("dot"), in fp32.
    `health()` / `codebook_health()` report the usage of the last training batch.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        use_entropy_loss: bool = False,
        entropy_temperature: float = 0.01,
        sample_minimization_weight: float = 1.0,
        batch_maximization_weight: float = 1.0,
        precision: str | None = None,
        backend: str = "auto",
    ):
        super().__init__(dim, codebook_size, 1, metric="dot", precision=precision, backend=backend)
        check_arguments(
            beta=beta,
            entropy_temperature=entropy_temperature,
            sample_minimization_weight=sample_minimization_weight,
            batch_maximization_weight=batch_maximization_weight,
        )
        self.beta, self.use_entropy_loss, self.entropy_temperature = beta, bool(use_entropy_loss), entropy_temperature
        self.sample_minimization_weight = sample_minimization_weight
        self.batch_maximization_weight = batch_maximization_weight
        self.embedding = nn.Embedding(codebook_size, dim)

    @property
    def codes(self) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) int in [-1, K) -> their codes (..., dim) fp32 (zeros for -1), for decoding."""
        return self.codes_from_indices(indices.reshape(1, -1))[0].view(*indices.shape, self.dim)

    def codebook_health(self) -> dict[str, torch.Tensor]:
        """`health()`, under `VectorQuantize`'s name."""
        return self.health()

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, return_loss_breakdown: bool = False):
        """Quantize z: tokens (B, N, dim), one token per sample (B, dim) or a feature map (B, dim, H, W)
        (channel first, as SEED-Voken's), any float dtype; mask (B, N) bool for tokens (False: leave out).

        Returns (quantized, indices, loss), plus an `IBQLossBreakdown` with return_loss_breakdown:
        quantized like z (shape, dtype), the nearest code by z . c with the gradient of SEED-Voken's
        one_hot @ E to z and to every code; indices int64 shaped as z without its channel dim;
        loss 0-d fp32 = quant_loss (+ entropy_loss), as SEED-Voken computes it in training and eval.
        Masked tokens and tokens with a NaN/inf value get index -1, pass through unchanged and
        count in no loss, mean or statistic (the means are over the other tokens: NaN when there is
        none, as torch's mean of nothing).
        """
        tokens, layout = to_tokens(z, self.dim, accept_image_fmap=isinstance(z, torch.Tensor) and z.dim() == 4)
        batch, seq = tokens.shape[:2]
        mask = sequence_mask(mask, None, layout, batch, seq)
        flat = tokens.reshape(batch * seq, self.dim)
        token_mask = None if mask is None else mask.reshape(-1)
        keep = finite_rows(flat) if token_mask is None else finite_rows(flat) & token_mask
        kept = torch.where(keep[:, None], flat, 0.0)  # no NaN of a left-out token reaches a sum or a gradient
        codebook = self.embedding.weight
        settings = dict(metric="dot", precision=self.precision, backend=self.backend)
        soft, indices = soft_quantize(kept, codebook, temperature=1.0, **settings)
        indices = indices.masked_fill(~keep, -1)
        hard = self.codes_from_indices(indices.unsqueeze(0), check_indices=False)[0]  # gradient to the codes only
        z32 = kept.float()

        def mean_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return commitment_loss(a.view(1, -1, 1, self.dim), b.view(1, -1, 1, self.dim), keep.view(1, -1))

        quant_loss = mean_sq(soft.float(), z32) + mean_sq(hard.detach(), z32) + self.beta * mean_sq(hard, z32.detach())
        zero = torch.zeros((), device=flat.device)
        terms = IBQLossBreakdown(quant_loss, zero, zero, zero)
        if self.use_entropy_loss:
            terms = self._entropy_terms(kept, keep, quant_loss, settings)
        if self.training:
            self.update_(flat.detach().unsqueeze(0), indices.unsqueeze(0), token_mask)
        quantized = torch.where(keep[:, None], soft, flat).view(batch, seq, self.dim)
        loss = terms.quant_loss + terms.entropy_loss
        out = (from_tokens(quantized, layout), to_index_layout(indices.view(batch, seq), layout), loss)
        return (*out, terms) if return_loss_breakdown else out

    def _entropy_terms(
        self, kept: torch.Tensor, keep: torch.Tensor, quant_loss: torch.Tensor, settings: dict
    ) -> IBQLossBreakdown:
        """SEED-Voken's `compute_entropy_loss` over the kept tokens: its log_softmax(l / T + eps) is
        log p exactly (a constant shift), so the exact entropy of `code_entropy` is its sample entropy."""
        entropy, mean_probs = code_entropy(
            kept, self.embedding.weight, temperature=self.entropy_temperature, mask=keep, **settings
        )
        sample_entropy = entropy.sum() / keep.sum()
        avg_entropy = -(mean_probs * torch.log(mean_probs + AVG_ENTROPY_EPS)).sum()
        entropy_loss = self.sample_minimization_weight * sample_entropy - self.batch_maximization_weight * avg_entropy
        return IBQLossBreakdown(quant_loss, sample_entropy, avg_entropy, entropy_loss)
