"""`FSQ`: finite scalar quantization (Mentzer et al. 2023, arXiv:2309.15505), a drop-in for
vector-quantize-pytorch 1.32.0's `FSQ`: same constructor arguments and defaults, forward outputs,
methods and state_dict keys.

Each of the d = len(levels) code dimensions is bounded and rounded to one of L_i levels; the code
is the tuple of level indices and its index their mixed-radix number (`fastvq.nn.scalar_codes`).
What differs from 1.32.0 (docs/quantizers.md lists it): the bound and rounding run in fp32 (fp64
for fp64 input) whatever the input dtype, and indices come from the level indices by int64
arithmetic, so 16-bit inputs lose no code; the implicit (prod(levels), d) codebook is computed
only when `implicit_codebook` is read, so levels such as [4] * 16 (2^32 codes) construct and run.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .arguments import check_arguments, describe
from .layout import channels_first, channels_last, token_values
from .projection import project
from .scalar_codes import (
    check_code_indices,
    checked_levels,
    indices_of_levels,
    indices_to_level_indices,
    mixed_radix_basis,
)

FLOAT_MATH = (torch.float32, torch.float64)


def math_dtype(dtype: torch.dtype, force_f32: bool = True, allowed: tuple = FLOAT_MATH) -> torch.dtype:
    """The dtype the bound, the rounding and the level indices run in: fp64 for fp64 input (unless
    force_quantization_f32 leaves fp64 out of allowed_dtypes), else fp32; never 16 bits."""
    return torch.float64 if dtype == torch.float64 and not (force_f32 and dtype not in allowed) else torch.float32


def round_levels(bounded: torch.Tensor, floor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(bounded rounded (or floored) with a straight-through gradient, the rounded values detached).
    The first equals the second exactly: b + (r - b) is exact for |r - b| <= 1 (Sterbenz)."""
    rounded = (bounded.floor() if floor else bounded.round()).detach()
    return bounded + (rounded - bounded).detach(), rounded


