"""`LFQ`: lookup-free quantization (MAGVIT-v2, Yu et al. 2023, arXiv:2310.05737) and its spherical
form BSQ (Zhao et al. 2024, arXiv:2406.07548), a drop-in for vector-quantize-pytorch 1.32.0's `LFQ`:
same constructor arguments and defaults, forward arguments and outputs, methods and state_dict keys.

Each of the d = log2(codebook_size) code dimensions is quantized to its sign times codebook_scale;
a code's index is its bits, most significant first (bit 1 for +). The entropy loss (training) is
1.32.0's: the mean per-token entropy of p = softmax(2 inv_temperature x . c) over the 2^d codes minus
diversity_gamma times the entropy of p's batch mean, both with 1.32.0's log(max(p, 1e-5)), computed by
`fastvq.ops.sign_code_distribution` from p's factorisation over the bits in O(N 2^(d/2)) memory, never
an N x 2^d tensor (1.32.0 holds two). The codes are the bits of their index: no codebook is stored or
built (the `codebook` property computes it when read). What differs from 1.32.0 is listed in docs/quantizers.md.
"""

from __future__ import annotations

import contextlib
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.functional_soft import sign_code_distribution
from .arguments import check_arguments, describe
from .distributed import differentiable_mean_over_ranks
from .layout import channels_first, channels_last, token_values
from .losses import commitment_loss
from .projection import CosineSimLinear, project

LFQReturn = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
"""LFQ.forward's output: quantized like x, indices int64, the weighted auxiliary loss ()."""

LFQLossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])
"""LFQ.forward's unweighted losses (return_loss_breakdown=True), each () float32; 0 in eval."""

PROB_LOG_CLAMP = 1e-5
"""1.32.0's entropy takes log(max(p, 1e-5))."""


def sign_codes(indices: torch.Tensor, codebook_dim: int, scale: float) -> torch.Tensor:
    """indices (...) int -> codes (..., codebook_dim) float32 in {-scale, +scale}: bit j of the index
    (most significant first) is + when set."""
    shifts = torch.arange(codebook_dim - 1, -1, -1, device=indices.device)
    bits = (indices.long()[..., None] >> shifts) & 1
    return bits.float() * (2 * scale) - scale


