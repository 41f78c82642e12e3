"""`HierarchicalVQ`: a drop-in for vector-quantize-pytorch 1.32.0's multi-scale residual quantizer
(VAR, Tian et al. 2024, arXiv:2404.02905): the residual is average-pooled to each scale in turn,
quantized there by a `fastvq.VectorQuantize` (one codebook shared by the scales, or one per scale),
upsampled back, refined by a residual convolution and subtracted. Same arguments, outputs and
state_dict keys as 1.32.0; every scale's search and EMA statistics are fused (never N x K).
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arguments import check_arguments, describe, is_integer_tensor
from .residual_vq import synced_seed
from .vector_quantize import VectorQuantize

POOLS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MODES = ("linear", "bilinear", "trilinear")


def level_shape(scale: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """A scale (an int for every axis, or one per axis) -> the grid shape of that level."""
    shape = (scale,) * spatial_dims if isinstance(scale, int) else tuple(scale)
    if len(shape) != spatial_dims or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"scales must be ints > 0 or tuples of {spatial_dims} of them, got {scale!r}")
    return shape


class QuantResidualConv(nn.Module):
    """x.lerp(conv(x), |ratio|): VAR's residual convolution after upsampling (identity for |ratio| <= 1e-8)."""

    def __init__(self, dim: int, spatial_dims: int, ratio: float):
        super().__init__()
        self.conv = CONVS[spatial_dims - 1](dim, dim, 3, padding=1)
        self.ratio = float(abs(ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.ratio <= 1e-8 else x.lerp(self.conv(x), self.ratio)


class HierarchicalVQ(nn.Module):
    """Multi-scale residual VQ; arguments as vector-quantize-pytorch 1.32.0 (the VectorQuantize
    settings are passed to every scale's quantizer, plus fastvq's `backend` and `precision`).

    x: (B, dim, *spatial) (channel_first) or (B, *spatial, dim), with 1 spatial dim, 2
    (accept_image_fmap) or 3 (accept_3d_fmap); any float dtype the convolutions take. `scales`: one
    grid per level, non-decreasing, each an int (every axis) or a tuple per axis; the last need not be
    the input's. forward -> reconstruction (like x), indices (a tuple of (B, *level grid) int64 per
    level, -1 where masked) and the mean () of the levels' losses; with return_cutoff also the last
    level nested dropout kept (None: all). mask (B, *spatial) bool, or lens (B,) for sequences: masked
    positions are left out of the pooling, the codebook and the loss, and reconstruct to 0.
    """

    def __init__(
        self,
        *,
        dim,
        codebook_size,
        scales,
        shared_codebook=True,
        channel_first=True,
        sync_codebook=None,
        decay=0.99,
        commitment_weight=1.0,
        rotation_trick=False,
        kmeans_init=True,
        kmeans_iters=10,
        threshold_ema_dead_code=2,
        stochastic_sample_codes=False,
        sample_codebook_temp=0.1,
        orthogonal_reg_weight=0.0,
        orthogonal_reg_max_codes=128,
        orthogonal_reg_active_codes_only=False,
        quant_resi=0.5,
        share_quant_resi=1,
        nested_dropout=0.0,
        nested_dropout_min_levels=1,
        accept_image_fmap=False,
        accept_3d_fmap=False,
        backend="auto",
        precision=None,
    ):
        super().__init__()
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be on; choose at most one")
        check_arguments(
            dim=dim,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
            nested_dropout=nested_dropout,
            nested_dropout_min_levels=nested_dropout_min_levels,
        )
        self.spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
            raise ValueError(f"scales must be a non-empty sequence of grids, got {scales!r}")
        self.level_shapes = tuple(level_shape(scale, self.spatial_dims) for scale in scales)
        for coarse, fine in zip(self.level_shapes, self.level_shapes[1:]):
            if any(a > b for a, b in zip(coarse, fine)):
                raise ValueError(f"scales must be non-decreasing along every axis, got {coarse} before {fine}")
        self.num_levels = len(self.level_shapes)
        sizes = (codebook_size,) * self.num_levels if isinstance(codebook_size, int) else tuple(codebook_size)
        if len(sizes) != self.num_levels:
            raise ValueError(
                f"codebook_size must be an int or one size per scale ({self.num_levels}), got {codebook_size!r}"
            )
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"shared_codebook needs one codebook_size for every scale, got {sizes}")
        self.dim, self.channel_first, self.scales, self.codebook_sizes = dim, channel_first, tuple(scales), sizes
        self.nested_dropout, self.nested_dropout_min_levels = nested_dropout, nested_dropout_min_levels
        vq_kwargs = dict(
            dim=dim,
            decay=decay,
            commitment_weight=commitment_weight,
            rotation_trick=rotation_trick,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            stochastic_sample_codes=stochastic_sample_codes,
            sample_codebook_temp=sample_codebook_temp,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
            orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            sync_codebook=sync_codebook,
            channel_last=True,
            backend=backend,
            precision=precision,
        )
        self.vq = VectorQuantize(codebook_size=sizes[0], **vq_kwargs) if shared_codebook else None
        self.vqs = (
            None
            if shared_codebook
            else nn.ModuleList(VectorQuantize(codebook_size=size, **vq_kwargs) for size in sizes)
        )
        self.phi_shared = self.phi_levels = None
        if share_quant_resi == 1:
            self.phi_shared = QuantResidualConv(dim, self.spatial_dims, quant_resi)
        else:
            count = self.num_levels if share_quant_resi == 0 else min(self.num_levels, share_quant_resi)
            self.phi_levels = nn.ModuleList(QuantResidualConv(dim, self.spatial_dims, quant_resi) for _ in range(count))

    def get_vq(self, level_index: int) -> VectorQuantize:
        return self.vq if self.vq is not None else self.vqs[level_index]

    def choose_phi(self, level_index: int) -> QuantResidualConv:
        """The residual convolution of a level: the shared one, or the nearest of the partial ones
        by relative position (VAR's `share_quant_resi`)."""
        if self.phi_shared is not None:
            return self.phi_shared
        position = level_index / max(self.num_levels - 1, 1)
        return self.phi_levels[round(position * (len(self.phi_levels) - 1))]

    # ------------------------------------------------------------------------------------------
    # the levels
    # ------------------------------------------------------------------------------------------

    def pool_residual(
        self, t: torch.Tensor, shape: tuple[int, ...], mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """t (B, C, *spatial) average-pooled to `shape`, over the unmasked positions when mask (B,
        *spatial) is given (then also the level's mask (B, *shape): cells with an unmasked position)."""
        pool = POOLS[self.spatial_dims - 1]
        if mask is None:
            return pool(t, output_size=shape), None
        mask = mask.unsqueeze(1).to(t.dtype)
        pooled_mask = pool(mask, output_size=shape)
        if all(s == 1 for s in shape):  # the coarsest level: the masked mean
            dims = tuple(range(2, t.dim()))
            pooled = (t * mask).sum(dims, keepdim=True) / mask.sum(dims, keepdim=True).clamp(min=1e-5)
        else:
            pooled = pool(t * mask, output_size=shape) / pooled_mask.clamp(min=1e-6)
        return pooled, pooled_mask[:, 0] > 0

    def upsample_to_full(self, q: torch.Tensor, full_shape: tuple[int, ...], level_index: int) -> torch.Tensor:
        """A level's codes (B, C, *level grid) interpolated to full_shape, then its residual convolution."""
        if tuple(q.shape[2:]) != tuple(full_shape):
            q = F.interpolate(q, size=full_shape, mode=MODES[self.spatial_dims - 1], align_corners=False)
        return self.choose_phi(level_index)(q)

    def sample_nested_cutoff(self, device: torch.device) -> int | None:
        """In training with nested dropout: the last level to keep (None: all), drawn as 1.32.0 does
        (a synced seed, then `random.Random`)."""
        if (
            not self.training
            or self.nested_dropout <= 0
            or self.num_levels <= 1
            or self.nested_dropout_min_levels >= self.num_levels
        ):
            return None
        rand = random.Random(synced_seed(device))
        if rand.random() >= self.nested_dropout:
            return None
        return rand.randrange(self.nested_dropout_min_levels - 1, self.num_levels - 1)

    # ------------------------------------------------------------------------------------------
    # forward and decoding
    # ------------------------------------------------------------------------------------------

    def forward(self, x, indices=None, mask=None, lens=None, sample_codebook_temp=None, return_cutoff=False):
        """Quantize x scale by scale (see the class docstring for shapes); in training also update the codebooks."""
        if indices is not None:
            raise ValueError(
                "HierarchicalVQ.forward takes no indices (as vector-quantize-pytorch 1.32.0); decode "
                "them with get_output_from_indices"
            )
        x, full_shape, mask = self._check_input(x, mask, lens)
        vq_kwargs = {} if sample_codebook_temp is None else dict(sample_codebook_temp=sample_codebook_temp)
        residual, reconstruction = x, torch.zeros_like(x)
        cumulative, all_indices, losses = [], [], []
        for level, shape in enumerate(self.level_shapes):
            pooled, level_mask = self.pool_residual(residual, shape, mask)
            quantized, level_indices, loss = self.get_vq(level)(
                pooled.flatten(2).transpose(1, 2),
                mask=None if level_mask is None else level_mask.flatten(1),
                **vq_kwargs,
            )
            quantized = self.upsample_to_full(quantized.transpose(1, 2).unflatten(2, shape), full_shape, level)
            reconstruction = reconstruction + quantized
            residual = residual - quantized
            cumulative.append(reconstruction)
            all_indices.append(level_indices.unflatten(1, shape))
            losses.append(loss)
        cutoff = self.sample_nested_cutoff(x.device)
        losses = torch.stack(losses)
        if cutoff is None:
            loss = losses.mean()
        else:
            reconstruction = cumulative[cutoff]
            kept = (torch.arange(self.num_levels, device=x.device) <= cutoff).to(losses.dtype)
            loss = (losses * kept).sum() / kept.sum().clamp(min=1e-5)
        if mask is not None:
            reconstruction = torch.where(mask.unsqueeze(1), reconstruction, 0.0)
        out = (self._channel_last(reconstruction), tuple(all_indices), loss)
        return (*out, cutoff) if return_cutoff else out

    def get_output_from_indices(self, indices, full_shape=None) -> torch.Tensor:
        """indices (one (B, *level grid) integer tensor per level, -1: none) -> the reconstruction
        (like forward's, eval mode) at full_shape (default: the last level's grid)."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise ValueError(
                f"indices must be a tuple of one tensor per level ({self.num_levels}), got {type(indices).__name__}"
            )
        full_shape = self.level_shapes[-1] if full_shape is None else level_shape(full_shape, self.spatial_dims)
        reconstructed = 0.0
        for level, (level_indices, shape) in enumerate(zip(indices, self.level_shapes)):
            if not is_integer_tensor(level_indices) or tuple(level_indices.shape[1:]) != shape:
                raise ValueError(
                    f"indices[{level}] must be an integer tensor (B, {', '.join(map(str, shape))}), "
                    f"got {describe(level_indices)}"
                )
            codes = self.get_vq(level).get_output_from_indices(level_indices.flatten(1))  # zeros for -1
            codes = codes.transpose(1, 2).unflatten(2, shape)
            reconstructed = reconstructed + self.upsample_to_full(codes, full_shape, level)
        return self._channel_last(reconstructed)

    def _check_input(self, x, mask, lens) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor | None]:
        """-> x channel first (B, dim, *spatial), spatial, mask (B, *spatial) bool or None."""
        channel = 1 if self.channel_first else -1
        if (
            not isinstance(x, torch.Tensor)
            or not x.dtype.is_floating_point
            or x.dim() != self.spatial_dims + 2
            or x.shape[channel] != self.dim
        ):
            layout = "(B, dim, *spatial)" if self.channel_first else "(B, *spatial, dim)"
            raise ValueError(
                f"x must be a floating-point tensor {layout} with dim={self.dim} and {self.spatial_dims} "
                f"spatial dims, got {describe(x)}"
            )
        x = x if self.channel_first else x.movedim(-1, 1)
        full_shape = tuple(x.shape[2:])
        if mask is not None and lens is not None:
            raise ValueError("pass at most one of mask and lens")
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("lens needs sequences (1 spatial dim); pass a mask for feature maps")
            if not is_integer_tensor(lens) or lens.shape != x.shape[:1]:
                raise ValueError(f"lens must be an integer tensor of shape ({x.shape[0]},), got {describe(lens)}")
            mask = torch.arange(full_shape[0], device=lens.device) < lens.unsqueeze(1)
        if mask is not None:
            expected = (x.shape[0], *full_shape)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != expected:
                raise ValueError(f"mask must be a bool tensor of shape {expected}, got {describe(mask)}")
            mask = mask.to(x.device)
        return x, full_shape, mask

    def _channel_last(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.channel_first else t.movedim(1, -1)
