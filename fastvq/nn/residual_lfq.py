"""`ResidualLFQ` and `GroupedResidualLFQ`: residual lookup-free quantization, drop-ins for
vector-quantize-pytorch 1.32.0's.

Stage q is an `LFQ` with codebook_scale 2^-q (and the input soft clamp, if any, halved per stage);
it quantizes what the earlier stages left (their outputs detached) and the output is the sum of the
stages'. Each stage's weighted auxiliary loss is returned, stacked. Same constructor arguments,
outputs and state_dict keys as 1.32.0.
"""

from __future__ import annotations

import torch
from torch import nn

from .arguments import check_arguments, check_stage_indices, describe
from .lfq import LFQ, sign_codes
from .projection import project, projections
from .residual_vq import grouped_forward, last_stage


class ResidualLFQ(nn.Module):
    """Residual LFQ (Zeghidour et al. 2021, arXiv:2107.03312, algorithm 1, with LFQ stages), as
    vector-quantize-pytorch 1.32.0's `ResidualLFQ`; keywords it does not take go to every stage's `LFQ`.

    forward(x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None): x (B, N, dim)
    (or channel-first (B, dim, ...) when dim = log2(codebook_size): no projections, as 1.32.0), mask
    as `LFQ` takes it -> (quantized like x, indices (B, N[, ...], num_quantizers) int64 (-1 for the
    stages quantize dropout left out), aux losses (num_quantizers,) float32, 0 for those stages), plus
    with return_all_codes every stage's scaled codes (num_quantizers, B, N[, ...], codebook_dim).
    """

    def __init__(
        self,
        *,
        dim,
        num_quantizers,
        codebook_size,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        soft_clamp_input_value=None,
        **kwargs,
    ):
        super().__init__()
        check_arguments(
            dim=dim,
            num_quantizers=num_quantizers,
            codebook_size=codebook_size,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
        )
        if num_quantizers is None:
            raise ValueError("num_quantizers must be an int >= 1, got None")
        if codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2 for lookup-free quantization, got {codebook_size}")
        self.codebook_dim = codebook_size.bit_length() - 1
        self.dim, self.num_quantizers = dim, num_quantizers
        self.project_in, self.project_out = projections(dim, self.codebook_dim)
        self.has_projections = dim != self.codebook_dim
        clamps = [
            None if soft_clamp_input_value is None else soft_clamp_input_value * 0.5**q for q in range(num_quantizers)
        ]
        self.layers = nn.ModuleList(
            LFQ(dim=self.codebook_dim, codebook_scale=2.0**-q, soft_clamp_input_value=clamps[q], **kwargs)
            for q in range(num_quantizers)
        )
        if self.layers[0].has_projections:
            raise ValueError(
                "ResidualLFQ's stages must not project (vector-quantize-pytorch fails otherwise): leave "
                f"num_codebooks=1 and has_projections unset, got {kwargs}"
            )
        self.codebook_size = codebook_size
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebooks(self) -> torch.Tensor:
        """Every stage's scaled codes: (num_quantizers, codebook_size, codebook_dim) float32, computed now."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, ..., q) as forward returns them, q <= num_quantizers (fewer only with
        quantize_dropout; -1: dropped) -> scaled codes (num_quantizers, B, ..., codebook_dim) float32,
        zeros for -1 and for the stages not given."""
        given = check_stage_indices(indices, self.num_quantizers, self.quantize_dropout)
        codes = []
        for q, layer in enumerate(self.layers):
            if q >= given:
                codes.append(torch.zeros_like(codes[0]))
                continue
            stage = indices[..., q]
            kept = (stage != -1)[..., None]
            codes.append(sign_codes(stage.clamp(min=0), self.codebook_dim, layer.codebook_scale) * kept)
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The summed codes of these indices, projected out (channel-last, as 1.32.0)."""
        return project(self.project_out, self.get_codes_from_indices(indices).sum(0))

    def forward(self, x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 3:
            raise TypeError(f"x must be a floating-point tensor (B, N, dim) or (B, dim, ...), got {describe(x)}")
        if self.has_projections and x.shape[-1] != self.dim:
            raise ValueError(f"x must have dim={self.dim} channels last, got shape {tuple(x.shape)}")
        projected = project(self.project_in, x)
        residual = projected
        dropout = self.training and self.quantize_dropout and torch.is_grad_enabled()
        last = last_stage(
            self.num_quantizers,
            dropout,
            rand_quantize_dropout_fixed_seed,
            x.device,
            self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of,
        )
        total, all_indices, losses = 0.0, [], []
        with torch.autocast("cuda", enabled=False):  # as 1.32.0
            for layer in self.layers[: last + 1]:
                quantized, indices, loss = layer(residual, mask=mask)
                residual = residual - quantized.detach()
                total = total + quantized
                all_indices.append(indices)
                losses.append(loss)
        dropped = self.num_quantizers - len(losses)
        all_indices += [torch.full_like(all_indices[0], -1)] * dropped
        losses += [torch.zeros((), device=x.device, dtype=projected.dtype)] * dropped
        out = project(self.project_out, total)
        all_indices, losses = torch.stack(all_indices, -1), torch.stack(losses, -1)
        if not return_all_codes:
            return out, all_indices, losses
        return out, all_indices, losses, self.get_codes_from_indices(all_indices)


class GroupedResidualLFQ(nn.Module):
    """`groups` independent `ResidualLFQ`s, each on dim / groups channels, as vector-quantize-pytorch
    1.32.0's. forward(x, mask=None, return_all_codes=False) -> (quantized like x, indices (groups, *each
    group's index shape), aux losses (groups, num_quantizers)), plus with return_all_codes a tuple of
    each group's all_codes. accept_image_fmap: the channels are at dim 1 ((B, dim, H, W))."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        check_arguments(dim=dim, groups=groups)
        if dim % groups:
            raise ValueError(f"dim must be a multiple of groups={groups}, got {dim!r}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(ResidualLFQ(dim=dim // groups, **kwargs) for _ in range(groups))

    @property
    def codebooks(self) -> torch.Tensor:
        """(groups, num_quantizers, codebook_size, codebook_dim) float32, computed now."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices) -> torch.Tensor:
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=self.split_dim)

    def forward(self, x, mask=None, return_all_codes=False):
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have dim={self.dim} channels at dim {self.split_dim}, got {describe(x)}")
        return grouped_forward(self.rvqs, x, self.split_dim, return_all_codes, mask=mask)
