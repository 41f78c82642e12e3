"""Encode -> quantize -> decode plumbing shared by the reference tokenizers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastvq.models.checks import check_bool, check_int, check_number
from fastvq.models.quantizers import make_quantizer

QUANTIZER_ARGS = ("decay", "commitment_weight", "rotation_trick", "kmeans_init", "threshold_ema_dead_code")
"""Constructor arguments of every model that configure the codebook it builds."""


def check_codebook_args(config: dict[str, Any]) -> None:
    """The codebook settings every model takes: codebook_dim, codebook_size >= 1, decay in [0, 1],
    commitment_weight >= 0, rotation_trick and kmeans_init bools, threshold_ema_dead_code >= 0."""
    check_int("codebook_dim", config["codebook_dim"])
    check_int("codebook_size", config["codebook_size"])
    check_number("decay", config["decay"], 0.0, 1.0)
    check_number("commitment_weight", config["commitment_weight"], minimum=0.0)
    check_bool("rotation_trick", config["rotation_trick"])
    check_bool("kmeans_init", config["kmeans_init"])
    check_number("threshold_ema_dead_code", config["threshold_ema_dead_code"], minimum=0.0)


class VQModel(nn.Module):
    """Base class: subclasses define ``encode_latents`` (B, 3, H, W) -> (B, D, h, w) and
    ``decode_latents`` (B, D, h, w) -> (B, 3, H, W), a ``kind`` name and a ``downsample`` factor.

    ``quantizer`` is a module following the convention of ``fastvq.models.quantizers``, or the
    name of one to build ('fastvq' when None) with the model's codebook settings.
    ``config`` holds the JSON-able constructor arguments, enough to rebuild the model, among them
    ``codebook_dim``, ``codebook_size`` and ``QUANTIZER_ARGS``.
    """

    kind: str
    downsample: int

    def __init__(self, config: dict[str, Any], quantizer: nn.Module | str | None):
        super().__init__()
        check_codebook_args(config)
        if isinstance(quantizer, nn.Module):
            self.quantizer = quantizer
            config["quantizer"] = None
        else:
            name = quantizer or "fastvq"
            self.quantizer = make_quantizer(
                name, config["codebook_dim"], config["codebook_size"], **{key: config[key] for key in QUANTIZER_ARGS}
            )
            config["quantizer"] = name
        self.config = config
        self.codebook_size = config["codebook_size"]

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> quantized (B, D, h, w), indices (B, h, w) int64, loss () float32."""
        b, d, h, w = z.shape
        tokens = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        with torch.autocast(z.device.type, enabled=False):  # the quantizer keeps its own rules for 16-bit input
            quantized, indices, loss = self.quantizer(tokens)
        quantized = quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        return quantized, indices.reshape(b, h, w), loss

    def _quantize_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"image size {x.shape[-2]}x{x.shape[-1]} must be a multiple of the model's "
                f"downsampling factor {self.downsample}"
            )
        return self.quantize(self.encode_latents(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) float in [-1, 1], H and W multiples of ``downsample`` ->
        reconstruction (B, 3, H, W), indices (B, H/f, W/f) int64, quantizer loss () float32."""
        quantized, indices, loss = self._quantize_image(x)
        return self.decode_latents(quantized), indices, loss

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> code indices (B, H/f, W/f) int64."""
        return self._quantize_image(x)[1]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) int -> images (B, 3, h*f, w*f) float32 in about [-1, 1]."""
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        b, h, w = indices.shape
        codes = self.quantizer.get_output_from_indices(indices.reshape(b, h * w).long())
        return self.decode_latents(codes.reshape(b, h, w, -1).permute(0, 3, 1, 2).float())
