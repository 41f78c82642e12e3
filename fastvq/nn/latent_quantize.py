"""`LatentQuantize`: latent quantization (Hsu et al. 2023, arXiv:2305.18378), a drop-in for
vector-quantize-pytorch 1.32.0's: same constructor arguments and defaults, outputs, losses and
state_dict keys.

Each code dimension i has its own values (a learnable `values_per_latent[i]` of levels[i] values in
[-0.5, 0.5]); a latent takes the nearest value per dimension. fastvq takes the level index from that
search (the first nearest on ties) and the index from the level indices by int64 arithmetic, and
decodes from `values_per_latent`. 1.32.0 maps the chosen values back through the grid the values
started on and truncates a float sum: the same indices while the values are that grid, wrong
indices (and decodes that are not its output) once the values have moved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .arguments import check_arguments, describe
from .layout import channels_first, channels_last, token_values
from .projection import project, projections
from .scalar_codes import (
    check_code_indices,
    checked_levels,
    index_dtype,
    indices_to_level_indices,
    level_indices_to_indices,
    mixed_radix_basis,
)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument where vector-quantize-pytorch 1.32.0 raises RuntimeError (code written
    against either catches it)."""


class BufferList(nn.Module):
    """A list of tensors that move with the module and stay out of its state_dict (1.32.0 keeps
    fixed values in a plain list, left behind by .to(device))."""

    def __init__(self, tensors):
        super().__init__()
        self.size = len(tensors)
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t, persistent=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> torch.Tensor:
        return getattr(self, str(range(self.size)[i]))

    def __iter__(self):
        return (self[i] for i in range(self.size))


def initial_values(level: int) -> torch.Tensor:
    """The starting values of one dimension: levels evenly spaced in [-0.5, 0.5] (odd), or
    -0.5 + l / level (even), so that 0 is a value for odd levels (as 1.32.0)."""
    return torch.linspace(-0.5, 0.5, level) if level % 2 == 1 else torch.arange(level) / level - 0.5