class LFQ(nn.Module):
    """Lookup-free quantization, as vector-quantize-pytorch 1.32.0's `LFQ`.

    forward(x, inv_temperature=100.0, return_loss_breakdown=False, mask=None): x (B, N, dim), or
    channel-first (B, dim, ...) (images, video: always unless channel_first=False; (B, dim, N) with
    channel_first=True); mask (B,) (samples) or (B, N) (tokens) bool, the tokens the losses count ->
    LFQReturn(quantized like x, indices (B, N) / (B, H, W) / ... [, num_codebooks] int64, aux loss ()),
    and with return_loss_breakdown an LFQLossBreakdown. Losses are computed in training only.

    exact_entropy (fastvq only; False: 1.32.0's formula): True takes the exact entropies, -sum p log p,
    instead of log(max(p, 1e-5)) (the per-token entropy is then a sum of per-bit binary entropies).
    """

    def __init__(
        self,
        *,
        dim=None,
        codebook_size=None,
        entropy_loss_weight=0.1,
        commitment_loss_weight=0.0,
        diversity_gamma=1.0,
        straight_through_activation=None,
        num_codebooks=1,
        keep_num_codebooks_dim=None,
        codebook_scale=1.0,
        frac_per_sample_entropy=1.0,
        has_projections=None,
        projection_has_bias=True,
        soft_clamp_input_value=None,
        cosine_sim_project_in=False,
        cosine_sim_project_in_scale=None,
        channel_first=None,
        experimental_softplus_entropy_loss=False,
        entropy_loss_offset=5.0,
        spherical=False,
        force_quantization_f32=True,
        orthogonal_rotation=False,
        exact_entropy=False,
    ):
        super().__init__()
        self.codebook_size, self.codebook_dim = _checked_sizes(dim, codebook_size)
        check_arguments(
            num_codebooks=num_codebooks,
            entropy_loss_weight=entropy_loss_weight,
            commitment_loss_weight=commitment_loss_weight,
            diversity_gamma=diversity_gamma,
            codebook_scale=codebook_scale,
            frac_per_sample_entropy=frac_per_sample_entropy,
            soft_clamp_input_value=soft_clamp_input_value,
            entropy_loss_offset=entropy_loss_offset,
        )
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(
                f"soft_clamp_input_value must be None or >= codebook_scale = {codebook_scale}, got "
                f"{soft_clamp_input_value!r} (as in vector-quantize-pytorch)"
            )
        codebook_dims = self.codebook_dim * num_codebooks
        self.dim = codebook_dims if dim is None else dim
        self.num_codebooks = num_codebooks
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim must be True (or None) with num_codebooks > 1")
        self.keep_num_codebooks_dim = keep
        self.has_projections = self.dim != codebook_dims if has_projections is None else bool(has_projections)
        if not self.has_projections:
            if self.dim != codebook_dims:
                raise ValueError(
                    f"has_projections=False needs dim = log2(codebook_size) * num_codebooks = {codebook_dims}, "
                    f"got dim={self.dim}"
                )
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        elif cosine_sim_project_in:
            in_scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
            check_arguments(cosine_sim_project_in_scale=in_scale)
            self.project_in = CosineSimLinear(self.dim, codebook_dims, scale=in_scale)
            self.project_out = nn.Linear(codebook_dims, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Linear(self.dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, self.dim, bias=projection_has_bias)
        self.channel_first = channel_first
        self.activation = nn.Identity() if straight_through_activation is None else straight_through_activation
        self.spherical, self.codebook_scale = spherical, codebook_scale
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rotation = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma, self.entropy_loss_weight = diversity_gamma, entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.force_quantization_f32, self.exact_entropy = force_quantization_f32, exact_entropy
        # 1.32.0's only persistent buffer besides orthogonal_rot: each bit's place value, MSB first
        self.register_buffer("mask", 2 ** torch.arange(self.codebook_dim - 1, -1, -1))

    # ------------------------------------------------------------------------------------------
    # codes
    # ------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The codes' dtype (float32), as 1.32.0's codebook buffer's."""
        return torch.float32

    @property
    def codebook(self) -> torch.Tensor:
        """Every code, (codebook_size, codebook_dim) float32 in {-codebook_scale, +codebook_scale}
        (before the spherical normalisation), computed now: 1.32.0 keeps it as a non-persistent buffer."""
        every = torch.arange(self.codebook_size, device=self.mask.device)
        return sign_codes(every, self.codebook_dim, self.codebook_scale)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """bits (..., d) in {0, 1} -> codes in {-codebook_scale, +codebook_scale}."""
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def maybe_l2norm(self, t: torch.Tensor) -> torch.Tensor:
        """t (..., d) scaled to norm codebook_scale with spherical=True (BSQ), else t."""
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """indices as forward returns them -> the codes forward returned (projected unless
        project_out=False; channel-first for feature maps or with channel_first=True)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {describe(indices)}")
        move = (
            self.channel_first if self.channel_first is not None else indices.dim() >= 3 + self.keep_num_codebooks_dim
        )
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self.maybe_l2norm(sign_codes(indices, self.codebook_dim, self.codebook_scale))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = project(self.project_out, codes)
        return codes.movedim(-1, 1) if move else codes

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, inv_temperature=100.0, return_loss_breakdown=False, mask=None):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 3:
            raise TypeError(f"x must be a floating-point tensor (B, N, dim) or (B, dim, ...), got {describe(x)}")
        check_arguments(inv_temperature=inv_temperature)
        move = self.channel_first if self.channel_first is not None else x.dim() >= 4
        tokens, spatial = channels_last(x) if move else (x, None)
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(
                f"x must have dim={self.dim} channels (last, or at dim 1 when channel-first), got "
                f"shape {tuple(x.shape)}"
            )
        mask = _token_mask(mask, tokens)
        z = project(self.project_in, tokens)
        if self.soft_clamp_input_value is not None:
            z = (z / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot.to(z.dtype)
        z = self.maybe_l2norm(z)
        out_dtype = z.dtype
        # 1.32.0 leaves autocast on without force_quantization_f32
        full_precision = torch.autocast(z.device.type, enabled=False)
        with full_precision if self.force_quantization_f32 else contextlib.nullcontext():
            if self.force_quantization_f32:
                z = z.float()
            out, indices, losses = self._quantize(z, mask, inv_temperature)
        out = out.to(out_dtype)
        if self.orthogonal_rotation:
            out = out @ self.orthogonal_rot.to(out.dtype).t()
        out = project(self.project_out, out.flatten(-2))
        if move:
            out, indices = channels_first(out, spatial), token_values(indices, spatial)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        entropy_loss = losses.per_sample_entropy - self.diversity_gamma * losses.batch_entropy
        if self.training and self.experimental_softplus_entropy_loss:
            entropy_loss = F.softplus(entropy_loss + self.entropy_loss_offset)
        aux_loss = entropy_loss * self.entropy_loss_weight + losses.commitment * self.commitment_loss_weight
        result = LFQReturn(out, indices, aux_loss)
        return (result, losses) if return_loss_breakdown else result

    def _quantize(self, z: torch.Tensor, mask: torch.Tensor | None, inv_temperature: float):
        """z (B, N, c, d) -> (quantized (B, N, c, d), straight-through in training; indices (B, N, c)
        int64; LFQLossBreakdown, zeros in eval)."""
        positive = z > 0
        indices = (positive.long() * self.mask).sum(-1)
        scale = torch.full_like(z, self.codebook_scale)
        quantized = self.maybe_l2norm(torch.where(positive, scale, -scale))
        zero = z.new_zeros((), dtype=torch.float32)
        if not self.training:
            return quantized, indices, LFQLossBreakdown(zero, zero, zero)
        activated = self.activation(z)
        out = activated + (quantized - activated).detach()
        per_sample, batch = self._entropies(z, mask, inv_temperature)
        commitment = zero
        if self.commitment_loss_weight > 0:
            commitment = commitment_loss(quantized.detach(), z, mask)
        return out, indices, LFQLossBreakdown(per_sample, batch, commitment)

    def _entropies(self, z: torch.Tensor, mask: torch.Tensor | None, inv_temperature: float):
        """Mean per-token entropy and mean over codebooks of the entropy of the batch-mean distribution,
        () float32 each, over the tokens of mask (a random fraction of them with frac_per_sample_entropy < 1,
        drawn as 1.32.0 draws it: the same generator calls give the same tokens)."""
        tokens = (z if mask is None else z[mask]).reshape(-1, self.num_codebooks, self.codebook_dim)
        if self.frac_per_sample_entropy < 1:
            count = tokens.shape[0]
            sampled = torch.randn(count).argsort(dim=-1) < int(count * self.frac_per_sample_entropy)
            tokens = tokens[sampled.to(tokens.device)]
        heads = tokens.transpose(0, 1).float()  # (c, T, d)
        code_scale = self.codebook_scale / self.codebook_dim**0.5 if self.spherical else self.codebook_scale
        per_token, mean_probs = sign_code_distribution(
            heads,
            scale=code_scale,
            temperature=1.0 / (2.0 * inv_temperature),
            log_clamp_min=None if self.exact_entropy else PROB_LOG_CLAMP,
        )
        mean_probs = differentiable_mean_over_ranks(mean_probs)
        if self.exact_entropy:
            batch = -torch.special.xlogy(mean_probs, mean_probs).sum(-1)
        else:
            batch = -(mean_probs * mean_probs.clamp(min=PROB_LOG_CLAMP).log()).sum(-1)
        return per_token.mean(), batch.mean()


def _checked_sizes(dim, codebook_size) -> tuple[int, int]:
    """(codebook_size, codebook_dim = log2(codebook_size)) from either argument, as 1.32.0."""
    if dim is None and codebook_size is None:
        raise ValueError("either dim or codebook_size must be given for LFQ")
    if dim is not None:
        check_arguments(dim=dim)
    if codebook_size is None:
        return 2**dim, dim
    check_arguments(codebook_size=codebook_size)
    if codebook_size & (codebook_size - 1):
        raise ValueError(
            f"codebook_size must be a power of 2 for lookup-free quantization, got {codebook_size} "
            f"(suggested {1 << codebook_size.bit_length()})"
        )
    return codebook_size, codebook_size.bit_length() - 1


def _token_mask(mask, tokens: torch.Tensor) -> torch.Tensor | None:
    """mask None, (B,) or (B, N) bool (the tokens' layout) -> (B, N) bool or None."""
    if mask is None:
        return None
    batch, seq = tokens.shape[:2]
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dtype != torch.bool
        or mask.shape not in ((batch,), (batch, seq))
        or mask.device != tokens.device
    ):
        raise ValueError(
            f"mask must be a bool tensor (B,) = ({batch},) or (B, N) = ({batch}, {seq}) on {tokens.device}, got "
            f"{describe(mask)}"
        )
    return mask[:, None].expand(batch, seq) if mask.dim() == 1 else mask
