"""`SimVQ` and `ResidualSimVQ`: drop-ins for vector-quantize-pytorch 1.32.0's SimVQ (Zhu et al. 2024,
arXiv:2411.02038) and its residual form, on the token-quantizer core.

SimVQ's codes are a learned map `code_transform` (a bias-free Linear unless one is given) of a frozen
random codebook `frozen_codebook` (K, frozen_codebook_dim). 1.32.0 maps the codebook and then runs a
full `torch.cdist`, an N x K matrix, every step. Here the map is applied to the K codes (O(K D D'),
never to an N x K table) and the fused nearest-code search scores the mapped codes without building
N x K; the gradient reaches the map through the chosen codes only (a per-code sum of the output
gradients, then the map's backward over the K rows). Same constructor arguments, defaults, outputs,
losses and state_dict keys as 1.32.0.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.functional import check_index_range
from .arguments import check_arguments, check_stage_indices, describe, is_integer_tensor
from .gradient_estimators import rotate_to, straight_through
from .layout import channels_first, channels_last, token_values
from .residual_vq import last_stage
from .token_quantizer import TokenQuantizer


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def pack_tokens(x, dim: int, *, channel_first: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x (B, *spatial, dim), or (B, dim, *spatial) with channel_first, any number of spatial dims
    (none: one token per sample) -> tokens (B, S, dim) with S = prod(spatial), and spatial."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 2:
        raise TypeError(f"x must be a floating-point tensor with at least 2 dims, got {describe(x)}")
    if x.shape[1 if channel_first else -1] != dim:
        layout = f"(B, dim={dim}, ...) (channel_first)" if channel_first else f"(B, ..., dim={dim})"
        raise ValueError(f"x must have shape {layout}, got {tuple(x.shape)}")
    if channel_first:
        return channels_last(x)
    spatial = tuple(x.shape[1:-1])
    return x.reshape(x.shape[0], math.prod(spatial), dim), spatial


def unpack_tokens(t: torch.Tensor, spatial: tuple[int, ...], *, channel_first: bool) -> torch.Tensor:
    """Inverse of `pack_tokens`: (B, S, C) -> (B, *spatial, C), or (B, C, *spatial) with channel_first."""
    return channels_first(t, spatial) if channel_first else token_values(t, spatial)


class SimVQ(TokenQuantizer):
    """SimVQ layer; arguments as vector-quantize-pytorch 1.32.0, plus the ops' `backend` and `precision`.

    The codes (the `codebook` property, (K, dim)) are `code_transform(frozen_codebook)`:
    frozen_codebook (K, frozen_codebook_dim) is `init_fn` of Gaussian noise scaled by
    frozen_codebook_dim^-0.5 (a buffer, never trained); code_transform maps frozen_codebook_dim to dim
    (default: a bias-free Linear) and is trained by the loss through the chosen codes.

    x: (B, ..., dim), or (B, dim, ...) with channel_first; any float dtype, any number of spatial
    dims. forward -> quantized (like x, in x's dtype), indices int64 (B, ...) (-1 for a token with a
    NaN/inf value, which passes through unchanged), and a 0-d float32 loss, in training and eval:
    commitment_weight * (mse(sg[x], q) + input_to_quantize_commit_loss_weight * mse(x, sg[q])). The
    gradient reaches x through the rotation trick (rotation_trick=True) or straight through.

    SimVQ is its own token quantizer (`fastvq.nn.TokenQuantizer`, one codebook, l2 metric): `codes`,
    `quantize`, `codes_from_indices` and `health` work on canonical tokens (H, N, dim); training
    steps record code usage (`codebook_health()`). Math is fp32 whatever x's dtype.
    """

    def __init__(
        self,
        dim,
        codebook_size,
        codebook_transform: nn.Module | None = None,
        init_fn: Callable[[torch.Tensor], torch.Tensor] = identity,
        channel_first=False,
        rotation_trick=True,
        input_to_quantize_commit_loss_weight=0.25,
        commitment_weight=1.0,
        frozen_codebook_dim=None,
        *,
        backend="auto",
        precision=None,
    ):
        super().__init__(dim, codebook_size, 1, metric="l2", precision=precision, backend=backend)
        check_arguments(
            frozen_codebook_dim=frozen_codebook_dim,
            commitment_weight=commitment_weight,
            input_to_quantize_commit_loss_weight=input_to_quantize_commit_loss_weight,
        )
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError(f"codebook_transform must be an nn.Module or None, got {type(codebook_transform).__name__}")
        if not callable(init_fn):
            raise TypeError(f"init_fn must be callable, got {type(init_fn).__name__}")
        frozen_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        codebook = init_fn(torch.randn(codebook_size, frozen_dim) * frozen_dim**-0.5)
        if (
            not isinstance(codebook, torch.Tensor)
            or codebook.shape != (codebook_size, frozen_dim)
            or not codebook.dtype.is_floating_point
        ):
            raise ValueError(
                f"init_fn must return a float tensor of shape (codebook_size, frozen_codebook_dim) = "
                f"{(codebook_size, frozen_dim)}, got {describe(codebook)}"
            )
        self.code_transform = (
            nn.Linear(frozen_dim, dim, bias=False) if codebook_transform is None else codebook_transform
        )
        self.register_buffer("frozen_codebook", codebook)
        self.channel_first, self.rotation_trick = channel_first, rotation_trick
        self.input_to_quantize_commit_loss_weight = input_to_quantize_commit_loss_weight
        self.commitment_weight = commitment_weight

    # ------------------------------------------------------------------------------------------
    # codes
    # ------------------------------------------------------------------------------------------

    @property
    def codebook(self) -> torch.Tensor:
        """The codes (K, dim): code_transform(frozen_codebook), differentiable in the transform."""
        codes = self.code_transform(self.frozen_codebook)
        if not isinstance(codes, torch.Tensor) or codes.shape != (self.codebook_size, self.dim):
            raise ValueError(
                f"codebook_transform must map frozen_codebook {tuple(self.frozen_codebook.shape)} to "
                f"(codebook_size, dim) = {(self.codebook_size, self.dim)}, got {describe(codes)}"
            )
        return codes

    @property
    def codes(self) -> torch.Tensor:
        return self.codebook.float().unsqueeze(0)

    def codes_from_indices(self, indices: torch.Tensor, *, check_indices: bool = True) -> torch.Tensor:
        """indices (H, N[, k]), any integer dtype, -1 for none -> codes (H, N, [k,] dim) fp32, zeros
        for -1: the transform of the chosen frozen codes (O(N D D'), as 1.32.0's indices_to_codes),
        differentiable in the transform. check_indices: verify [-1, K) (one host sync)."""
        if not is_integer_tensor(indices) or indices.dim() < 2:
            raise TypeError(f"indices must be an integer tensor (H, N[, k]), got {describe(indices)}")
        if check_indices:
            check_index_range(indices, self.codebook_size, bound="codebook_size")
        indices = indices.long()
        codes = self.code_transform(self.frozen_codebook[indices.clamp_min(0)]).float()
        return codes.masked_fill((indices < 0).unsqueeze(-1), 0.0)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, ...) -> codes (B, ..., dim), or (B, dim, ...) with channel_first; zeros for -1."""
        if not is_integer_tensor(indices) or indices.dim() < 1:
            raise TypeError(f"indices must be an integer tensor (B, ...), got {describe(indices)}")
        codes = self.codes_from_indices(indices.reshape(1, -1))[0]
        return unpack_tokens(
            codes.reshape(indices.shape[0], -1, self.dim), tuple(indices.shape[1:]), channel_first=self.channel_first
        )

    get_output_from_indices = indices_to_codes

    def codebook_health(self) -> dict[str, torch.Tensor]:
        """Code usage of the last training step as 0-d device tensors (see `TokenQuantizer.health`)."""
        return self.health()

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (see the class docstring) -> (quantized like x, indices (B, ...) int64, loss () float32)."""
        tokens, spatial = pack_tokens(x, self.dim, channel_first=self.channel_first)
        quantized, indices, loss = self.forward_tokens(tokens)
        return (
            unpack_tokens(quantized, spatial, channel_first=self.channel_first),
            indices.reshape(x.shape[0], *spatial),
            loss,
        )

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward on tokens (B, S, dim) of any float dtype -> quantized (B, S, dim) in tokens'
        dtype, indices (B, S) int64, loss () float32; in training also records code usage."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens must have shape (B, S, dim={self.dim}), got {describe(tokens)}")
        rows = tokens.reshape(1, -1, self.dim)
        found = self.quantize(rows)
        if self.training:
            self.update_(rows.detach(), found.indices)
        z = tokens.float()
        codes = found.codes.view(z.shape)
        loss = F.mse_loss(z.detach(), codes) + F.mse_loss(z, codes.detach()) * self.input_to_quantize_commit_loss_weight
        if torch.is_grad_enabled() and z.requires_grad:
            estimator = rotate_to if self.rotation_trick else straight_through
            quantized = estimator(z, codes.detach())  # the codes learn through the loss only
        else:  # no gradient to pass on: the codes themselves (1.32.0 returns them through the estimator)
            quantized = codes.detach()
        return quantized.to(tokens.dtype), found.indices.view(tokens.shape[:2]), loss * self.commitment_weight


class ResidualSimVQ(nn.Module):
    """Residual SimVQ (Zeghidour et al. 2021, algorithm 1, with `SimVQ` stages); arguments as
    vector-quantize-pytorch 1.32.0, the rest (and `backend`, `precision`) passed to each stage.

    x: (B, ..., dim), or (B, dim, ...) with channel_first; any float dtype. forward -> quantized (like
    x), indices int64 (B, ..., num_quantizers) (-1 for stages quantize dropout left out) and losses
    (num_quantizers,) float32, plus with return_all_codes the codes of every stage (num_quantizers, B,
    ..., dim) (channel first: (num_quantizers, B, dim, ...)). Stage q quantizes what stages < q left
    (the residual minus their detached outputs); the layout is parsed once for all stages.
    """

    def __init__(
        self,
        *,
        dim,
        num_quantizers,
        codebook_size,
        heads=1,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        channel_first=False,
        rotation_trick=True,
        **sim_vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError(f"ResidualSimVQ needs heads=1 (as vector-quantize-pytorch), got heads={heads!r}")
        check_arguments(
            dim=dim,
            num_quantizers=num_quantizers,
            codebook_size=codebook_size,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
        )
        if num_quantizers is None:
            raise ValueError("num_quantizers must be an int >= 1, got None")
        self.dim, self.num_quantizers, self.channel_first = dim, num_quantizers, channel_first
        self.layers = nn.ModuleList(
            SimVQ(
                dim=dim,
                codebook_size=codebook_size,
                rotation_trick=rotation_trick,
                channel_first=channel_first,
                **sim_vq_kwargs,
            )
            for _ in range(num_quantizers)
        )
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.dim

    @property
    def codebooks(self) -> torch.Tensor:
        """Every stage's codes (num_quantizers, K, dim), differentiable in the transforms."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, ..., q <= num_quantizers; -1: dropped) -> codes (num_quantizers, B, ..., dim)
        fp32 (channel first: (num_quantizers, B, dim, ...)), zeros for -1 and for the stages past q
        (fewer than num_quantizers only with quantize_dropout)."""
        given = check_stage_indices(indices, self.num_quantizers, self.quantize_dropout)
        leading = tuple(indices.shape[:-1])
        codes = torch.zeros(self.num_quantizers, indices[..., 0].numel(), self.dim, device=indices.device)
        for q, layer in enumerate(self.layers[:given]):
            codes[q] = layer.codes_from_indices(indices[..., q].reshape(1, -1))[0]
        codes = unpack_tokens(
            codes.reshape(self.num_quantizers * leading[0], -1, self.dim), leading[1:], channel_first=self.channel_first
        )
        return codes.reshape(self.num_quantizers, leading[0], *codes.shape[1:])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The sum over stages of `get_codes_from_indices`: (B, ..., dim), channel first (B, dim, ...)."""
        return self.get_codes_from_indices(indices).sum(0)

    def forward(self, x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None):
        """Quantize x stage by stage (see the class docstring for shapes). With quantize dropout in
        training the stages past a random one (as 1.32.0: `random.Random(seed)`, the seed drawn from
        the device generator unless given) are left out: index -1, loss 0."""
        tokens, spatial = pack_tokens(x, self.dim, channel_first=self.channel_first)
        last = last_stage(
            self.num_quantizers,
            self.training and self.quantize_dropout,
            rand_quantize_dropout_fixed_seed,
            x.device,
            self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of,
        )
        residual, total = tokens, torch.zeros_like(tokens)
        indices, losses = [], []
        for layer in self.layers[: last + 1]:
            quantized, stage_indices, loss = layer.forward_tokens(residual)
            residual = residual - quantized.detach()
            total = total + quantized
            indices.append(stage_indices)
            losses.append(loss)
        dropped = self.num_quantizers - len(indices)
        indices = torch.stack(indices + [indices[0].new_full(indices[0].shape, -1)] * dropped, -1)
        losses = torch.cat([torch.stack(losses), losses[0].new_zeros(dropped)])
        out = (
            unpack_tokens(total, spatial, channel_first=self.channel_first),
            indices.reshape(x.shape[0], *spatial, self.num_quantizers),
            losses,
        )
        return (*out, self.get_codes_from_indices(out[1])) if return_all_codes else out
