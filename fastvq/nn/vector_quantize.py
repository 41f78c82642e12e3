"""`VectorQuantize`: a drop-in for `vector_quantize_pytorch.VectorQuantize` (1.32.0) on fused ops.

Same constructor arguments, defaults, outputs and state_dict keys as 1.32.0, so a checkpoint of
either package loads into the other. The nearest-code search, the lookup and the EMA statistics run
on `fastvq.ops` (no N x K distance matrix, no one-hot); math is fp32 whatever the input
dtype. The module parses arguments, reshapes between the input layout and canonical rows
(H, N, D) and computes the losses; `fastvq.nn.codebook.Codebook` holds the state, its updates and
the op settings (metric, precision, backend), and runs every op.
"""

from __future__ import annotations

import math
import numbers
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.common import MAX_TOPK
from . import distributed
from .codebook import Codebook, EmaWeight
from .kmeans import L2NORM_EPS, l2norm
from .layout import Layout, describe, expand_like, from_tokens, sequence_mask, to_index_layout, to_tokens

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg",
                                             "inplace_optimize"])

# 1.32.0 arguments fastvq does not implement, with their defaults: any other value raises.
UNSUPPORTED = {
    "commitment_use_cross_entropy_loss": False,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_affine_param": False,
    "vq_bridge": None,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
}

SAFE_DIV_EPS = 1e-6


