"""VQGAN of taming-transformers (Esser et al. 2021, "Taming Transformers for High-Resolution
Image Synthesis"): ResNet encoder/decoder with GroupNorm, swish and attention at the lowest
resolutions, a PatchGAN discriminator, hinge loss and the adaptive GAN weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastvq.models.base import VQModel
from fastvq.models.checks import check_choice, check_int, check_number
from fastvq.models.losses import PatchDiscriminator, adaptive_weight, hinge_d_loss

MAX_LEVELS = 8
"""The most resolution levels (ch_mult entries, discriminator layers): a factor of 128."""
MAX_BLOCKS = 64
"""The most residual blocks per level (a bound on what a checkpoint can ask to build)."""


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_groups={groups} must divide every channel count, got {channels}")
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm, swish, 3x3 conv, GroupNorm, swish, dropout, 3x3 conv, plus a (1x1) skip.
    (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual. (B, C, H, W) -> same."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right/bottom by one, 3x3 conv with stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, blocks: int, attn: bool, dropout: float, groups: int) -> nn.ModuleList:
    layers = []
    for _ in range(blocks):
        layers.append(ResnetBlock(c_in, c_out, dropout, groups))
        c_in = c_out
        if attn:
            layers.append(AttnBlock(c_out, groups))
    return nn.ModuleList(layers)


def _mid(channels: int, dropout: float, groups: int) -> nn.Sequential:
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout, groups),
        AttnBlock(channels, groups),
        ResnetBlock(channels, channels, dropout, groups),
    )


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/2^(L-1), W/2^(L-1)) with L = len(ch_mult);
    attention in the last ``num_attn_levels`` levels and the middle."""

    def __init__(self, in_channels, channels, ch_mult, num_res_blocks, num_attn_levels, z_channels, dropout, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        levels = len(ch_mult)
        self.levels = nn.ModuleList()
        c_in = channels
        for i, mult in enumerate(ch_mult):
            level = _level(c_in, channels * mult, num_res_blocks, i >= levels - num_attn_levels, dropout, groups)
            c_in = channels * mult
            if i < levels - 1:
                level.append(Downsample(c_in))
            self.levels.append(level)
        self.mid = _mid(c_in, dropout, groups)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for layer in level:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h*2^(L-1), w*2^(L-1)); mirror of Encoder with
    ``num_res_blocks + 1`` blocks per level. ``conv_out`` is the layer of the adaptive weight."""

    def __init__(self, out_channels, channels, ch_mult, num_res_blocks, num_attn_levels, z_channels, dropout, groups):
        super().__init__()
        levels = len(ch_mult)
        c_in = channels * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, dropout, groups)
        self.levels = nn.ModuleList()
        for i in reversed(range(levels)):
            level = _level(
                c_in, channels * ch_mult[i], num_res_blocks + 1, i >= levels - num_attn_levels, dropout, groups
            )
            c_in = channels * ch_mult[i]
            if i > 0:
                level.append(Upsample(c_in))
            self.levels.append(level)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            for layer in level:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(VQModel):
    """VQGAN tokenizer with its PatchGAN discriminator (``self.discriminator``).

    Downsampling factor f = 2^(len(ch_mult) - 1). forward: (B, 3, H, W) float32 in [-1, 1] ->
    (reconstruction (B, 3, H, W), indices (B, H/f, W/f) int64, quantizer loss ()).
    Losses: ``generator_loss`` (L1 or L2 pixel loss [+ LPIPS] + quantizer loss, plus from step
    ``disc_start`` the hinge generator loss times the adaptive weight times ``disc_weight``) and
    ``discriminator_loss`` (hinge). ``quantizer``: see ``VQModel``.
    """

    kind = "vqgan"

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        num_attn_levels: int = 1,
        z_channels: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
        codebook_dim: int = 256,
        codebook_size: int = 1024,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        rotation_trick: bool = False,
        kmeans_init: bool = False,
        threshold_ema_dead_code: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_start: int = 10000,
        disc_weight: float = 0.8,
        pixel_loss: str = "l1",
        perceptual_weight: float = 1.0,
        quantizer: nn.Module | str | None = None,
    ):
        if not isinstance(ch_mult, Sequence) or isinstance(ch_mult, str) or not 1 <= len(ch_mult) <= MAX_LEVELS:
            raise ValueError(f"ch_mult must be a list of 1 to {MAX_LEVELS} ints >= 1, got {ch_mult!r}")
        for m in ch_mult:
            check_int("every ch_mult entry", m)
        ch_mult = [int(m) for m in ch_mult]
        config = {k: v for k, v in locals().items() if k not in ("self", "quantizer", "__class__", "m")}
        super().__init__(config, quantizer)
        for name, value in (
            ("in_channels", in_channels),
            ("channels", channels),
            ("z_channels", z_channels),
            ("norm_groups", norm_groups),
            ("disc_channels", disc_channels),
        ):
            check_int(name, value)
        check_int("num_res_blocks", num_res_blocks, 1, MAX_BLOCKS)
        check_int("disc_layers", disc_layers, 1, MAX_LEVELS)
        check_int("disc_start", disc_start, minimum=0)
        check_number("dropout", dropout, 0.0, 1.0, below_maximum=True)
        for name, value in (("disc_weight", disc_weight), ("perceptual_weight", perceptual_weight)):
            check_number(name, value, minimum=0.0)
        check_choice("pixel_loss", pixel_loss, ("l1", "l2"))
        check_int("num_attn_levels", num_attn_levels, 0, len(ch_mult))
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.pixel_loss, self.perceptual_weight = pixel_loss, perceptual_weight
        body = (channels, ch_mult, num_res_blocks, num_attn_levels, z_channels, dropout, norm_groups)
        self.encoder = Encoder(in_channels, *body)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self.decoder = Decoder(in_channels, *body)
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything except the discriminator's parameters."""
        skip = {id(p) for p in self.discriminator.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def generator_loss(
        self,
        x: torch.Tensor,
        reconstruction: torch.Tensor,
        vq_loss: torch.Tensor,
        step: int,
        perceptual: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss () and its parts (detached). ``perceptual`` (e.g. ``LPIPS``)
        maps two (B, 3, H, W) images to (B,) distances; it is weighted by ``perceptual_weight``."""
        diff = reconstruction - x
        rec_loss = (diff.abs() if self.pixel_loss == "l1" else diff.pow(2)).mean()
        logs = {"rec_loss": rec_loss.detach(), "vq_loss": vq_loss.detach()}
        nll = rec_loss
        if perceptual is not None and self.perceptual_weight > 0:
            p_loss = perceptual(x, reconstruction).mean()
            nll = nll + self.perceptual_weight * p_loss
            logs["p_loss"] = p_loss.detach()
        loss = nll + vq_loss
        if step >= self.disc_start:
            g_loss = -self.discriminator(reconstruction).mean()
            weight = adaptive_weight(nll, g_loss, self.decoder.conv_out.weight) * self.disc_weight
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.detach(), disc_weight=weight)
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss () of the discriminator on real ``x`` and detached reconstructions."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
