"""Tokenizing, detokenizing and evaluating images with a trained model. Images come as an
(N, H, W, 3) uint8 array or an ImageSource read batch by batch, so that memory does not grow with N."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from fastvq.models import VQModel

from .data import ImageSource, image_batches, to_tensor, to_uint8
from .errors import SettingError
from .metrics import FeatureMoments, InceptionFeatures, frechet_distance, histogram_stats, psnr, ssim
from .progress import Progress


def _batches(count: int, batch_size: int, desc: str, progress: bool) -> Progress:
    _check_batch_size(batch_size)
    starts = range(0, count, batch_size)
    return Progress(starts, total=len(starts), desc=desc, unit="batch", enabled=progress)


def _encoded(
    model: VQModel,
    images: np.ndarray | ImageSource,
    batch_size: int,
    device: torch.device,
    desc: str,
    progress: bool,
    latents: bool = False,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(images (B, H, W, 3) uint8, their code indices (B, H/f, W/f) int64 on ``device``, or with
    ``latents`` their pre-quantization latents (B, D, H/f, W/f) float32) for each batch of
    ``batch_size`` consecutive images, read when reached (with ``progress``, reported on stderr as
    ``desc``). Puts the model in eval mode (no codebook updates)."""
    _check_batch_size(batch_size)
    model.eval()
    if isinstance(images, ImageSource):
        batches = image_batches(images, batch_size)
    else:
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    encode = (lambda x: model.encode_latents(x).float()) if latents else model.encode
    with _batches(len(images), batch_size, desc, progress) as starts:
        for _, batch in zip(starts, batches):
            with torch.no_grad():
                encoded = encode(to_tensor(batch).to(device))
            yield batch, encoded


def encode_images(
    model: VQModel,
    images: np.ndarray | ImageSource,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    latents: bool = False,
) -> np.ndarray:
    """(N, H, W, 3) uint8, or an ImageSource of same-sized images read batch by batch (memory
    does not grow with N) -> code indices (N, H/f, W/f) int64 (with ``latents``: the
    pre-quantization latents (N, D, H/f, W/f) float32 instead), in batches of ``batch_size`` (with
    ``progress``, reported on stderr). Puts the model in eval mode (no codebook updates)."""
    return np.concatenate(
        [
            encoded.cpu().numpy()
            for _, encoded in _encoded(model, images, batch_size, device, "encode", progress, latents)
        ]
    )


def decode_indices(
    model: VQModel, indices: np.ndarray, batch_size: int, device: torch.device, progress: bool = False
) -> np.ndarray:
    """Code indices (N, h, w) int -> images (N, h*f, w*f, 3) uint8, in batches of ``batch_size``
    (with ``progress``, reported on stderr). Puts the model in eval mode."""
    model.eval()
    with _batches(len(indices), batch_size, "decode", progress) as starts:
        return np.concatenate(
            [to_uint8(model.decode(torch.from_numpy(indices[i : i + batch_size]).long().to(device))) for i in starts]
        )


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


class Evaluation(NamedTuple):
    """What ``evaluate`` measures: ``metrics`` (name -> value), the first images and their
    reconstructions ((n, H, W, 3) uint8, n <= ``keep``) and the code histogram ((K,) int64 counts)."""

    metrics: dict[str, float]
    inputs: np.ndarray
    reconstructions: np.ndarray
    code_counts: np.ndarray


def evaluate(
    model: VQModel,
    images: np.ndarray | ImageSource,
    batch_size: int,
    device: torch.device,
    inception: InceptionFeatures | None = None,
    progress: bool = False,
    keep: int = 16,
) -> Evaluation:
    """Held-out metrics of (N, H, W, 3) uint8 ``images`` (or an ImageSource of same-sized images):
    PSNR (dB) and SSIM per image averaged, codebook usage and perplexity, plus rFID when
    ``inception`` is given. Streams batch by batch (the reconstructions of ``reconstruct``, batch
    for batch): memory holds one batch, ``keep`` images for a grid, two numbers per image and, for
    rFID, the features' running moments, whatever N."""
    if inception is not None and len(images) < 2:
        raise ValueError(f"rFID needs at least 2 images (a covariance of features), got {len(images)}")
    psnrs, ssims, inputs, recons = [], [], [], []
    counts = np.zeros(model.codebook_size, np.int64)
    moments = (FeatureMoments(), FeatureMoments())
    for batch, indices in _encoded(model, images, batch_size, device, "eval", progress):
        reconstructed = to_uint8(model.decode(indices))
        counts += np.bincount(indices.cpu().numpy().reshape(-1), minlength=model.codebook_size)
        psnrs.append(psnr(batch, reconstructed))
        ssims.append(ssim(batch, reconstructed))
        if inception is not None:
            for moment, pixels in zip(moments, (batch, reconstructed)):
                moment.add(inception(pixels, batch_size))
        room = max(0, keep - sum(map(len, inputs)))
        inputs.append(batch[:room].copy())  # copies: a view would keep the whole batch alive
        recons.append(reconstructed[:room].copy())
    metrics = {
        "num_images": len(images),
        "psnr": float(np.concatenate(psnrs).mean()),
        "ssim": float(np.concatenate(ssims).mean()),
        **histogram_stats(counts),
    }
    if inception is not None:
        metrics["rfid"] = frechet_distance(*moments)
    return Evaluation(metrics, np.concatenate(inputs), np.concatenate(recons), counts)
