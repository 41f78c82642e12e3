"""Quantizers the reference models accept, built with the same explicit settings for a fair
side-by-side comparison.

Every quantizer is called as ``quantized, indices, loss = quantizer(tokens)`` with tokens of shape
(B, N, D) float, and returns quantized (B, N, D) of the input dtype, indices (B, N) int64 and a
0-d float32 loss; ``get_output_from_indices(indices (B, N)) -> (B, N, D)`` decodes indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvq.nn import FSQ, LFQ, SimVQ, VectorQuantize

QUANTIZERS = ("fastvq", "vector-quantize-pytorch", "taming", "fsq", "simvq", "lfq")
FSQ_LEVEL_RANGE = (3, 8)
"""Levels `fsq_levels` picks from: the FSQ paper's recommended levels are 5 to 8 (its table
A.4.1: [8, 5, 5, 5] for about 2^10 codes); 2 would need preserve_symmetry."""

WITHOUT_EMA = {
    "taming": ("rotation_trick", "kmeans_init", "threshold_ema_dead_code"),
    "simvq": ("kmeans_init", "threshold_ema_dead_code"),
}
"""The learned-codebook quantizers without an EMA codebook, and the settings each of them lacks."""


class TamingQuantizer(nn.Module):
    """Learnable-codebook VQ as in taming-transformers' ``VectorQuantizer2`` (Esser et al. 2021).

    Nearest code by squared Euclidean distance, straight-through gradient, and loss
    ``mse(sg[z], e) + commitment_weight * mse(z, sg[e])`` (codebook + commitment terms, the
    non-legacy form). The codebook is ``embedding.weight`` (K, D), initialised U(-1/K, 1/K).
    """

    def __init__(self, dim: int, codebook_size: int, commitment_weight: float = 0.25):
        super().__init__()
        self.commitment_weight = commitment_weight
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) float32 codebook."""
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> quantized (B, N, D) x.dtype, indices (B, N) int64, loss () float32."""
        flat = x.reshape(-1, x.shape[-1]).float()
        codes = self.codebook
        dist = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codes.t() + codes.pow(2).sum(1)
        indices = dist.argmin(1)
        quantized = self.embedding(indices).view(x.shape)
        loss = F.mse_loss(quantized, x.detach().float()) + self.commitment_weight * F.mse_loss(
            x.float(), quantized.detach()
        )
        quantized = x + (quantized.to(x.dtype) - x).detach()
        return quantized, indices.view(x.shape[:-1]), loss

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) int -> codes (..., D) float32."""
        return self.embedding(indices)