def _rotation(src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row terms (..., 1) of the rotation trick for src, tgt (..., D), from three row reductions.

    With u = src / |src|, q = tgt / |tgt| (norms clamped to SAFE_DIV_EPS) and w = l2norm(u + q) =
    src / (|src| n) + tgt / (|tgt| n), n = max(|u + q|, L2NORM_EPS), the rotation R v = v - 2 (v.w) w +
    2 (v.u) q and its transpose (q and u swapped) are v + a src + b tgt, with a and b from v.src and
    v.tgt (`_rotate`). -> 1 / (|src| n), 1 / (|tgt| n), 1 / (|src| |tgt|), the rescaling |tgt| / |src|,
    src.src and src.tgt. |u + q| comes from the reductions (|u|^2 + 2 u.q + |q|^2): it loses relative
    precision only where src and tgt point nearly opposite ways (|u + q| << 1).
    """
    src_norm = torch.linalg.vector_norm(src, dim=-1, keepdim=True)
    tgt_norm = torch.linalg.vector_norm(tgt, dim=-1, keepdim=True)
    src_tgt = (src * tgt).sum(-1, keepdim=True)
    src_safe, tgt_safe = src_norm.clamp_min(SAFE_DIV_EPS), tgt_norm.clamp_min(SAFE_DIV_EPS)
    inv_st = 1 / (src_safe * tgt_safe)
    n = ((src_norm / src_safe).square() + 2 * src_tgt * inv_st + (tgt_norm / tgt_safe).square())
    n = n.clamp_min(0).sqrt().clamp_min(L2NORM_EPS)
    return 1 / (src_safe * n), 1 / (tgt_safe * n), inv_st, tgt_norm / src_safe, src_norm.square(), src_tgt


def _rotate(v, src, tgt, v_src, v_tgt, terms, transpose: bool) -> torch.Tensor:
    """(R v or R^T v) times the rescaling, for v (..., D) with its row products v_src, v_tgt (..., 1)
    and `terms` of `_rotation`: two fused multiply-adds over the rows, no (..., D) constant."""
    inv_sn, inv_tn, inv_st, scale = terms[:4]
    vw2 = 2 * (v_src * inv_sn + v_tgt * inv_tn)  # 2 (v.w) / n, less the 1 / |src|, 1 / |tgt| factors
    if transpose:  # v - 2 (v.w) w + 2 (v.q) u
        on_src, on_tgt = 2 * v_tgt * inv_st - vw2 * inv_sn, -vw2 * inv_tn
    else:  # v - 2 (v.w) w + 2 (v.u) q
        on_src, on_tgt = -vw2 * inv_sn, 2 * v_src * inv_st - vw2 * inv_tn
    return (v * scale).addcmul_(src, on_src * scale).addcmul_(tgt, on_tgt * scale)


class _RotateTo(torch.autograd.Function):
    """Forward: the rotation R = I - 2 w w^T + 2 q u^T applied to src, times |tgt| / |src|, which
    equals tgt; backward: the transpose applied to the gradient. Saves src, tgt and six numbers per
    row (autograd of the plain formula keeps three more (..., D) tensors)."""

    @staticmethod
    def forward(ctx, src, tgt):
        terms = _rotation(src, tgt)
        ctx.save_for_backward(src, tgt, *terms)
        return _rotate(src, src, tgt, terms[4], terms[5], terms, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        src, tgt, *terms = ctx.saved_tensors
        grad_src, grad_tgt = (grad * src).sum(-1, keepdim=True), (grad * tgt).sum(-1, keepdim=True)
        return _rotate(grad, src, tgt, grad_src, grad_tgt, terms, transpose=True), None


def rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024, arXiv:2410.06424, sec. 4.2): the values of tgt, with the
    gradient reaching src through the rotation and rescaling that map src onto tgt (treated as
    constants; tgt gets no gradient). src, tgt (..., D) of one dtype; O(N D), no D x D matrix."""
    return _RotateTo.apply(src, tgt)


def orthogonal_loss(codes: torch.Tensor) -> torch.Tensor:
    """Orthogonal regularisation (Shin et al. 2021, arXiv:2112.00384, eq. 2) of codes (H, n, D):
    mean squared cosine similarity over all code pairs minus 1/n, from the (H, D, D) Gram matrix
    (sum_ij (c_i . c_j)^2 = |C^T C|_F^2), never the n x n one."""
    heads, n = codes.shape[:2]
    normed = l2norm(codes)
    gram = normed.transpose(1, 2) @ normed
    return gram.pow(2).sum() / (heads * n ** 2) - 1 / n


_Losses = namedtuple("_Losses", ["loss", "commitment", "orthogonal"])
TokenResult = namedtuple("TokenResult", ["quantized", "indices", "losses", "cross_entropy"])


class VectorQuantize(nn.Module):
    """Vector quantization layer with an EMA codebook; arguments as vector-quantize-pytorch 1.32.0.

    Input x: (B, N, dim) (channel_last), (B, dim, N) (channel_last=False), (B, dim) (one token),
    (B, dim, H, W) (accept_image_fmap) or (B, dim, D, H, W) (accept_3d_fmap); any float dtype.
    forward -> quantized (like x, in x's dtype), indices int64 ((B, N), (B,), (B, H, W), ...; a
    last dim of `heads` when heads > 1; -1 for masked and non-finite tokens) and a 0-d float32
    loss (0 in eval).

    fastvq-only keywords: `backend` ("auto" | "torch" | "triton" | "cuda" | "cpu") and `precision` (see
    `fastvq.nearest_code`), kept by the codebook, which passes them to the ops. The arguments
    named in `UNSUPPORTED` raise NotImplementedError when not at their default.

    Non-finite tokens (NaN/inf in any head) get index -1 in every head, pass through unchanged,
    and never reach the EMA statistics, k-means or the dead-code sampler;
    `codebook_health()["nonfinite_tokens"]` counts them without a host sync. Zero tokens give empty
    outputs.
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False,
                 decay=0.8, eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10,
                 sync_kmeans=True, use_cosine_sim=False, layernorm_after_project_in=False,
                 threshold_ema_dead_code=0, channel_last=True, accept_image_fmap=False, accept_3d_fmap=False,
                 commitment_weight=1.0, commitment_use_cross_entropy_loss=False, orthogonal_reg_weight=0.0,
                 orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
                 codebook_diversity_loss_weight=0.0, codebook_diversity_temperature=100.0,
                 stochastic_sample_codes=False, sample_codebook_temp=1.0, straight_through=False,
                 rotation_trick=None, directional_reparam=False, directional_reparam_variance=5e-3,
                 sync_codebook=None, sync_affine_param=False, ema_update=None, vq_bridge=None,
                 manual_ema_update=False, learnable_codebook=None, in_place_codebook_optimizer=None,
                 manual_in_place_optimizer_update=False, affine_param=False, affine_param_batch_decay=0.99,
                 affine_param_codebook_decay=0.9, sync_update_v=0.0, return_zeros_for_masked_padding=True,
                 route_gradients_to_input=True, *, backend="auto", precision=None):
        super().__init__()
        given = dict(locals())
        for name, default in UNSUPPORTED.items():
            if given[name] != default:
                raise NotImplementedError(f"fastvq.VectorQuantize does not implement {name} (got "
                                          f"{given[name]!r}, supported: {default!r})")
        for name in ("dim", "codebook_size", "heads") + (("kmeans_iters",) if kmeans_init else ()):
            _check_int(name, given[name], minimum=1)
        if codebook_dim is not None:
            _check_int("codebook_dim", codebook_dim, minimum=1)
        _check_number("decay", decay, maximum=1.0)
        for name in ("eps", "threshold_ema_dead_code", "commitment_weight", "orthogonal_reg_weight",
                     "sample_codebook_temp"):
            _check_number(name, given[name])
        if orthogonal_reg_max_codes is not None:
            _check_int("orthogonal_reg_max_codes", orthogonal_reg_max_codes, minimum=1)

        ema_update = True if ema_update is None else ema_update
        learnable_codebook = bool(learnable_codebook)
        rotation_trick = dim > 1 if rotation_trick is None else rotation_trick
        _check_exclusive(use_cosine_sim=use_cosine_sim, learnable_codebook=learnable_codebook)
        _check_exclusive(straight_through=straight_through, rotation_trick=rotation_trick)
        _check_exclusive(straight_through=straight_through, learnable_codebook=learnable_codebook)
        _check_exclusive(ema_update=ema_update, learnable_codebook=learnable_codebook)
        _check_exclusive(accept_image_fmap=accept_image_fmap, accept_3d_fmap=accept_3d_fmap)
        if orthogonal_reg_active_codes_only and heads > 1 and separate_codebook_per_head:
            raise ValueError("orthogonal_reg_active_codes_only does not support separate_codebook_per_head "
                             "with heads > 1 (as vector-quantize-pytorch)")

        self.dim, self.heads, self.codebook_size = dim, heads, codebook_size
        self.separate_codebook_per_head = separate_codebook_per_head
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = self.codebook_dim * heads
        self.has_projections = codebook_input_dim != dim
        if self.has_projections:
            linear = nn.Linear(dim, codebook_input_dim)
            self.project_in = (nn.Sequential(linear, nn.LayerNorm(codebook_input_dim))
                               if layernorm_after_project_in else linear)
            self.project_out = nn.Linear(codebook_input_dim, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        self.eps, self.use_cosine_sim = eps, use_cosine_sim
        self.commitment_weight, self.orthogonal_reg_weight = commitment_weight, orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.straight_through, self.rotation_trick = straight_through, rotation_trick
        self.learnable_codebook = learnable_codebook
        self.route_gradients_to_input = route_gradients_to_input
        self.channel_last = channel_last
        self.accept_image_fmap, self.accept_3d_fmap = accept_image_fmap, accept_3d_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.freeze_codebook = freeze_codebook
        self._codebook = Codebook(
            self.codebook_dim, codebook_size, heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, sync_kmeans=sync_kmeans, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            sync_codebook=distributed.is_distributed() if sync_codebook is None else bool(sync_codebook),
            learnable_codebook=learnable_codebook or orthogonal_reg_weight > 0, ema_update=ema_update,
            manual_ema_update=manual_ema_update, use_cosine_sim=use_cosine_sim, precision=precision,
            backend=backend)

    # ------------------------------------------------------------------------------------------
    # codebook access
    # ------------------------------------------------------------------------------------------

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
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codebook must be a tensor of shape {expected}, got {got}")
        with torch.no_grad():
            self._codebook.embed.copy_(codes.reshape(self._codebook.embed.shape))

    def codebook_health(self) -> dict[str, torch.Tensor]:
        """Health of the last training step as 0-d device tensors (reading one syncs, computing
        them does not): usage, perplexity, dead_codes, replaced_codes, nonfinite_tokens. See
        `fastvq.nn.codebook.Codebook.health`."""
        return self._codebook.health()

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of indices shaped as the forward's indices -> (..., heads * codebook_dim), channel
        first for channel_last=False and feature maps; zeros where an index is -1."""
        return self._channel_first(self._codes_from_indices(indices))

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as quantized for these indices (eval mode): codes, projected out,
        in the input layout; zeros for tokens with an index of -1."""
        codes = self._codes_from_indices(indices)
        out = self.project_out(codes.to(self._param_dtype(self.project_out, codes)))
        missing = indices < 0
        if self.heads > 1:
            missing = missing.any(-1)
        return self._channel_first(out.masked_fill(missing.unsqueeze(-1), 0.0))

    def _codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., [heads]) -> codes (..., heads * codebook_dim), channel last."""
        if not _is_integer_tensor(indices):
            raise TypeError(f"indices must be an integer tensor, got {describe(indices)}")
        if self.heads > 1 and (indices.dim() < 1 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices must have a last dimension of heads={self.heads}, got shape "
                             f"{tuple(indices.shape)}")
        self._check_index_range(indices)
        indices = indices.long()
        embed, safe = self._codebook.embed, indices.clamp_min(0)
        if self.heads > 1 and self.separate_codebook_per_head:
            codes = embed[torch.arange(self.heads, device=indices.device), safe]
        else:
            codes = embed[0][safe]
        codes = codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)
        return codes if self.heads == 1 else codes.flatten(-2)

    # ------------------------------------------------------------------------------------------
    # EMA helpers of 1.32.0
    # ------------------------------------------------------------------------------------------

    def update_indices(self, x: torch.Tensor, indices: torch.Tensor,
                       mask: torch.Tensor | None = None) -> None:
        """EMA step from given codes: x in the input layout, indices shaped as forward returns them
        (-1: skip). Non-finite tokens are left out (and counted)."""
        tokens, layout = self._to_tokens(x)
        self._update_tokens(tokens, indices, sequence_mask(mask, None, layout, *tokens.shape[:2]))

    def _update_tokens(self, tokens: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None) -> None:
        """`update_indices` on tokens (B, S, dim), mask (B, S) bool or None."""
        batch, seq = tokens.shape[:2]
        expected = (batch, seq) + ((self.heads,) if self.heads > 1 else ())
        if not _is_integer_tensor(indices) or indices.numel() != math.prod(expected):
            raise ValueError(f"indices must be an integer tensor with {math.prod(expected)} entries "
                             f"({expected} after flattening the layout), got {describe(indices)}")
        self._check_index_range(indices)
        with torch.no_grad():
            rows = self._to_rows(self._codebook_input(tokens).flatten(0, 1))
            keep, num_nonfinite = self._usable_rows(torch.isfinite(rows).all(-1), mask)
            self._codebook.update_(rows, self._to_rows(indices.reshape(-1, self.heads).long()), keep,
                                   num_nonfinite)

    update_ema_indices = update_indices

    def expire_codes_(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace dead codes by vectors of x (B, N, heads * codebook_dim), given in codebook space
        (after project_in, as in 1.32.0), never by those where mask (B, N) is False. Training mode only."""
        width = self.heads * self.codebook_dim
        if x.dim() < 2 or x.shape[-1] != width:
            raise ValueError(f"x must have shape (..., heads * codebook_dim = {width}), got {tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1]):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])}, got {describe(mask)}")
        z = self._codebook.transform_input(x.reshape(-1, self.heads, self.codebook_dim))
        self._codebook.expire_codes_(self._to_rows(z), self._row_mask(mask))

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight: EmaWeight = None, accum_ema_update=False, ema_update=None):
        """Quantize x (see the class docstring for shapes); in training also update the codebook.

        Returns (quantized, indices, loss), plus a LossBreakdown with return_loss_breakdown. With
        `indices` (target codes shaped as the returned indices, -1 ignored): (quantized,
        cross-entropy of the code logits against them), computed with an online log-sum-exp.
        With topk=k (heads=1, k <= 16): the k nearest codes, nearest first, as an extra last dim
        of quantized (before the channel dim moves), indices and a per-token loss.
        """
        if codebook_transform_fn is not None:
            raise NotImplementedError("fastvq.VectorQuantize does not implement codebook_transform_fn")
        tokens, layout = self._to_tokens(x)
        mask = sequence_mask(mask, lens, layout, *tokens.shape[:2])
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        result = self._quantize_tokens(tokens, mask, targets=indices, topk=self._check_topk(topk),
                                       temperature=sample_codebook_temp, freeze=freeze, ema_update=ema_update,
                                       ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update)
        out = from_tokens(result.quantized, layout)
        if indices is not None:
            return out, result.cross_entropy
        loss = result.losses.loss
        loss = loss if loss.dim() == 0 else to_index_layout(loss, layout)
        out_indices = to_index_layout(result.indices, layout)
        if not return_loss_breakdown:
            return out, out_indices, loss
        zero = torch.zeros((), device=x.device)
        return out, out_indices, loss, LossBreakdown(result.losses.commitment, zero, result.losses.orthogonal, zero)

    def _quantize_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None, *, targets=None,
                         topk: int | None = None, temperature: float | None = None, freeze: bool = False,
                         ema_update=None, ema_update_weight: EmaWeight = None,
                         accum_ema_update: bool = False) -> TokenResult:
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
        rows = self._to_rows(z.flatten(0, 1))  # (H, M, codebook_dim), M = B * S * heads / H
        codebook.init_embed_(rows, self._row_mask(mask))
        temperature = self.sample_codebook_temp if temperature is None else temperature
        temperature = self._sampling_temperature(temperature, tokens, rows)
        idx = self._whole_tokens(codebook.search(rows, temperature=temperature, topk=topk))
        embed = codebook.embed if codebook.learnable_codebook else codebook.embed.detach()
        codes = codebook.lookup(rows, embed, idx)  # fp32, gradient only to the codebook
        cross_entropy = None
        if targets is not None:  # logits of the codebook before this step's (in-place) update
            before = embed.clone() if self.training else embed
            cross_entropy = self._cross_entropy(rows, before, targets, batch, seq)
        if self.training and topk is None:
            keep, num_nonfinite = self._usable_rows(idx >= 0, mask)
            if freeze:
                codebook.observe_(idx, keep, num_nonfinite)
            else:
                codebook.update_(rows, idx, keep, num_nonfinite, ema_update=ema_update,
                                 weight=ema_update_weight, accumulate=accum_ema_update)

        # (B, S, G, codebook_dim): G = heads, or the k candidates of top-k (heads = 1)
        z = z.float() if topk is None else z.float().expand(-1, -1, topk, -1)
        codes = (self._from_rows(codes) if topk is None else codes[0]).unflatten(0, (batch, seq))
        quantized = self._output(codes, z, tokens, mask, tokens.requires_grad, topk is not None)
        losses = self._losses(codes, z, mask, idx, freeze, topk is not None, tokens.device)
        indices = (self._from_rows(idx) if topk is None else idx[0]).reshape(batch, seq, topk or self.heads)
        if topk is None and self.heads == 1:
            indices = indices[..., 0]
        if mask is not None:
            indices = indices.masked_fill(~expand_like(mask, indices), -1)
        return TokenResult(quantized, indices, losses, cross_entropy)

    def _output(self, codes: torch.Tensor, z: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor | None, input_requires_grad: bool, is_topk: bool) -> torch.Tensor:
        """Quantized tokens (B, S, [k,] dim) in the input dtype from codes and z (B, S, G, D) fp32:
        gradient to the input (rotation trick or straight-through), projection, masked padding."""
        quantized = codes
        if self.training and input_requires_grad and self.route_gradients_to_input:
            quantized = rotate_to(z, codes) if self.rotation_trick else z + (codes - z).detach()
        out = self._project(self.project_out, quantized if is_topk else quantized.flatten(2))
        out = out.to(tokens.dtype)
        if mask is None:
            return out
        fill = torch.zeros_like(tokens) if self.return_zeros_for_masked_padding else tokens
        return torch.where(expand_like(mask, out), out, fill.unsqueeze(2) if is_topk else fill)

    def _losses(self, codes: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None,
                idx: torch.Tensor, freeze: bool, is_topk: bool, device: torch.device) -> _Losses:
        """The loss as 1.32.0 adds it up: 0 in eval (per-candidate commitment for top-k), else
        commitment (codes vs z, fp32) and orthogonal regularisation, each times its weight."""
        loss = torch.zeros((), device=device).requires_grad_(self.training)
        commitment = orthogonal = torch.zeros((), device=device)
        if is_topk and not self.training:
            commitment = self._commitment_loss(codes, z, mask, per_token=True)
            loss = commitment * self.commitment_weight if self.commitment_weight > 0 else commitment
        if self.training and self.commitment_weight > 0:
            learnable = self.learnable_codebook and not freeze
            commitment = self._commitment_loss(codes if learnable else codes.detach(), z, mask,
                                               per_token=is_topk)
            loss = loss + commitment * self.commitment_weight
        if self.training and self.orthogonal_reg_weight > 0:
            orthogonal = self._orthogonal_loss(idx)
            loss = loss + orthogonal * self.orthogonal_reg_weight
        return _Losses(loss, commitment, orthogonal)

    def _check_topk(self, topk) -> int | None:
        if topk is None:
            return None
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {topk!r}")
        if self.heads > 1:
            raise ValueError(f"topk needs heads=1 (as vector-quantize-pytorch), got heads={self.heads}")
        topk = min(topk, self.codebook_size)
        if topk > MAX_TOPK:
            raise ValueError(f"topk must be <= {MAX_TOPK} (the fused search keeps its candidates in "
                             f"registers), got {topk}")
        return topk

    def _sampling_temperature(self, temperature: float, tokens: torch.Tensor, rows: torch.Tensor) -> float:
        """The Gumbel temperature of this search (0: nearest code), refusing what fastvq lacks.

        1.32.0 samples in training with stochastic_sample_codes and temperature > 0. With
        straight_through it also sends a softmax gradient through the code logits, which only shows
        where the input gets no straight-through gradient; fastvq does not build those N x K
        softmax weights, so it raises there. With topk the sample is Gumbel top-k.
        """
        if not (self.training and temperature > 0):
            return 0.0
        soft_gradient = (self.straight_through and torch.is_grad_enabled()
                         and not (tokens.requires_grad and self.route_gradients_to_input)
                         and (rows.requires_grad or self._codebook.learnable_codebook))
        if soft_gradient:
            raise NotImplementedError(
                "straight_through=True sends a softmax gradient through the code logits when the input gets "
                "no straight-through gradient (input without requires_grad, or route_gradients_to_input="
                "False); fastvq does not implement that path. Use straight_through=False, or an input that "
                "requires grad")
        return temperature if self.stochastic_sample_codes else 0.0

    # ------------------------------------------------------------------------------------------
    # losses
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _commitment_loss(codes: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None, *,
                         per_token: bool = False) -> torch.Tensor:
        """Mean squared error (fp32) between codes and z (B, S, G, D): over the unmasked tokens, or
        per (token, candidate) (B, S, G) for top-k, 0 where masked."""
        sq = F.mse_loss(codes, z, reduction="none")  # saves its inputs, no (codes - z) tensor
        if per_token:
            loss = sq.mean(-1)
            return loss if mask is None else torch.where(expand_like(mask, loss), loss, 0.0)
        if mask is None:
            return sq.mean()
        return torch.where(expand_like(mask, sq), sq, 0.0).sum() / (mask.sum() * math.prod(sq.shape[2:]))

    def _cross_entropy(self, rows: torch.Tensor, embed: torch.Tensor, targets, batch: int,
                       seq: int) -> torch.Tensor:
        """Mean cross-entropy of the code logits of rows (H, M, D) against target codes shaped as
        the forward's indices (-1 ignored); 0-d float32, differentiable w.r.t. x (and a learnable
        codebook)."""
        count = batch * seq * self.heads
        if not _is_integer_tensor(targets) or targets.numel() != count:
            raise ValueError(f"indices must be an integer tensor shaped as the returned indices ({count} "
                             f"entries), got {describe(targets)}")
        targets = self._to_rows(targets.reshape(-1, self.heads).long())
        return self._codebook.cross_entropy(rows, embed, targets).sum() / (targets >= 0).sum()

    def _orthogonal_loss(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self._codebook.embed
        if self.orthogonal_reg_active_codes_only:
            codes = codes[:, torch.unique(idx[idx >= 0])]
        num_codes = codes.shape[1]
        if self.orthogonal_reg_max_codes is not None and num_codes > self.orthogonal_reg_max_codes:
            codes = codes[:, torch.randperm(num_codes, device=codes.device)[:self.orthogonal_reg_max_codes]]
        return orthogonal_loss(codes)

    # ------------------------------------------------------------------------------------------
    # layouts
    # ------------------------------------------------------------------------------------------

    def _to_tokens(self, x) -> tuple[torch.Tensor, Layout]:
        """x in this layer's input layout -> tokens (B, S, dim) and how to restore the layout."""
        return to_tokens(x, self.dim, channel_last=self.channel_last, accept_image_fmap=self.accept_image_fmap,
                         accept_3d_fmap=self.accept_3d_fmap)

    def _channel_first(self, t: torch.Tensor) -> torch.Tensor:
        channel_first = not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap
        return t.movedim(-1, 1) if channel_first and t.dim() > 2 else t

    def _to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(T, heads, ...) per token and head -> canonical rows (H, M, ...) of the codebooks."""
        return t.transpose(0, 1) if self.separate_codebook_per_head else t.reshape(1, -1, *t.shape[2:])

    def _from_rows(self, r: torch.Tensor) -> torch.Tensor:
        """Inverse of `_to_rows`: (H, M, ...) -> (T, heads, ...)."""
        if self.separate_codebook_per_head:
            return r.transpose(0, 1)
        return r.reshape(-1, self.heads, *r.shape[2:])

    def _codebook_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S, dim) -> projected, split, normalised (cosine) (B, S, heads, codebook_dim)."""
        z = self._project(self.project_in, tokens).unflatten(-1, (self.heads, self.codebook_dim))
        return self._codebook.transform_input(z)

    def _whole_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (H, M[, k]) with -1 for every head of a token that found no code in one (as every
        token with a non-finite value: the searches give those -1): a token is quantized whole or
        not at all."""
        found = (idx[..., 0] if idx.dim() == 3 else idx).ge(0)
        whole = self._row_mask(self._from_rows(found).all(1))
        return idx.masked_fill(~(whole if idx.dim() == 2 else whole.unsqueeze(-1)), -1)

    def _check_index_range(self, indices: torch.Tensor) -> None:
        """Codes given by the caller must lie in [-1, codebook_size) (one host sync); unsigned ones
        (encode's uint8) are compared as the ints they are, not against a -1 wrapped to 255."""
        if not indices.numel():
            return
        wide = indices if indices.dtype.is_signed or indices.dtype == torch.uint8 else indices.long()  # uint16..64
        low, high = (int(v) for v in torch.aminmax(wide))
        if low < -1 or high >= self.codebook_size:
            raise ValueError(f"indices must be in [-1, codebook_size={self.codebook_size}), got values in "
                             f"[{low}, {high}]")

    def _row_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Per-token mask (B, S) or (T,) -> the same for every row of the token (H, M)."""
        return None if mask is None else self._to_rows(mask.reshape(-1, 1).expand(-1, self.heads))

    def _usable_rows(self, finite_rows: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (H, M) of the unmasked tokens that are finite in every head, and how many unmasked
        tokens were left out for a non-finite value: () float32."""
        finite = self._from_rows(finite_rows).all(1)
        usable = finite if mask is None else finite & mask.reshape(-1)
        bad = ~finite if mask is None else ~finite & mask.reshape(-1)
        return self._row_mask(usable), bad.sum().float()

    @staticmethod
    def _param_dtype(module: nn.Module, t: torch.Tensor) -> torch.dtype:
        param = next(module.parameters(), None)
        return t.dtype if param is None else param.dtype

    def _project(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """A projection run in its parameters' dtype (16-bit inputs with fp32 weights work)."""
        return module(t.to(self._param_dtype(module, t)))


def _is_integer_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.dtype.is_floating_point and not t.dtype.is_complex \
        and t.dtype != torch.bool


def _check_number(name: str, value, *, maximum: float = math.inf) -> None:
    """value must be a finite real number in [0, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= maximum \
            or not math.isfinite(value):
        bound = f"[0, {maximum:g}]" if math.isfinite(maximum) else ">= 0 and finite"
        raise ValueError(f"{name} must be a number {'in ' if math.isfinite(maximum) else ''}{bound}, "
                         f"got {value!r}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_exclusive(**flags) -> None:
    (a, va), (b, vb) = flags.items()
    if va and vb:
        raise ValueError(f"{a} and {b} cannot both be on (as in vector-quantize-pytorch); turn one off")