class LatentQuantize(nn.Module):
    """Latent quantization, as vector-quantize-pytorch 1.32.0's `LatentQuantize`.

    forward(z): z channel-first (B, dim, ...) ((B, dim, N), (B, dim, H, W), (B, dim) ...) ->
    (quantized like z, indices (B, ...[, num_codebooks]) int32, loss () float32: in training
    commitment_loss_weight * mse(out, sg(z)) + quantization_loss_weight * mse(sg(out), z), zero in
    eval). The straight-through output passes the gradient to z; `values_per_latent` get none from
    forward (as in 1.32.0).
    """

    def __init__(
        self,
        levels,
        dim,
        commitment_loss_weight=0.1,
        quantization_loss_weight=0.1,
        num_codebooks=1,
        codebook_dim=-1,
        keep_num_codebooks_dim=None,
        optimize_values=True,
        in_place_codebook_optimizer=None,
    ):
        super().__init__()
        check_arguments(
            dim=dim,
            num_codebooks=num_codebooks,
            commitment_loss_weight=commitment_loss_weight,
            quantization_loss_weight=quantization_loss_weight,
            in_place_codebook_optimizer=in_place_codebook_optimizer,
        )
        if isinstance(levels, int) and not isinstance(levels, bool):
            if not isinstance(codebook_dim, int) or codebook_dim < 1:
                raise ArgumentError(
                    f"levels given as one int ({levels}) needs codebook_dim >= 1, the number of "
                    f"code dimensions, got codebook_dim={codebook_dim!r}"
                )
            levels = [levels] * codebook_dim
        levels = checked_levels(levels)
        self.dim, self.in_place_codebook_optimizer = dim, None
        self.register_buffer(
            "commitment_loss_weight", torch.tensor(commitment_loss_weight, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "quantization_loss_weight", torch.tensor(quantization_loss_weight, dtype=torch.float32), persistent=False
        )
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", mixed_radix_basis(levels), persistent=False)
        self.codebook_dim = codebook_dim if codebook_dim > 0 else len(levels)
        if self.codebook_dim != len(levels):
            raise ValueError(f"codebook_dim ({codebook_dim}) must equal len(levels) ({len(levels)})")
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = bool(keep_num_codebooks_dim) or num_codebooks > 1
        self.project_in, self.project_out = projections(dim, self.effective_codebook_dim)
        self.has_projections = dim != self.effective_codebook_dim
        self.codebook_size = math.prod(levels)
        values = [initial_values(level) for level in levels]
        self.optimize_values = bool(optimize_values)
        self.values_per_latent = (
            nn.ParameterList(nn.Parameter(v) for v in values) if self.optimize_values else BufferList(values)
        )

    @property
    def values(self) -> list[torch.Tensor]:
        """The values of each code dimension, (levels[i],) each (parameters with optimize_values)."""
        return list(self.values_per_latent)

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """Every code, (codebook_size, codebook_dim), computed now from the values."""
        every = torch.arange(self.codebook_size, device=self._levels.device)
        return self._codes_of_levels(indices_to_level_indices(every, self._basis, self._levels))

    def quantization_loss(self, z: torch.Tensor, zhat: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """mse(sg(zhat), z)."""
        return F.mse_loss(zhat.detach(), z, reduction=reduce)

    def commitment_loss(self, z: torch.Tensor, zhat: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """mse(sg(z), zhat)."""
        return F.mse_loss(z.detach(), zhat, reduction=reduce)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., codebook_dim) -> the nearest value of each dimension, straight-through gradient."""
        return self._quantize_levels(z)[0]

    def _quantize_levels(self, z):
        """z (..., d) -> (codes (..., d) equal to the chosen values exactly, gradient to z unchanged;
        level indices (..., d) int64)."""
        values = self.values
        levels = torch.stack([(z[..., i, None] - v).abs().argmin(-1) for i, v in enumerate(values)], -1)
        codes = torch.stack([v[levels[..., i]] for i, v in enumerate(values)], -1)
        return codes.detach() + (z - z.detach()), levels

    def _codes_of_levels(self, level_indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([v.detach()[level_indices[..., i]] for i, v in enumerate(self.values)], -1)

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Codes (..., codebook_dim) -> indices (...) int32 (the nearest value of each dimension)."""
        if not isinstance(zhat, torch.Tensor) or zhat.dim() < 1 or zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must be codes (..., codebook_dim={self.codebook_dim}), got {describe(zhat)}")
        levels = self._quantize_levels(zhat.detach())[1]
        return level_indices_to_indices(levels, self._basis).to(index_dtype(self.codebook_size))

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """indices as forward returns them -> (projected, unless project_out=False) codes, channel-first
        (B, dim, ...): what forward returned as quantized. -1 decodes to a zero code."""
        check_code_indices(indices, self.codebook_size)
        codes = self._codes_of_levels(indices_to_level_indices(indices.clamp_min(0), self._basis, self._levels))
        codes = codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out:
            codes = project(self.project_out, codes)
        return codes.movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point or z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must be a floating-point tensor (B, dim={self.dim}, ...), got {describe(z)}")
        original = z
        tokens, spatial = channels_last(z)
        x = project(self.project_in, tokens).unflatten(-1, (self.num_codebooks, self.codebook_dim))
        codes, levels = self._quantize_levels(x)
        indices = level_indices_to_indices(levels, self._basis).to(index_dtype(self.codebook_size))
        out = channels_first(project(self.project_out, codes.flatten(-2)), spatial)
        indices = token_values(indices, spatial)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices, self._loss(original, out)

    def _loss(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The weighted commitment and quantization losses of forward, () in z's and out's common
        dtype (at least fp32); zero in eval or at weight 0."""
        dtype = torch.promote_types(torch.promote_types(z.dtype, out.dtype), torch.float32)
        z, out, zero = z.to(dtype), out.to(dtype), torch.zeros((), device=z.device)
        commitment = self.commitment_loss(z, out) if self.training and self.commitment_loss_weight != 0 else zero
        quantization = self.quantization_loss(z, out) if self.training and self.quantization_loss_weight != 0 else zero
        return self.commitment_loss_weight * commitment + self.quantization_loss_weight * quantization