def fsq_levels(codebook_size: int) -> list[int]:
    """FSQ levels whose product is exactly ``codebook_size``: the fewest levels in FSQ_LEVEL_RANGE,
    and of those the most even (largest first), e.g. 512 -> [8, 8, 8], 1000 -> [8, 5, 5, 5],
    1024 -> [8, 8, 4, 4]. ValueError when there is none (a prime above 8, a factor 2 alone ...)."""
    low, high = FSQ_LEVEL_RANGE

    def splits(n: int, parts: int, largest: int) -> list[list[int]]:
        if parts == 0:
            return [[]] if n == 1 else []
        return [
            [f, *rest]
            for f in range(min(largest, n), low - 1, -1)
            if n % f == 0
            for rest in splits(n // f, parts - 1, f)
        ]

    if isinstance(codebook_size, int) and codebook_size >= low:
        for parts in range(1, codebook_size.bit_length()):
            if found := splits(codebook_size, parts, high):
                return min(found, key=lambda levels: (levels[0] - levels[-1], [-f for f in levels]))
    raise ValueError(
        f"quantizer 'fsq' needs a codebook_size that is a product of levels in [{low}, {high}], got "
        f"{codebook_size!r}; for example 512 ([8, 8, 8]), 1000 ([8, 5, 5, 5]) or 4096 ([8, 8, 8, 8])"
    )


class FSQQuantizer(nn.Module):
    """`fastvq.nn.FSQ` in the models' calling convention: levels `fsq_levels(codebook_size)`, a
    projection from ``dim`` channels to len(levels) and back. No codebook is learned and there is
    no quantizer loss (it is a 0-d zero); the gradient passes straight through the rounding."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.fsq = FSQ(fsq_levels(codebook_size), dim=dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> quantized (B, N, D) like x, indices (B, N) int64, loss () float32 (zero)."""
        quantized, indices = self.fsq(x)
        return quantized, indices.long(), torch.zeros((), device=x.device)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, N) int -> codes (B, N, D) float32."""
        return self.fsq.indices_to_codes(indices)


class LFQQuantizer(nn.Module):
    """`fastvq.nn.LFQ` in the models' calling convention: log2(codebook_size) sign bits, a projection
    from ``dim`` channels to them and back; loss 0.1 * (MAGVIT-v2's entropy loss over all codes) +
    commitment_weight * mse(z, sg[q]) (1.32.0's defaults otherwise). No codebook is learned."""

    def __init__(self, dim: int, codebook_size: int, commitment_weight: float = 0.25):
        super().__init__()
        if not isinstance(codebook_size, int) or codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"quantizer 'lfq' needs a codebook_size that is a power of 2 >= 2, got {codebook_size!r}")
        self.lfq = LFQ(dim=dim, codebook_size=codebook_size, commitment_loss_weight=commitment_weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> quantized (B, N, D) like x, indices (B, N) int64, loss () float32."""
        quantized, indices, loss = self.lfq(x)
        return quantized, indices, loss.float()

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, N) int -> codes (B, N, D) float32."""
        return self.lfq.indices_to_codes(indices)


def make_quantizer(
    name: str,
    dim: int,
    codebook_size: int,
    *,
    decay: float = 0.99,
    commitment_weight: float = 0.25,
    rotation_trick: bool = False,
    kmeans_init: bool = False,
    threshold_ema_dead_code: int = 0,
) -> nn.Module:
    """Build quantizer ``name`` (one of QUANTIZERS) over ``codebook_size`` codes of size ``dim``.

    'fastvq' and 'vector-quantize-pytorch' are EMA-codebook ``VectorQuantize`` layers given the
    same explicit arguments; 'taming' is a learnable codebook (no EMA, k-means init, dead-code
    replacement or rotation trick); 'simvq' is ``fastvq.SimVQ``, a learned map of a frozen random
    codebook (no EMA, k-means init or dead-code replacement; loss mse(sg[z], q) + commitment_weight *
    mse(z, sg[q]); decay unused); 'fsq' is `FSQQuantizer`, which has no codebook to learn: the
    codebook settings (decay, commitment_weight, rotation_trick, kmeans_init,
    threshold_ema_dead_code) do not apply to it and are not used. 'lfq' is `LFQQuantizer` (lookup-free:
    sign bits, an entropy loss, commitment_weight), whose other codebook settings are not used either.
    """
    if name == "fsq":
        return FSQQuantizer(dim, codebook_size)
    if name == "lfq":
        return LFQQuantizer(dim, codebook_size, commitment_weight)
    if name in WITHOUT_EMA:
        settings = dict(
            rotation_trick=rotation_trick, kmeans_init=kmeans_init, threshold_ema_dead_code=threshold_ema_dead_code
        )
        used = [key for key in WITHOUT_EMA[name] if settings[key]]
        if used:
            raise ValueError(
                f"quantizer {name!r} does not support {', '.join(used)}; set them off/0 or use "
                "quantizer 'fastvq' or 'vector-quantize-pytorch'"
            )
        if name == "simvq":  # beta weighs the commitment of the input, as in taming's loss
            return SimVQ(
                dim,
                codebook_size,
                rotation_trick=rotation_trick,
                input_to_quantize_commit_loss_weight=commitment_weight,
            )
        return TamingQuantizer(dim, codebook_size, commitment_weight)
    if name == "fastvq":
        layer = VectorQuantize
    elif name == "vector-quantize-pytorch":
        from vector_quantize_pytorch import VectorQuantize as layer
    else:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {name!r}")
    return layer(
        dim=dim,
        codebook_size=codebook_size,
        decay=decay,
        commitment_weight=commitment_weight,
        rotation_trick=rotation_trick,
        kmeans_init=kmeans_init,
        threshold_ema_dead_code=threshold_ema_dead_code,
    )
