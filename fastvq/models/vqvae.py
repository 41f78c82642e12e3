"""VQ-VAE of van den Oord et al. 2017 ("Neural Discrete Representation Learning")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvq.models.base import VQModel
from fastvq.models.checks import check_int

MAX_BLOCKS = 64
"""The most residual blocks per stack (a bound on what a checkpoint can ask to build)."""
MAX_DOWNSAMPLE = 256


class ResidualStack(nn.Module):
    """``num_blocks`` x (ReLU, 3x3 conv to ``res_channels``, ReLU, 1x1 conv back) + skip, then
    ReLU. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, res_channels: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, res_channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(res_channels, channels, 1),
            )
            for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class VQVAE(VQModel):
    """VQ-VAE: strided 4x4 conv encoder, residual stacks, transposed-conv decoder, EMA codebook.

    ``downsample`` (a power of two >= 2) is the number of pixels per code along each side: the
    encoder halves the resolution log2(downsample) times. Codes are ``codebook_dim`` (D) wide,
    ``codebook_size`` (K) of them, with commitment weight beta = ``commitment_weight`` and EMA
    ``decay``. ``quantizer``: see ``VQModel``. forward: (B, 3, H, W) float32 in [-1, 1] ->
    (reconstruction (B, 3, H, W), indices (B, H/f, W/f) int64, quantizer loss ()).
    """

    kind = "vqvae"

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 128,
        res_channels: int = 32,
        num_res_blocks: int = 2,
        downsample: int = 4,
        codebook_dim: int = 64,
        codebook_size: int = 512,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        rotation_trick: bool = False,
        kmeans_init: bool = False,
        threshold_ema_dead_code: int = 0,
        quantizer: nn.Module | str | None = None,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "quantizer", "__class__")}
        super().__init__(config, quantizer)
        for name, value in (("in_channels", in_channels), ("channels", channels), ("res_channels", res_channels)):
            check_int(name, value)
        check_int("num_res_blocks", num_res_blocks, 0, MAX_BLOCKS)
        check_int("downsample", downsample, 2, MAX_DOWNSAMPLE)
        if downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
        if channels % 2:
            raise ValueError(f"channels must be even, got {channels}")
        self.downsample = downsample
        levels = downsample.bit_length() - 1

        encoder: list[nn.Module] = []
        c_in = in_channels
        for level in range(levels):
            c_out = channels if level == levels - 1 else channels // 2
            encoder += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        encoder += [
            nn.Conv2d(channels, channels, 3, padding=1),
            ResidualStack(channels, res_channels, num_res_blocks),
            nn.Conv2d(channels, codebook_dim, 1),
        ]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [
            nn.Conv2d(codebook_dim, channels, 3, padding=1),
            ResidualStack(channels, res_channels, num_res_blocks),
        ]
        c_in = channels
        for level in range(levels):
            last = level == levels - 1
            c_out = in_channels if last else channels // 2
            decoder.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if not last:
                decoder.append(nn.ReLU())
            c_in = c_out
        self.decoder = nn.Sequential(*decoder)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(
        self, x: torch.Tensor, reconstruction: torch.Tensor, vq_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss () = mse(reconstruction, x) + quantizer loss, and its parts (detached)."""
        rec_loss = F.mse_loss(reconstruction, x)
        loss = rec_loss + vq_loss
        return loss, {"rec_loss": rec_loss.detach(), "vq_loss": vq_loss.detach()}
