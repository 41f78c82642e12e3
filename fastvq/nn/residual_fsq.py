"""`ResidualFSQ` and `GroupedResidualFSQ`: residual finite scalar quantization, drop-ins for
vector-quantize-pytorch 1.32.0's (the quantizers of fish-speech's and ChatTTS's audio codecs).

Stage q quantizes the residual divided by scale_q = levels^-q with a symmetric `FSQ` and subtracts
what it took; the output is the sum of the stages'. The stages run fused (`fused_stages`: one
autograd node for all of them, keeping one (N, d) tensor for the backward pass instead of several
per stage) unless a stage needs its own forward (orthogonal rotation, noise dropout in training).
Same constructor arguments, outputs and state_dict keys as 1.32.0.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .arguments import check_arguments, check_stage_indices, describe
from .fsq import FSQ, math_dtype
from .layout import channels_first, channels_last, token_values
from .projection import project, projections
from .residual_vq import grouped_forward, last_stage
from .scalar_codes import checked_levels, indices_of_levels, mixed_radix_basis


class _FusedStages(torch.autograd.Function):
    """All stages of a residual FSQ in one node. Forward: the summed stage outputs (..., d) and each
    stage's indices (..., stages); backward: the input gradient is the output gradient times the
    sum over stages of d code_q / d residual_q (the residual passed on is detached, as in 1.32.0),
    accumulated by the forward in one (..., d) tensor. The values are 1.32.0's bit for bit: the
    same operations in the same order, in place where a temporary is not needed again."""

    @staticmethod
    def forward(ctx, z, levels_minus_1, scales, basis, codebook_size: int, hard_clamp: bool, stages: int):
        slope = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        residual, total, indices = z, torch.zeros_like(z), []
        step = 2.0 / levels_minus_1
        for scale in scales[:stages]:
            scaled = residual / scale
            squashed = scaled.clamp(-1.0, 1.0) if hard_clamp else scaled.tanh()
            if slope is not None:  # d squashed / d scaled: 1 inside [-1, 1] for the clamp, 1 - tanh^2
                slope.add_(scaled.abs_().le_(1.0)) if hard_clamp else slope.addcmul_(squashed, squashed, value=-1.0)
            levels = squashed.add_(1.0).mul_(levels_minus_1).div_(2.0).add_(0.5).floor_()
            indices.append(indices_of_levels(levels, basis, codebook_size))
            quantized = levels.mul_(step).sub_(1.0).mul_(scale)
            residual = residual - quantized
            total.add_(quantized)
        if slope is not None and not hard_clamp:
            slope.add_(float(stages))
        ctx.save_for_backward(slope)
        return total, torch.stack(indices, -1)

    @staticmethod
    def backward(ctx, grad_total, grad_indices):
        (slope,) = ctx.saved_tensors
        return grad_total * slope, None, None, None, None, None, None


def fused_stages(
    z: torch.Tensor,
    levels_minus_1: torch.Tensor,
    scales: torch.Tensor,
    basis: torch.Tensor,
    codebook_size: int,
    hard_clamp: bool,
    stages: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `stages` symmetric FSQ stages of a residual FSQ on z (..., d) fp32/fp64: (the sum of
    the stage outputs (..., d), with the gradient 1.32.0's stages give z; indices (..., stages))."""
    return _FusedStages.apply(z, levels_minus_1, scales, basis, codebook_size, hard_clamp, stages)


