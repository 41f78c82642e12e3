"""Tokenizing, detokenizing and evaluating images with a trained model."""

from __future__ import annotations

import numpy as np
import torch

from fastvq.models import VQModel

from .data import ImageSource, image_batches, to_tensor, to_uint8
from .errors import SettingError
from .metrics import InceptionFeatures, codebook_stats, frechet_distance, psnr, ssim
from .progress import Progress


def _batches(count: int, batch_size: int, desc: str, progress: bool) -> Progress:
    _check_batch_size(batch_size)
    starts = range(0, count, batch_size)
    return Progress(starts, total=len(starts), desc=desc, unit="batch", enabled=progress)


def encode_images(
    model: VQModel, images: np.ndarray | ImageSource, batch_size: int, device: torch.device, progress: bool = False,
    latents: bool = False,
) -> np.ndarray:
    """(N, H, W, 3) uint8, or an ImageSource of same-sized images read batch by batch (memory
    does not grow with N) -> code indices (N, H/f, W/f) int64 (with ``latents``: the
    pre-quantization latents (N, D, H/f, W/f) float32 instead), in batches of ``batch_size`` (with
    ``progress``, reported on stderr). Puts the model in eval mode (no codebook updates)."""
    _check_batch_size(batch_size)
    model.eval()
    if isinstance(images, ImageSource):
        batches = image_batches(images, batch_size)
    else:
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    with _batches(len(images), batch_size, "encode", progress) as starts:
        encode = (lambda x: model.encode_latents(x).float()) if latents else model.encode
        with torch.no_grad():
            return np.concatenate([encode(to_tensor(batch).to(device)).cpu().numpy()
                                   for _, batch in zip(starts, batches)])


def decode_indices(
    model: VQModel, indices: np.ndarray, batch_size: int, device: torch.device, progress: bool = False
) -> np.ndarray:
    """Code indices (N, h, w) int -> images (N, h*f, w*f, 3) uint8, in batches of ``batch_size``
    (with ``progress``, reported on stderr). Puts the model in eval mode."""
    model.eval()
    with _batches(len(indices), batch_size, "decode", progress) as starts:
        return np.concatenate([
            to_uint8(model.decode(torch.from_numpy(indices[i : i + batch_size]).long().to(device)))
            for i in starts
        ])


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError("{batch_size} must be an int >= 1, got {value!r}", value=batch_size)


def reconstruct(
    model: VQModel, images: np.ndarray, batch_size: int, device: torch.device, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 -> reconstructions (N, H, W, 3) uint8 and indices (N, h, w) int64:
    ``encode_images`` then ``decode_indices``, so they equal an encode/decode round trip."""
    indices = encode_images(model, images, batch_size, device, progress)
    return decode_indices(model, indices, batch_size, device, progress), indices


def evaluate(
    model: VQModel,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    inception: InceptionFeatures | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Held-out metrics of (N, H, W, 3) uint8 ``images``: PSNR (dB), SSIM, codebook usage and
    perplexity, plus rFID when ``inception`` is given; also the reconstructions and indices."""
    recons, indices = reconstruct(model, images, batch_size, device, progress)
    metrics = {
        "num_images": len(images),
        "psnr": float(psnr(images, recons).mean()),
        "ssim": float(ssim(images, recons).mean()),
        **codebook_stats(indices, model.codebook_size),
    }
    if inception is not None:
        metrics["rfid"] = frechet_distance(inception(images, batch_size), inception(recons, batch_size))
    return metrics, recons, indices
