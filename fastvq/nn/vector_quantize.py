"""`VectorQuantize`: a drop-in for `vector_quantize_pytorch.VectorQuantize` (1.32.0) on fused ops.

Same constructor arguments, defaults, outputs and state_dict keys as 1.32.0, so a checkpoint of
either package loads into the other. The layer is the input layout, the projections, the gradient
estimator (rotation trick or straight-through) and the losses around a token quantizer, an EMA
`fastvq.nn.Codebook` (`token_quantizer`), which holds the state and the op settings (metric,
precision, backend) and runs every op on canonical tokens (heads, N, codebook_dim): the nearest-code
search, the lookup and the EMA statistics never build an N x K matrix or a one-hot; math is fp32
whatever the input dtype.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from ..ops.common import MAX_TOPK
from ..ops.functional import check_index_range
from . import distributed
from .arguments import (
    check_arguments,
    check_exclusive,
    describe,
    is_integer_tensor,
)
from .code_soft_terms import SoftTerms, mean_cross_entropy
from .codebook import Codebook, EmaWeight
from .codebook_optimizer import make_in_place_optimizer, optimize_in_place_, step_in_place_optimizer_
from .codebook_transform import transformed_codes, transformed_soft_terms
from .gradient_estimators import directional_reparam_heads, rotate_to, straight_through, synchronous_update
from .layout import Layout, expand_like, from_tokens, sequence_mask, to_index_layout, to_tokens
from .losses import commitment_loss, orthogonal_reg_loss
from .projection import project, projections
from .token_quantizer import TokenCodes
from .transformed_codebook import TransformedCodebook

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

_Losses = namedtuple("_Losses", ["loss", "commitment", "orthogonal", "diversity", "in_place"])
_Result = namedtuple("_Result", ["quantized", "indices", "losses", "cross_entropy"])


class VectorQuantize(nn.Module):
    """Vector quantization layer with an EMA codebook; arguments as vector-quantize-pytorch 1.32.0.

    Input x: (B, N, dim) (channel_last), (B, dim, N) (channel_last=False), (B, dim) (one token),
    (B, dim, H, W) (accept_image_fmap) or (B, dim, D, H, W) (accept_3d_fmap); any float dtype.
    forward -> quantized (like x, in x's dtype), indices int64 ((B, N), (B,), (B, H, W), ...; a
    last dim of `heads` when heads > 1; -1 for masked and non-finite tokens) and a 0-d float32
    loss (0 in eval).

    fastvq-only keywords: `backend` ("auto" | "torch" | "triton" | "cuda" | "cpu") and `precision` (see
    `fastvq.nearest_code`), kept by the codebook, which passes them to the ops.

    Non-finite tokens (NaN/inf in any head) get index -1 in every head, pass through unchanged,
    and never reach the EMA statistics, k-means or the dead-code sampler;
    `codebook_health()["nonfinite_tokens"]` counts them without a host sync. Zero tokens give empty
    outputs.
    """

    def __init__(
        self,
        dim,
        codebook_size,
        codebook_dim=None,
        heads=1,
        separate_codebook_per_head=False,
        decay=0.8,
        eps=1e-5,
        freeze_codebook=False,
        kmeans_init=False,
        kmeans_iters=10,
        sync_kmeans=True,
        use_cosine_sim=False,
        layernorm_after_project_in=False,
        threshold_ema_dead_code=0,
        channel_last=True,
        accept_image_fmap=False,
        accept_3d_fmap=False,
        commitment_weight=1.0,
        commitment_use_cross_entropy_loss=False,
        orthogonal_reg_weight=0.0,
        orthogonal_reg_active_codes_only=False,
        orthogonal_reg_max_codes=None,
        codebook_diversity_loss_weight=0.0,
        codebook_diversity_temperature=100.0,
        stochastic_sample_codes=False,
        sample_codebook_temp=1.0,
        straight_through=False,
        rotation_trick=None,
        directional_reparam=False,
        directional_reparam_variance=5e-3,
        sync_codebook=None,
        sync_affine_param=False,
        ema_update=None,
        vq_bridge=None,
        manual_ema_update=False,
        learnable_codebook=None,
        in_place_codebook_optimizer=None,
        manual_in_place_optimizer_update=False,
        affine_param=False,
        affine_param_batch_decay=0.99,
        affine_param_codebook_decay=0.9,
        sync_update_v=0.0,
        return_zeros_for_masked_padding=True,
        route_gradients_to_input=True,
        *,
        backend="auto",
        precision=None,
    ):
        super().__init__()
        check_arguments(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            heads=heads,
            commitment_weight=commitment_weight,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
            sample_codebook_temp=sample_codebook_temp,
            sync_update_v=sync_update_v,
            codebook_diversity_loss_weight=codebook_diversity_loss_weight,
            codebook_diversity_temperature=codebook_diversity_temperature,
            directional_reparam_variance=directional_reparam_variance,
        )
        gradient_learnt = directional_reparam or vq_bridge is not None  # 1.32.0's defaults
        ema_update = not gradient_learnt if ema_update is None else ema_update
        learnable_codebook = bool(gradient_learnt if learnable_codebook is None else learnable_codebook)
        rotation_trick = dim > 1 and not directional_reparam if rotation_trick is None else rotation_trick
        check_exclusive(use_cosine_sim=use_cosine_sim, learnable_codebook=learnable_codebook)
        check_exclusive(straight_through=straight_through, rotation_trick=rotation_trick)
        check_exclusive(directional_reparam=directional_reparam, rotation_trick=rotation_trick)
        check_exclusive(directional_reparam=directional_reparam, straight_through=straight_through)
        if directional_reparam and threshold_ema_dead_code == 0:
            raise ValueError(
                "directional_reparam needs dead-code replacement: set threshold_ema_dead_code > 0 "
                "(as vector-quantize-pytorch)"
            )
        check_exclusive(straight_through=straight_through, learnable_codebook=learnable_codebook)
        check_exclusive(ema_update=ema_update, learnable_codebook=learnable_codebook)
        check_exclusive(accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap)
        for name, on in (("vq_bridge", vq_bridge is not None), ("sync_update_v > 0", sync_update_v > 0)):
            if on and not learnable_codebook:
                raise ValueError(f"{name} needs learnable_codebook=True (as vector-quantize-pytorch)")
        if orthogonal_reg_active_codes_only and heads > 1 and separate_codebook_per_head:
            raise ValueError(
                "orthogonal_reg_active_codes_only does not support separate_codebook_per_head "
                "with heads > 1 (as vector-quantize-pytorch)"
            )

        # shapes and projections
        self.dim, self.heads, self.codebook_size = dim, heads, codebook_size
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        self.separate_codebook_per_head = separate_codebook_per_head
        self.has_projections = self.codebook_dim * heads != dim
        self.project_in, self.project_out = projections(
            dim, self.codebook_dim * heads, layernorm=layernorm_after_project_in
        )
        # input layout
        self.channel_last, self.accept_image_fmap, self.accept_3d_fmap = channel_last, accept_image_fmap, accept_3d_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        # gradient estimator, sampling and losses
        self.straight_through, self.rotation_trick = straight_through, rotation_trick
        self.directional_reparam, self.directional_reparam_variance = directional_reparam, directional_reparam_variance
        self.route_gradients_to_input = route_gradients_to_input
        self.learnable_codebook, self.freeze_codebook = learnable_codebook, freeze_codebook
        self.stochastic_sample_codes, self.sample_codebook_temp = stochastic_sample_codes, sample_codebook_temp
        self.commitment_weight, self.orthogonal_reg_weight = commitment_weight, orthogonal_reg_weight
        self.has_commitment_loss = commitment_weight > 0 and not directional_reparam
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.soft_terms = SoftTerms(
            codebook_diversity_loss_weight,
            codebook_diversity_temperature,
            self.has_commitment_loss and commitment_use_cross_entropy_loss,
            straight_through,
        )
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.eps, self.use_cosine_sim, self.sync_update_v = eps, use_cosine_sim, sync_update_v
        # the token quantizer: state, updates and op settings; searched through transformed codes
        codebook_class, transforms = Codebook, {}
        if affine_param or vq_bridge is not None:
            codebook_class, transforms = (
                TransformedCodebook,
                dict(
                    vq_bridge=vq_bridge,
                    affine_param=affine_param,
                    sync_affine_param=sync_affine_param,
                    affine_param_batch_decay=affine_param_batch_decay,
                    affine_param_codebook_decay=affine_param_codebook_decay,
                ),
            )
        self._codebook = codebook_class(
            self.codebook_dim,
            codebook_size,
            heads if separate_codebook_per_head else 1,
            metric="cosine" if use_cosine_sim else "l2",
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            sync_codebook=distributed.is_distributed() if sync_codebook is None else bool(sync_codebook),
            learnable_codebook=learnable_codebook or orthogonal_reg_weight > 0,
            ema_update=ema_update,
            manual_ema_update=manual_ema_update,
            precision=precision,
            backend=backend,
            **transforms,
        )
        self.in_place_codebook_optimizer = make_in_place_optimizer(in_place_codebook_optimizer, self._codebook)
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update

    # ------------------------------------------------------------------------------------------
    # codebook access
    # ------------------------------------------------------------------------------------------

    @property
    def token_quantizer(self) -> Codebook:
        """The token quantizer this layer runs on (a `fastvq.nn.Codebook`): its state is the
        `_codebook.*` entries of the state_dict."""
        return self._codebook

    def use_codebook(self, codebook: Codebook) -> None:
        """Quantize with `codebook`, another layer's `token_quantizer`, from now on: one module
        shared by both layers (ResidualVQ's shared_codebook). It must have this layer's code size,
        number of codes and number of codebooks."""
        expected = (self.codebook_dim, self.codebook_size, self.heads if self.separate_codebook_per_head else 1)
        got = (
            (codebook.dim, codebook.codebook_size, codebook.num_codebooks)
            if isinstance(codebook, Codebook)
            else type(codebook).__name__
        )
        if got != expected:
            raise ValueError(
                f"codebook must be a Codebook of (dim, codebook_size, num_codebooks) = {expected}, got {got}"
            )
        self._codebook = codebook

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> torch.Tensor:
        """The codes: (K, codebook_dim) shared, or (heads, K, codebook_dim) with separate codebooks."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        expected = tuple(self.codebook.shape)
        if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != expected:
            raise ValueError(f"codebook must be a tensor of shape {expected}, got {describe(codes)}")
        with torch.no_grad():
            self._codebook.embed.copy_(codes.reshape(self._codebook.embed.shape))

    def codebook_health(self) -> dict[str, torch.Tensor]:
        """Health of the last training step as 0-d device tensors (reading one syncs, computing
        them does not): usage, perplexity, dead_codes, replaced_codes, nonfinite_tokens. See
        `fastvq.nn.TokenQuantizer.health`."""
        return self._codebook.health()

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of indices shaped as the forward's indices -> (..., heads * codebook_dim), channel
        first for channel_last=False and feature maps; zeros where an index is -1."""
        return self._channel_first(self._codes_from_indices(indices))

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as quantized for these indices (eval mode): codes, projected out,
        in the input layout; zeros for tokens with an index of -1."""
        out = project(self.project_out, self._codes_from_indices(indices))
        missing = indices < 0
        if self.heads > 1:
            missing = missing.any(-1)
        return self._channel_first(out.masked_fill(missing.unsqueeze(-1), 0.0))

    def _codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., [heads]) -> codes (..., heads * codebook_dim), channel last."""
        if not is_integer_tensor(indices):
            raise TypeError(f"indices must be an integer tensor, got {describe(indices)}")
        if self.heads > 1 and (indices.dim() < 1 or indices.shape[-1] != self.heads):
            raise ValueError(
                f"indices must have a last dimension of heads={self.heads}, got shape {tuple(indices.shape)}"
            )
        codes = self._codebook.codes_from_indices(self._per_head(indices))  # (heads, T, codebook_dim)
        leading = indices.shape[:-1] if self.heads > 1 else indices.shape
        return codes.transpose(0, 1).reshape(*leading, self.heads * self.codebook_dim)

    # ------------------------------------------------------------------------------------------
    # EMA helpers of 1.32.0
    # ------------------------------------------------------------------------------------------

    def update_indices(self, x: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """EMA step from given codes: x in the input layout, indices shaped as forward returns them
        (-1: skip), mask (B, N) bool or None. Non-finite tokens are left out (and counted)."""
        tokens, layout = self._to_tokens(x)
        batch, seq = tokens.shape[:2]
        mask = sequence_mask(mask, None, layout, batch, seq)
        expected = (batch, seq) + ((self.heads,) if self.heads > 1 else ())
        if not is_integer_tensor(indices) or indices.numel() != batch * seq * self.heads:
            raise ValueError(
                f"indices must be an integer tensor with {batch * seq * self.heads} entries "
                f"({expected} after flattening the layout), got {describe(indices)}"
            )
        check_index_range(indices, self.codebook_size, bound="codebook_size")
        with torch.no_grad():
            self._codebook.update_(
                self._per_head(self._codebook_input(tokens)),
                self._per_head(indices),
                None if mask is None else mask.reshape(-1),
            )

    update_ema_indices = update_indices

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimizer on the gradients accumulated by the forwards
        (manual_in_place_optimizer_update) and zero them; nothing without one."""
        if self.in_place_codebook_optimizer is not None:
            step_in_place_optimizer_(self.in_place_codebook_optimizer, sync=self._codebook.sync_codebook)

    def expire_codes_(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace dead codes by vectors of x (B, N, heads * codebook_dim), given in codebook space
        (after project_in, as in 1.32.0), never by those where mask (B, N) is False. Training mode only."""
        width = self.heads * self.codebook_dim
        if x.dim() < 2 or x.shape[-1] != width:
            raise ValueError(f"x must have shape (..., heads * codebook_dim = {width}), got {tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got {describe(mask)}")
        z = self._codebook.transform_input(x.reshape(-1, self.heads, self.codebook_dim))
        self._codebook.expire_codes_(z.transpose(0, 1), None if mask is None else mask.reshape(-1))

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        x,
        indices=None,
        mask=None,
        lens=None,
        topk=None,
        sample_codebook_temp=None,
        freeze_codebook=None,
        return_loss_breakdown=False,
        codebook_transform_fn=None,
        ema_update_weight: EmaWeight = None,
        accum_ema_update=False,
        ema_update=None,
    ):
        """Quantize x (see the class docstring for shapes); in training also update the codebook.

        Returns (quantized, indices, loss), plus a LossBreakdown with return_loss_breakdown. With
        `indices` (target codes shaped as the returned indices, -1 ignored): (quantized,
        cross-entropy of the code logits against them), computed with an online log-sum-exp.
        With topk=k (heads=1, k <= 16): the k nearest codes, nearest first, as an extra last dim
        of quantized (before the channel dim moves), indices and a per-token loss.
        """
        tokens, layout = self._to_tokens(x)
        mask = sequence_mask(mask, lens, layout, *tokens.shape[:2])
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        result = self._quantize_tokens(
            tokens,
            mask,
            targets=indices,
            topk=self._check_topk(topk),
            temperature=sample_codebook_temp,
            freeze=freeze,
            ema_update=ema_update,
            ema_update_weight=ema_update_weight,
            accum_ema_update=accum_ema_update,
            transform_fn=codebook_transform_fn,
        )
        out = from_tokens(result.quantized, layout)
        if indices is not None:
            return out, result.cross_entropy
        loss = result.losses.loss
        loss = loss if loss.dim() == 0 else to_index_layout(loss, layout)
        out_indices = to_index_layout(result.indices, layout)
        if not return_loss_breakdown:
            return out, out_indices, loss
        losses = result.losses
        return (
            out,
            out_indices,
            loss,
            LossBreakdown(losses.commitment, losses.diversity, losses.orthogonal, losses.in_place),
        )

    def _quantize_tokens(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        targets=None,
        topk: int | None = None,
        temperature: float | None = None,
        freeze: bool = False,
        ema_update=None,
        ema_update_weight: EmaWeight = None,
        accum_ema_update: bool = False,
        transform_fn=None,
    ) -> _Result:
        """The forward on tokens (B, S, dim) in any float dtype, mask (B, S) bool or None; topk
        checked by `_check_topk`; temperature None: `sample_codebook_temp`. In training also
        updates the codebook (not for top-k).

        -> quantized (B, S, [k,] dim) in tokens' dtype; indices (B, S), (B, S, heads) or (B, S, k)
        int64 (-1: masked or non-finite); losses (0-d, or (B, S, k) per candidate for top-k); and
        with targets (codes shaped as the indices) the mean cross-entropy of the code logits.
        """
        batch, seq = tokens.shape[:2]
        codebook = self._codebook
        z = self._codebook_input(tokens)  # (B, S, heads, codebook_dim)
        per_head = self._per_head(z)  # the token quantizer's tokens (heads, B * S, codebook_dim)
        token_mask = None if mask is None else mask.reshape(-1)
        codebook.init_embed_(per_head, token_mask)
        temperature = self.sample_codebook_temp if temperature is None else temperature
        # no mask: masked tokens get codes too, which count as active codes of the orthogonal loss (as 1.32.0)
        estimated = tokens.requires_grad and self.route_gradients_to_input  # the estimator cuts the softmax
        sampling = self._sampling_temperature(temperature, topk)
        if transform_fn is None:
            searched = codebook.search_codes(per_head, token_mask)  # the codes, or their affine / bridge transform
            found = codebook.quantize(per_head, topk=topk, temperature=sampling, codes=searched)
            soft_codes = self.soft_terms.codes(searched, self.training, temperature, estimated)  # before the update
            soft_losses = self.soft_terms.losses(codebook, per_head, z, found.indices, token_mask, soft_codes)
        else:
            scored = topk is not None or targets is not None
            found, soft_losses = self._transformed_codes(z, transform_fn, temperature, scored, mask, estimated)
            searched = soft_codes = None
        cross_entropy = None if targets is None else self._cross_entropy(per_head, targets, batch * seq, searched)
        if self.training and topk is None:
            if freeze:
                codebook.observe_(per_head, found.indices, token_mask)
            else:
                codebook.update_(
                    per_head,
                    found.indices,
                    token_mask,
                    ema_update=ema_update,
                    weight=ema_update_weight,
                    accumulate=accum_ema_update,
                )
        in_place = torch.zeros((), device=tokens.device)
        if self.in_place_codebook_optimizer is not None and self.training and not freeze:
            optimizer, manual = self.in_place_codebook_optimizer, self.manual_in_place_optimizer_update
            in_place = optimize_in_place_(optimizer, found.codes, z, mask, step=not manual, sync=codebook.sync_codebook)
            searched = codebook.search_codes(per_head, token_mask)
            found = codebook.quantize(per_head, topk=topk, temperature=sampling, codes=searched)
            if targets is not None:
                cross_entropy = self._cross_entropy(per_head, targets, batch * seq, searched)

        # (B, S, G, codebook_dim): G = heads, or the k candidates of top-k (heads = 1)
        z = z.float() if topk is None else z.float().expand(-1, -1, topk, -1)
        codes = (found.codes.transpose(0, 1) if topk is None else found.codes[0]).unflatten(0, (batch, seq))
        # plus straight_through's softmax gradient where it shows
        chosen = self.soft_terms.gradient(codebook, codes, z, soft_codes, temperature, estimated)
        quantized = self._output(chosen, z, tokens, mask, tokens.requires_grad, topk is not None)
        losses = self._losses(codes, z, mask, found.indices, freeze, topk is not None, in_place, soft_losses)
        indices = found.indices.transpose(0, 1) if topk is None else found.indices[0]
        indices = indices.reshape(batch, seq, topk or self.heads)
        if topk is None and self.heads == 1:
            indices = indices[..., 0]
        if mask is not None:
            indices = indices.masked_fill(~expand_like(mask, indices), -1)
        return _Result(quantized, indices, losses, cross_entropy)

    def _output(
        self,
        codes: torch.Tensor,
        z: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor | None,
        input_requires_grad: bool,
        is_topk: bool,
    ) -> torch.Tensor:
        """Quantized tokens (B, S, [k,] dim) in the input dtype from codes and z (B, S, G, D) fp32:
        gradient to the input (rotation trick, directional reparametrisation or straight-through),
        projection, masked padding."""
        quantized = codes
        if self.training and input_requires_grad and self.route_gradients_to_input:
            if self.rotation_trick:
                quantized = rotate_to(z, codes)
            elif self.directional_reparam:
                args = (self.directional_reparam_variance, self.heads, self.separate_codebook_per_head)
                quantized = directional_reparam_heads(z, codes, *args)
            else:
                quantized = straight_through(z, codes)
        if self.training and self.sync_update_v > 0:
            quantized = synchronous_update(quantized, self.sync_update_v)
        out = project(self.project_out, quantized if is_topk else quantized.flatten(2))
        out = out.to(tokens.dtype)
        if mask is None:
            return out
        fill = torch.zeros_like(tokens) if self.return_zeros_for_masked_padding else tokens
        return torch.where(expand_like(mask, out), out, fill.unsqueeze(2) if is_topk else fill)

    def _transformed_codes(
        self, z: torch.Tensor, transform_fn, temperature: float, scored: bool, mask, estimated: bool
    ) -> tuple[TokenCodes, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The codes of z (B, S, heads, D) among the per-token codebooks transform_fn(codes)
        (`transformed_codes`: nearest, or sampled in training), in the token quantizer's layout, with
        straight_through's softmax gradient, and the `SoftTerms` losses, from the dense logits. Top-k
        and target indices (scored) raise ValueError."""
        if not callable(transform_fn):
            raise TypeError(f"codebook_transform_fn must be callable, got {type(transform_fn).__name__}")
        if scored:
            raise ValueError("codebook_transform_fn does not support topk or indices (fastvq)")
        if isinstance(self._codebook, TransformedCodebook) or self.in_place_codebook_optimizer is not None:
            raise ValueError(
                "codebook_transform_fn does not support affine_param, vq_bridge or in_place_codebook_optimizer (fastvq)"
            )
        training = self.training and temperature > 0
        separate, codes = self.separate_codebook_per_head, self._codebook.codes
        sample = temperature if training and self.stochastic_sample_codes else 0.0
        found = transformed_codes(
            z, codes, transform_fn, separate=separate, metric=self._codebook.metric, sample_temperature=sample
        )
        soft_gradient = training and self.straight_through and torch.is_grad_enabled() and not estimated
        chosen, losses = found.chosen, (None, None)
        if self.training:
            chosen, losses = transformed_soft_terms(
                self.soft_terms, found, mask, separate=separate, temperature=temperature, softmax_gradient=soft_gradient
            )
        return TokenCodes(self._per_head(chosen), self._per_head(found.indices), None), losses

    def _losses(
        self,
        codes: torch.Tensor,
        z: torch.Tensor,
        mask: torch.Tensor | None,
        idx: torch.Tensor,
        freeze: bool,
        is_topk: bool,
        in_place: torch.Tensor,
        soft_losses: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> _Losses:
        """The loss as 1.32.0 adds it up: 0 in eval (per-candidate commitment for top-k), else the
        diversity loss, the commitment (codes vs z, fp32, or the cross-entropy of `SoftTerms`) and
        orthogonal regularisation, each times its weight; with the in-place optimizer's loss (0-d,
        not added) for the breakdown."""
        loss = torch.zeros((), device=in_place.device).requires_grad_(self.training)
        commitment = orthogonal = diversity = torch.zeros((), device=in_place.device)
        if is_topk and not self.training:
            commitment = commitment_loss(codes, z, mask, per_token=True)
            loss = commitment * self.commitment_weight if self.has_commitment_loss else commitment
        if self.training and soft_losses[0] is not None:
            diversity = soft_losses[0]
            loss = loss + diversity * self.codebook_diversity_loss_weight
        if self.training and self.has_commitment_loss:
            learnable = self.learnable_codebook and not freeze
            commitment = soft_losses[1]
            if commitment is None:
                commitment = commitment_loss(codes if learnable else codes.detach(), z, mask, per_token=is_topk)
            loss = loss + commitment * self.commitment_weight
        if self.training and self.orthogonal_reg_weight > 0:
            orthogonal = self._orthogonal_loss(idx)
            loss = loss + orthogonal * self.orthogonal_reg_weight
        return _Losses(loss, commitment, orthogonal, diversity, in_place)

    def _check_topk(self, topk) -> int | None:
        if topk is None:
            return None
        check_arguments(topk=topk)
        if self.training and self.in_place_codebook_optimizer is not None:
            raise ValueError(
                "topk cannot be used in training with in_place_codebook_optimizer (as vector-quantize-pytorch)"
            )
        if self.heads > 1:
            raise ValueError(f"topk needs heads=1 (as vector-quantize-pytorch), got heads={self.heads}")
        if self.training and self.commitment_use_cross_entropy_loss:
            raise ValueError(
                "topk in training needs commitment_use_cross_entropy_loss=False (as vector-quantize-pytorch)"
            )
        topk = min(topk, self.codebook_size)
        if topk > MAX_TOPK:
            raise ValueError(
                f"topk must be <= {MAX_TOPK} (the fused search keeps its candidates in registers), got {topk}"
            )
        return topk

    def _sampling_temperature(self, temperature: float, topk: int | None) -> float:
        """The Gumbel temperature of this search (0: the nearest code): 1.32.0 samples in training
        with stochastic_sample_codes and temperature > 0 (Gumbel top-k with topk). Its
        straight_through softmax gradient has no top-k form (1.32.0 fails there), so that raises."""
        if not (self.training and temperature > 0):
            return 0.0
        if self.straight_through and topk is not None:
            raise ValueError(
                "topk in training needs straight_through=False or sample_codebook_temp=0 (1.32.0's "
                "straight-through softmax has no top-k form)"
            )
        return temperature if self.stochastic_sample_codes else 0.0

    def _cross_entropy(self, per_head: torch.Tensor, targets, num_tokens: int, searched: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits of per_head (heads, T, D) to the codes searched against
        target codes shaped as the forward's indices (-1 ignored): 0-d float32, differentiable
        w.r.t. x (and a learnable codebook), on the codes before this step's (in-place) EMA update."""
        count = num_tokens * self.heads
        if not is_integer_tensor(targets) or targets.numel() != count:
            raise ValueError(
                f"indices must be an integer tensor shaped as the returned indices ({count} "
                f"entries), got {describe(targets)}"
            )
        codes = searched.clone() if self.training else searched
        return mean_cross_entropy(self._codebook, per_head, self._per_head(targets), codes)

    def _orthogonal_loss(self, idx: torch.Tensor) -> torch.Tensor:
        return orthogonal_reg_loss(
            self._codebook.embed,
            idx,
            active_codes_only=self.orthogonal_reg_active_codes_only,
            max_codes=self.orthogonal_reg_max_codes,
        )

    # ------------------------------------------------------------------------------------------
    # layouts
    # ------------------------------------------------------------------------------------------

    def _to_tokens(self, x) -> tuple[torch.Tensor, Layout]:
        """x in this layer's input layout -> tokens (B, S, dim) and how to restore the layout."""
        return to_tokens(
            x,
            self.dim,
            channel_last=self.channel_last,
            accept_image_fmap=self.accept_image_fmap,
            accept_3d_fmap=self.accept_3d_fmap,
        )

    def _channel_first(self, t: torch.Tensor) -> torch.Tensor:
        channel_first = not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap
        return t.movedim(-1, 1) if channel_first and t.dim() > 2 else t

    def _per_head(self, t: torch.Tensor) -> torch.Tensor:
        """Per token and head values (B, S, heads, ...) or indices (..., [heads]) -> (heads, T, ...),
        the token quantizer's layout (a view; integer indices become int64)."""
        if not t.dtype.is_floating_point:
            return t.reshape(-1, self.heads).long().transpose(0, 1)
        return t.flatten(0, 1).transpose(0, 1)

    def _codebook_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S, dim) -> projected, split, normalised (cosine) (B, S, heads, codebook_dim)."""
        z = project(self.project_in, tokens).unflatten(-1, (self.heads, self.codebook_dim))
        return self._codebook.transform_input(z)