class ResidualFSQ(nn.Module):
    """Residual FSQ (Zeghidour et al. 2021, arXiv:2107.03312, algorithm 1, with FSQ stages), as
    vector-quantize-pytorch 1.32.0's `ResidualFSQ`; keywords it does not take go to every stage's `FSQ`.

    forward(x): x (B, N, dim), or (B, dim, ...) with is_channel_first, or (B, dim) -> (quantized
    like x, indices (B, N, num_quantizers) int32 ((B, num_quantizers, ...) with is_channel_first, as
    1.32.0); int64 with -1 for the stages quantize dropout left out), plus with return_all_codes
    every stage's scaled codes (num_quantizers, B, ..., codebook_dim). Computed in fp32 (fp64 for fp64).
    """

    def __init__(
        self,
        *,
        levels,
        num_quantizers,
        dim=None,
        is_channel_first=False,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        soft_clamp_input_value=None,
        bound_hard_clamp=True,
        **fsq_kwargs,
    ):
        super().__init__()
        levels = checked_levels(levels)
        if num_quantizers is None:
            raise ValueError("num_quantizers must be an int >= 1, got None")
        check_arguments(
            num_quantizers=num_quantizers,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
        )
        for key, allowed in (("num_codebooks", 1), ("channel_first", False), ("return_indices", True)):
            if key in fsq_kwargs and fsq_kwargs[key] != allowed:
                raise ValueError(
                    f"ResidualFSQ needs stages with {key}={allowed!r} (vector-quantize-pytorch fails "
                    f"otherwise), got {fsq_kwargs[key]!r}"
                    + ("; use is_channel_first" if key == "channel_first" else "")
                )
        self.levels, self.codebook_dim = levels, len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        check_arguments(dim=self.dim)
        self.project_in, self.project_out = projections(self.dim, self.codebook_dim)
        self.has_projections = self.dim != self.codebook_dim
        self.is_channel_first, self.num_quantizers = is_channel_first, num_quantizers
        self.layers = nn.ModuleList(
            FSQ(levels, dim=self.codebook_dim, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp, **fsq_kwargs)
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size
        self.bound_hard_clamp = bound_hard_clamp
        levels_tensor = torch.tensor(levels)
        self.register_buffer(
            "scales", torch.stack([levels_tensor.float() ** -q for q in range(num_quantizers)]), persistent=False
        )
        self.register_buffer("_levels_minus_1", levels_tensor.float() - 1, persistent=False)
        self.register_buffer("_basis", mixed_radix_basis(levels), persistent=False)
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.register_buffer(
            "soft_clamp_input_value",
            soft_clamp_values(soft_clamp_input_value, levels_tensor, bound_hard_clamp),
            persistent=False,
        )

    @property
    def codebooks(self) -> torch.Tensor:
        """Every stage's codes, unscaled: (num_quantizers, codebook_size, codebook_dim), computed now."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices as forward returns them, with q <= num_quantizers stages (fewer only with
        quantize_dropout; -1: dropped) -> scaled codes (num_quantizers, B, ..., codebook_dim), zeros
        for -1 and for the stages not given."""
        stage_dim = 1 if self.is_channel_first else -1
        given = check_stage_indices(indices, self.num_quantizers, self.quantize_dropout, stage_dim)
        indices = indices.movedim(stage_dim, -1)
        codes = [layer.get_codes_from_indices(indices[..., q]) for q, layer in enumerate(self.layers[:given])]
        codes += [torch.zeros_like(codes[0])] * (self.num_quantizers - given)
        return torch.stack(codes) * self.scales.view(self.num_quantizers, *[1] * (indices.dim() - 1), -1)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as quantized for these indices."""
        out = project(self.project_out, self.get_codes_from_indices(indices).sum(0))
        return out.movedim(-1, 1) if self.is_channel_first else out

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 2:
            raise TypeError(f"x must be a floating-point tensor (B, N, dim) or (B, dim, ...), got {describe(x)}")
        tokens, spatial = channels_last(x) if self.is_channel_first or x.dim() == 2 else (x, None)
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(
                f"x must have dim={self.dim} channels ({'at dim 1' if self.is_channel_first else 'last'}),"
                f" got shape {tuple(x.shape)}"
            )
        projected = project(self.project_in, tokens)
        z = projected.to(math_dtype(projected.dtype))
        if self.soft_clamp_input_value is not None:
            clamp = self.soft_clamp_input_value
            z = (z / clamp).tanh() * clamp
        dropout = self.training and self.quantize_dropout and torch.is_grad_enabled()
        last = last_stage(
            self.num_quantizers,
            dropout,
            rand_quantize_dropout_fixed_seed,
            x.device,
            self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of,
        )
        with torch.autocast(z.device.type, enabled=False):
            if self._fusable():
                total, indices = fused_stages(
                    z,
                    self._levels_minus_1,
                    self.scales,
                    self._basis,
                    self.codebook_size,
                    self.bound_hard_clamp,
                    last + 1,
                )
            else:
                total, indices = self._stage_by_stage(z, last)
        dropped = self.num_quantizers - 1 - last
        if dropped:
            indices = torch.cat([indices, indices.new_full((*indices.shape[:2], dropped), -1, dtype=torch.long)], -1)
        out = project(self.project_out, total.to(projected.dtype))
        if spatial is not None:
            out = channels_first(out, spatial) if self.is_channel_first else out[:, 0]
            indices = token_values(indices, spatial)
            indices = indices.movedim(-1, 1) if self.is_channel_first else indices
        if not return_all_codes:
            return out, indices
        return out, indices, self.get_codes_from_indices(indices)

    def _fusable(self) -> bool:
        """Whether every stage is the plain symmetric FSQ the fused stages compute."""
        return not any(
            layer.orthogonal_rotation or layer.keep_num_codebooks_dim or (self.training and layer.noise_dropout > 0)
            for layer in self.layers
        )

    def _stage_by_stage(self, z, last):
        """Stages 0..last through each stage's forward: (summed output, indices (B, S, stages))."""
        residual, total, indices = z, None, []
        for layer, scale in zip(self.layers[: last + 1], self.scales):
            quantized, stage_indices = layer(residual / scale)
            quantized = quantized * scale
            residual = residual - quantized.detach()
            total = quantized if total is None else total + quantized
            indices.append(stage_indices)
        return total, torch.stack(indices, -1)


def soft_clamp_values(value, levels: torch.Tensor, bound_hard_clamp: bool) -> torch.Tensor | None:
    """The soft clamp of the input before the stages: 1 + 1 / (levels - 1) with bound_hard_clamp (as
    1.32.0), else the value given (a number or one per code dimension; None: no clamp)."""
    if bound_hard_clamp:
        if value is not None:
            raise ValueError(
                "soft_clamp_input_value needs bound_hard_clamp=False (with the hard clamp it is "
                "1 + 1 / (levels - 1), as in vector-quantize-pytorch)"
            )
        return 1 + 1 / (levels - 1)
    if value is None or isinstance(value, torch.Tensor):
        return value
    values = [value] if isinstance(value, numbers.Real) else list(value)
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"soft_clamp_input_value must be None, a number > 0 or one per code dimension, got {value!r}")
    return torch.tensor(value, dtype=torch.float32)


class GroupedResidualFSQ(nn.Module):
    """`groups` independent `ResidualFSQ`s, each on dim / groups channels, as vector-quantize-pytorch
    1.32.0's. forward -> (quantized like x, indices (groups, *each group's index shape)), plus with
    return_all_codes a tuple of each group's all_codes. accept_image_fmap: x is (B, dim, H, W)
    (the groups then quantize channel-first; 1.32.0 fails unless is_channel_first is also given)."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        check_arguments(groups=groups)
        if not isinstance(dim, int) or dim % groups:
            raise ValueError(f"dim must be a multiple of groups={groups}, got {dim!r}")
        if accept_image_fmap:
            kwargs["is_channel_first"] = True
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualFSQ(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.rvqs[0].is_channel_first else -1

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices) -> torch.Tensor:
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=self.split_dim)

    def forward(self, x, return_all_codes=False):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have dim={self.dim} channels at dim {self.split_dim}, got {describe(x)}")
        return grouped_forward(self.rvqs, x, self.split_dim, return_all_codes)
