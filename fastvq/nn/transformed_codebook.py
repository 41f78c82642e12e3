"""`TransformedCodebook`: an EMA `Codebook` whose search sees its codes through a transform, as
vector-quantize-pytorch 1.32.0's codebook with `vq_bridge` and `affine_param`.

The codes searched (and returned) are bridge(embed) (`vq_bridge`, a module: FVQ's VQBridge), then,
with `affine_param`, moved from the codebook's statistics to the batch's:

    (codes - codebook_mean) * sqrt(batch_variance / codebook_variance) + batch_mean

(standard deviations clamped at sqrt(1e-5)), per codebook and channel. Before each search
(`search_codes`) the affine statistics take an EMA step: batch mean and variance of the unmasked
finite tokens always (also in eval, as 1.32.0), codebook mean and variance of `embed` in training.
The EMA learns from tokens mapped back by the inverse transform, which is affine, so it is applied
to the per-code sums of `code_stats` (`_code_space_sums`), never to an (N, D) copy. The search runs
on the transformed (K, D) codes through the fused ops: no N x K tensor.

State (1.32.0's keys under `_codebook.`): `vq_bridge.*` (the bridge's own), and with affine_param
`batch_mean`, `batch_variance` (None, so absent, until the first batch), `codebook_mean`,
`codebook_variance` (num_codebooks, 1, D) fp32 and their `*_needs_init` flags.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .arguments import check_arguments, check_exclusive
from .codebook import Codebook

MIN_VARIANCE = 1e-5
"""Variances are clamped here before their square root (as 1.32.0)."""


class TransformedCodebook(Codebook):
    """A `Codebook` searched through `vq_bridge` and the affine reparametrisation (module docstring).

    Args beyond `Codebook`'s: vq_bridge (None or an nn.Module mapping codes (H, K, D) fp32 to the
    same shape), affine_param (needs metric "l2"), sync_affine_param (batch statistics over all
    ranks), affine_param_batch_decay, affine_param_codebook_decay (EMA decays in [0, 1]).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        *,
        vq_bridge: nn.Module | None = None,
        affine_param: bool = False,
        sync_affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        **settings,
    ):
        super().__init__(dim, codebook_size, num_codebooks, **settings)
        check_arguments(
            vq_bridge=vq_bridge,
            affine_param_batch_decay=affine_param_batch_decay,
            affine_param_codebook_decay=affine_param_codebook_decay,
        )
        check_exclusive(affine_param=affine_param, use_cosine_sim=self.metric != "l2")
        self.vq_bridge = vq_bridge
        self.affine_param, self.sync_affine_param = bool(affine_param), bool(sync_affine_param)
        if not affine_param:
            return
        self.affine_param_batch_decay = affine_param_batch_decay
        self.affine_param_codebook_decay = affine_param_codebook_decay
        self.register_buffer("batch_mean", None)
        self.register_buffer("batch_variance", None)
        # 1.32.0 leaves these uninitialised (torch.empty) until the first training step
        self.register_buffer("codebook_mean_needs_init", torch.tensor(True))
        self.register_buffer("codebook_mean", torch.zeros(num_codebooks, 1, dim))
        self.register_buffer("codebook_variance_needs_init", torch.tensor(True))
        self.register_buffer("codebook_variance", torch.ones(num_codebooks, 1, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint with batch statistics loads into a codebook that has seen no batch yet."""
        for name in ("batch_mean", "batch_variance"):
            if self.affine_param and self._buffers[name] is None and prefix + name in state_dict:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name], device=self.embed.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def search_codes(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Take the affine statistics' step on tokens (H, N, D) with mask (N,) bool or None, then
        return the transformed codes (num_codebooks, K, D) fp32, differentiable in `embed` (when
        learnable) and the bridge's parameters."""
        if self.affine_param:
            self.update_affine_(tokens, mask)
        codes = self.codes
        if self.vq_bridge is not None:
            codes = self.vq_bridge(codes)
        if self.affine_param:
            scale = (
                self.batch_variance.clamp(min=MIN_VARIANCE) / self.codebook_variance.clamp(min=MIN_VARIANCE)
            ).sqrt()
            codes = (codes - self.codebook_mean) * scale + self.batch_mean
        return codes

    @torch.no_grad()
    def update_affine_(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """One EMA step of the affine statistics: batch mean and variance (biased) of the unmasked
        finite tokens (H, N, D) per codebook and channel, over all ranks with sync_affine_param;
        in training also the codebook's. The first value of each replaces the initial one."""
        if self.training:
            embed = self.embed.detach()
            decay = self.affine_param_codebook_decay
            self._decay_("codebook_mean", embed.mean(1, keepdim=True), decay)
            self._decay_("codebook_variance", embed.var(1, unbiased=False, keepdim=True), decay)
        rows, keep, _ = self._usable_rows(tokens, mask)
        keep = keep.unsqueeze(-1)
        rows = torch.where(keep, rows.float(), 0.0)
        sync = self.sync_affine_param and distributed.is_distributed()
        count, total = keep.sum(1, keepdim=True).float(), rows.sum(1, keepdim=True)
        if sync:
            distributed.all_reduce_sum_(count, total)
        mean = total / count.clamp_min(1)
        squares = torch.where(keep, rows - mean, 0.0).square().sum(1, keepdim=True)
        if sync:
            distributed.all_reduce_sum_(squares)
        seen = count > 0  # a codebook that got no token keeps its batch statistics
        self._decay_("batch_mean", mean, self.affine_param_batch_decay, seen)
        self._decay_("batch_variance", squares / count.clamp_min(1), self.affine_param_batch_decay, seen)

    def _decay_(self, name: str, value: torch.Tensor, decay: float, seen: torch.Tensor | None = None) -> None:
        """buffer = buffer * decay + value * (1 - decay); value itself when the buffer is None or
        its `_needs_init` flag is set (cleared here, without a host sync); unchanged where `seen`
        (broadcastable bool) is False."""
        old = self._buffers[name]
        if old is None:
            self.register_buffer(name, value.clone())
            return
        blended = old * decay + value * (1 - decay)
        needs_init = self._buffers.get(name + "_needs_init")
        if needs_init is not None:
            blended = torch.where(needs_init, value, blended)
            needs_init.fill_(False)
        old.copy_(blended if seen is None else torch.where(seen, blended, old))

    def _code_space_sums(self, counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """Sums of the tokens mapped by the inverse affine transform, from the sums (C, K, D) and
        counts (C, K) of the tokens: sum((x - bm) s + cm) = (sum x - n bm) s + n cm."""
        if not self.affine_param:
            return sums
        if self.batch_variance is None:
            raise RuntimeError("affine_param: no batch statistics yet; run a forward before update_indices")
        scale = (self.codebook_variance.clamp(min=MIN_VARIANCE) / self.batch_variance.clamp(min=MIN_VARIANCE)).sqrt()
        n = counts.unsqueeze(-1)
        return (sums - n * self.batch_mean) * scale + n * self.codebook_mean
