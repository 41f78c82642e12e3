"""The terms of `VectorQuantize` that score every code of a step, as vector-quantize-pytorch 1.32.0
adds them: the codebook diversity loss, the cross-entropy commitment and straight_through's softmax
gradient. Each runs on the fused soft ops (no N x K tensor) against the codes from before the step's
in-place EMA update (`SoftTerms.codes`), so that its backward sees the codes its forward used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gradient_estimators import softmax_straight_through
from .losses import code_diversity_loss
from .token_quantizer import TokenQuantizer


def mean_cross_entropy(
    quantizer: TokenQuantizer, tokens: torch.Tensor, targets: torch.Tensor, codes: torch.Tensor
) -> torch.Tensor:
    """Mean over the targets (H, N) other than -1 of the cross-entropy of the code logits of tokens
    (H, N, D) against them, scored on codes (C, K, D) -> () fp32 (NaN when every target is -1)."""
    return quantizer.cross_entropy(tokens, targets, codes=codes).sum() / (targets >= 0).sum()


@dataclass(frozen=True)
class SoftTerms:
    """Which terms a layer adds. diversity_weight, diversity_temperature: the codebook diversity loss
    (off at weight 0); cross_entropy_commitment: the commitment is the cross-entropy of the code logits
    against each token's own code; softmax_gradient: straight_through's softmax gradient."""

    diversity_weight: float = 0.0
    diversity_temperature: float = 100.0
    cross_entropy_commitment: bool = False
    softmax_gradient: bool = False

    def codes(self, codes: torch.Tensor, training: bool, temperature: float, estimated: bool) -> torch.Tensor | None:
        """A copy of the codes (C, K, D) the tokens are searched against, keeping their gradient, when a
        term is on in this step (training; the softmax gradient also needs temperature > 0, autograd on and an input
        that gets no gradient estimator of its own (estimated False), which would cut it); else None."""
        if not training:
            return None
        softmax_gradient = self.softmax_gradient and temperature > 0 and torch.is_grad_enabled() and not estimated
        if not (softmax_gradient or self.cross_entropy_commitment or self.diversity_weight > 0):
            return None
        return codes.clone()

    def losses(
        self,
        quantizer: TokenQuantizer,
        tokens: torch.Tensor,
        z: torch.Tensor,
        indices: torch.Tensor,
        token_mask: torch.Tensor | None,
        codes: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(diversity loss, cross-entropy commitment), each () fp32 or None where off, on codes from
        `codes` (None: both off): the diversity loss of z (B, S, heads, D); the mean cross-entropy of
        the quantizer's tokens (heads, T, D) against their indices (heads, T), -1 and tokens with
        token_mask (T,) False ignored."""
        if codes is None:
            return None, None
        diversity = cross_entropy = None
        if self.diversity_weight > 0:
            diversity = code_diversity_loss(
                z,
                codes,
                temperature=self.diversity_temperature,
                metric=quantizer.metric,
                precision=quantizer.precision,
                backend=quantizer.backend,
            )
        if self.cross_entropy_commitment:
            targets = indices if token_mask is None else indices.masked_fill(~token_mask, -1)
            cross_entropy = mean_cross_entropy(quantizer, tokens, targets, codes)
        return diversity, cross_entropy

    def gradient(
        self,
        quantizer: TokenQuantizer,
        chosen: torch.Tensor,
        z: torch.Tensor,
        codes: torch.Tensor | None,
        temperature: float,
        estimated: bool,
    ) -> torch.Tensor:
        """chosen (B, S, heads, D), with straight_through's softmax gradient added where this step has
        one (`softmax_straight_through` of z against codes, from `codes`; see `codes` for when)."""
        if not self.softmax_gradient or codes is None or temperature <= 0 or estimated or not torch.is_grad_enabled():
            return chosen
        return softmax_straight_through(
            chosen,
            z,
            codes,
            temperature=temperature,
            metric=quantizer.metric,
            precision=quantizer.precision,
            backend=quantizer.backend,
        )
