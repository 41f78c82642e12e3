"""Input layouts of the quantizer layers: (B, N, dim) tokens, (B, dim, N) channel-first, (B, dim)
one token per sample, (B, dim, H, W) and (B, dim, D, H, W) feature maps, to and from canonical
tokens (B, S, dim), as vector-quantize-pytorch 1.32.0 accepts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arguments import describe


@dataclass(frozen=True)
class Layout:
    """How the input was laid out: one token (B, dim), channel-first, or a 2-D/3-D feature map."""

    only_one: bool
    channel_first: bool
    spatial: tuple[int, ...] | None


def to_tokens(
    x, dim: int, *, channel_last: bool = True, accept_image_fmap: bool = False, accept_3d_fmap: bool = False
) -> tuple[torch.Tensor, Layout]:
    """x in the input layout -> tokens (B, S, dim) (a view) and how to restore the layout."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {describe(x)}")
    if accept_image_fmap or accept_3d_fmap:
        ndim = 4 if accept_image_fmap else 5
        if x.dim() != ndim or x.shape[1] != dim:
            expected = "(B, dim, H, W)" if ndim == 4 else "(B, dim, D, H, W)"
            raise ValueError(f"x must have shape {expected} with dim={dim}, got {tuple(x.shape)}")
        return x.flatten(2).transpose(1, 2), Layout(False, True, tuple(x.shape[2:]))
    if x.dim() == 2:
        if x.shape[1] != dim:
            raise ValueError(f"x must have shape (B, dim={dim}) for one token per sample, got {tuple(x.shape)}")
        return x.unsqueeze(1), Layout(True, False, None)
    if channel_last:
        if x.dim() != 3 or x.shape[2] != dim:
            raise ValueError(f"x must have shape (B, N, dim={dim}) or (B, dim), got {tuple(x.shape)}")
        return x, Layout(False, False, None)
    if x.dim() != 3 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (B, dim={dim}, N) (channel_last=False) or (B, dim), got {tuple(x.shape)}")
    return x.transpose(1, 2), Layout(False, True, None)


def from_tokens(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(B, S, ..., C) -> the input layout (the channel dim C moves back for channel-first input)."""
    if layout.only_one:
        return t[:, 0]
    if layout.channel_first:
        t = t.movedim(-1, 1)
        return t if layout.spatial is None else t.unflatten(2, layout.spatial)
    return t


def to_index_layout(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(B, S, ...) indices or per-token values -> (B,), (B, N), (B, H, W), ... (+ trailing dims)."""
    if layout.only_one:
        return t[:, 0]
    return t if layout.spatial is None else t.unflatten(1, layout.spatial)


def sequence_mask(mask, lens, layout: Layout, batch: int, seq: int) -> torch.Tensor | None:
    """mask (B, N) bool, or one made from lens (B,): True for the positions to quantize."""
    if mask is None and lens is None:
        return None
    if mask is not None and lens is not None:
        raise ValueError("pass at most one of mask and lens")
    if layout.only_one or layout.spatial is not None:
        raise ValueError(
            "mask and lens need sequence input (B, N, dim) or (B, dim, N); not one token per sample or feature maps"
        )
    if lens is not None:
        if not isinstance(lens, torch.Tensor) or lens.shape != (batch,) or lens.dtype.is_floating_point:
            raise ValueError(f"lens must be an integer tensor of shape ({batch},), got {describe(lens)}")
        return torch.arange(seq, device=lens.device) < lens.unsqueeze(1)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (batch, seq):
        raise ValueError(f"mask must be a bool tensor of shape (B, N) = ({batch}, {seq}), got {describe(mask)}")
    return mask


def expand_like(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mask (B, S) broadcast to t (B, S, ...)."""
    return mask.reshape(*mask.shape, *([1] * (t.dim() - 2))).expand_as(t)


def channels_last(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Channel-first x (B, C, ...) -> tokens (B, S, C) (S = the product of the trailing dims, 1 for
    (B, C)) and those trailing dims, for `channels_first` to restore."""
    return x.flatten(2).transpose(1, 2) if x.dim() > 2 else x.unsqueeze(1), tuple(x.shape[2:])


def channels_first(t: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """(B, S, C) -> (B, C, *spatial), the inverse of `channels_last` (spatial () gives (B, C))."""
    return t.movedim(-1, 1).reshape(t.shape[0], t.shape[-1], *spatial)


def token_values(t: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Per-token values (B, S, ...) -> (B, *spatial, ...), the token layout of `channels_last`'s input."""
    return t.reshape(t.shape[0], *spatial, *t.shape[2:])


def to_head_layout(t: torch.Tensor, separate: bool) -> torch.Tensor:
    """Per-head values (B, S, H, ...) -> 1.32.0's layout of the heads (C, B', S, ...): (H, B, S, ...)
    with separate codebooks, else (1, B * H, S, ...) (batch-major; H = 1: (1, B, S, ...)). Where values
    are drawn in that layout (noise at a seed) or given in it (per-token codebooks)."""
    if separate:
        return t.movedim(2, 0)
    return t.transpose(1, 2).flatten(0, 1).unsqueeze(0)


def from_head_layout(t: torch.Tensor, heads: int, separate: bool) -> torch.Tensor:
    """Inverse of `to_head_layout`."""
    if separate:
        return t.movedim(0, 2)
    return t[0].unflatten(0, (-1, heads)).transpose(1, 2)