class FSQ(nn.Module):
    """Finite scalar quantization, as vector-quantize-pytorch 1.32.0's `FSQ`.

    forward(z): z (B, N, dim), or channel-first (B, dim, N) with channel_first=True, (B, dim, H, W)
    or (B, dim, D, H, W) (always channel-first), or (B, dim) (one token per sample) -> (out like z,
    indices (B, N) / (B, H, W) / ... [, num_codebooks] int32 (int64 beyond 2^31 - 1 codes), or None
    with return_indices=False). Indices are -1 for a NaN input value.
    """

    def __init__(
        self,
        levels,
        dim=None,
        num_codebooks=1,
        keep_num_codebooks_dim=None,
        scale=None,
        allowed_dtypes=FLOAT_MATH,
        channel_first=False,
        projection_has_bias=True,
        return_indices=True,
        force_quantization_f32=True,
        preserve_symmetry=False,
        noise_dropout=0.0,
        bound_hard_clamp=False,
        orthogonal_rotation=False,
    ):
        super().__init__()
        levels = checked_levels(levels)
        check_arguments(num_codebooks=num_codebooks, noise_dropout=noise_dropout)
        if dim is not None:
            check_arguments(dim=dim)
        if 2 in levels and not preserve_symmetry:
            raise ValueError(
                f"levels {levels} contain 2, which needs preserve_symmetry=True (as in "
                "vector-quantize-pytorch); or use levels >= 3"
            )
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True (as in vector-quantize-pytorch)")
        keep = num_codebooks > 1 if keep_num_codebooks_dim is None else bool(keep_num_codebooks_dim)
        if num_codebooks > 1 and not keep:
            raise ValueError("keep_num_codebooks_dim must be True (or None) with num_codebooks > 1")
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", mixed_radix_basis(levels), persistent=False)
        self.scale, self.preserve_symmetry, self.noise_dropout = scale, preserve_symmetry, noise_dropout
        self.codebook_dim, self.num_codebooks = len(levels), num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep
        self.dim = self.effective_codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        self.return_indices = return_indices
        self.codebook_size = math.prod(levels)
        self.allowed_dtypes, self.force_quantization_f32 = allowed_dtypes, force_quantization_f32
        self.bound_hard_clamp, self.orthogonal_rotation = bound_hard_clamp, orthogonal_rotation
        if orthogonal_rotation:
            if len(set(levels)) > 1:
                warnings.warn(
                    "orthogonal_rotation is not recommended for FSQ with levels that differ between dimensions",
                    stacklevel=2,
                )
            rotation = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)

    # ------------------------------------------------------------------------------------------
    # bound and round
    # ------------------------------------------------------------------------------------------

    def bound(self, z: torch.Tensor, eps: float = 1e-3, hard_clamp: bool = False) -> torch.Tensor:
        """z (..., d) -> codes in [-1, 1] on the levels' grid (straight-through gradient)."""
        return self._bounded_levels(z, eps, hard_clamp)[0]

    def symmetry_preserving_bound(self, z: torch.Tensor, hard_clamp: bool = False) -> torch.Tensor:
        """z (..., d) -> codes 2 l / (L - 1) - 1 on L levels symmetric about 0 (Zhao et al. 2024,
        arXiv:2411.19842, sec. 3.2), straight-through gradient."""
        return self._symmetric_levels(z, hard_clamp)[0]

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d) -> codes (..., d), by the bound this module was built with."""
        return self._quantize_levels(z)[0]

    def _quantize_levels(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., d) -> (codes (..., d) with a straight-through gradient, level indices (..., d) float)."""
        if self.preserve_symmetry:
            return self._symmetric_levels(z, self.bound_hard_clamp)
        return self._bounded_levels(z, hard_clamp=self.bound_hard_clamp)

    def _bounded_levels(self, z, eps=1e-3, hard_clamp=False):
        levels = self._levels
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        if hard_clamp:
            bounded = torch.clamp(z + offset / half_l, -1.0, 1.0) * half_l - offset
        else:
            bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        half_width = levels // 2
        rounded, level_values = round_levels(bounded, floor=False)
        return rounded / half_width, level_values + half_width

    def _symmetric_levels(self, z, hard_clamp=False):
        levels_minus_1 = self._levels - 1
        squashed = torch.clamp(z, -1.0, 1.0) if hard_clamp else torch.tanh(z)
        bracket = (levels_minus_1 * (squashed + 1) / 2.0) + 0.5
        floored, level_values = round_levels(bracket, floor=True)
        return 2.0 / levels_minus_1 * floored - 1.0, level_values

    def maybe_apply_noise(self, bounded_z: torch.Tensor) -> torch.Tensor:
        """In training with noise_dropout > 0: a fraction noise_dropout of the values moved by
        U(-0.5, 0.5), clamped to [-1, 1] (the same draws as 1.32.0)."""
        if not self.training or self.noise_dropout == 0.0:
            return bounded_z
        moved = torch.full_like(bounded_z, self.noise_dropout).bernoulli_().bool()
        offset = torch.rand_like(bounded_z) - 0.5
        return torch.where(moved, bounded_z + offset, bounded_z).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------------
    # codes and indices
    # ------------------------------------------------------------------------------------------

    def _codes_of_levels(self, level_indices: torch.Tensor) -> torch.Tensor:
        """Level indices (..., d) (integers) -> codes (..., d) float32, the values forward returns."""
        if self.preserve_symmetry:
            return level_indices * (2.0 / (self._levels - 1)) - 1.0
        half_width = self._levels // 2
        return (level_indices - half_width) / half_width

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> level indices (..., d) (for a transformer over factorised embeddings)."""
        return indices_to_level_indices(indices, self._basis, self._levels)

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Codes (..., d) on the levels' grid -> indices (...), exact (int64 arithmetic)."""
        if not isinstance(zhat, torch.Tensor) or zhat.dim() < 1 or zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must be codes (..., codebook_dim={self.codebook_dim}), got {describe(zhat)}")
        zhat = zhat.to(math_dtype(zhat.dtype))
        if self.preserve_symmetry:
            shifted = (zhat + 1.0) / (2.0 / (self._levels - 1))
        else:
            shifted = zhat * (self._levels // 2) + self._levels // 2
        return indices_of_levels(shifted.round(), self._basis, self.codebook_size)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> codes (..., codebook_dim) float32 as forward computes them before the
        output projection (rotated back with orthogonal_rotation); -1 gives a zero code."""
        check_code_indices(indices, self.codebook_size)
        codes = self._codes_of_levels(self.indices_to_level_indices(indices.clamp_min(0)))
        codes = codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)
        return codes @ self.orthogonal_rot.t() if self.orthogonal_rotation else codes

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices as forward returns them -> what forward returned as out (projected, channel-first
        for feature maps or channel_first). -1 decodes to a zero code."""
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        codes = self.get_codes_from_indices(indices)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        codes = project(self.project_out, codes)
        return codes.movedim(-1, 1) if is_img_or_video or self.channel_first else codes

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """Every code, (codebook_size, codebook_dim) float32, computed now (1.32.0 keeps it as a
        buffer): it holds prod(levels) * d values, 275 GB for levels [4] * 16."""
        every = torch.arange(self.codebook_size, device=self._levels.device)
        return self._codes_of_levels(self.indices_to_level_indices(every))

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point or z.dim() < 2:
            raise TypeError(
                f"z must be a floating-point tensor (B, N, dim), (B, dim, ...) or (B, dim), got {describe(z)}"
            )
        move = z.dim() >= 4 or self.channel_first
        tokens, spatial = channels_last(z) if move or z.dim() == 2 else (z, None)
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(
                f"z must have dim={self.dim} channels (last, or at dim 1 when channel-first), got "
                f"shape {tuple(z.shape)}"
            )
        projected = project(self.project_in, tokens)
        x = projected.to(math_dtype(projected.dtype, self.force_quantization_f32, self.allowed_dtypes))
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        with torch.autocast(x.device.type, enabled=False):
            if self.orthogonal_rotation:
                x = x @ self.orthogonal_rot.to(x.dtype)
            codes, level_indices = self._quantize_levels(x)
            indices = indices_of_levels(level_indices, self._basis, self.codebook_size) if self.return_indices else None
            codes = self.maybe_apply_noise(codes)
            if self.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.to(codes.dtype).t()
        out = project(self.project_out, codes.flatten(-2).to(projected.dtype))
        if spatial is not None:
            out = channels_first(out, spatial) if move else out[:, 0]
            indices = None if indices is None else token_values(indices, spatial)
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices
