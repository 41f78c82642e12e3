"""Reconstruction and codebook metrics: PSNR, SSIM, codebook usage and perplexity, and rFID from
a user-supplied TorchScript Inception feature extractor."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of (N, H, W, C) uint8 images (peak 255): (N,) float64."""
    err = (reference.astype(np.float64) - test.astype(np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(1)
    return 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


def batch_psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB of two (B, C, H, W) float batches in [-1, 1], clamped."""
    mse = (x.clamp(-1, 1) - y.clamp(-1, 1)).pow(2).flatten(1).mean(1) / 4.0
    return float((10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean())


def ssim(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image SSIM of (N, H, W, 3) uint8 images with the Gaussian-window settings of Wang et
    al. 2004 (sigma 1.5, population covariance), averaged over channels: (N,) float64."""
    from skimage.metrics import structural_similarity

    return np.array(
        [
            structural_similarity(
                a,
                b,
                channel_axis=-1,
                data_range=255,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for a, b in zip(reference, test)
        ]
    )


def codebook_stats(indices: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of the K codes that occur) and perplexity exp(H) of the code histogram
    of integer ``indices`` of any shape."""
    return histogram_stats(np.bincount(np.asarray(indices).reshape(-1), minlength=codebook_size))


def histogram_stats(counts: np.ndarray) -> dict[str, float]:
    """``codebook_stats`` of a code histogram: (K,) integer counts."""
    probs = counts / max(counts.sum(), 1)
    nonzero = probs[probs > 0]
    return {
        "codebook_usage": float((counts > 0).mean()),
        "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
    }


class InceptionFeatures:
    """A TorchScript Inception feature extractor called as ``net(images, return_features=True)``
    on (B, 3, H, W) uint8 images, returning (B, F) features: the convention of the
    ``inception-2015-12-05.pt`` file used by StyleGAN2-ADA and clean-fid. Nothing is downloaded.

    Trusted files only: TorchScript is a program, and loading and calling it runs that program.
    This is the only place fastvq executes a user's file, and only when asked for rFID.
    """

    def __init__(self, path: str | Path, device: torch.device):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path}: no such file")
        try:
            with warnings.catch_warnings():  # TorchScript is the format these files come in
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as err:  # any loader error means the file is unusable
            raise ValueError(f"Inception weights {path}: not a TorchScript Inception model ({err})") from err
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, F) float64 features."""
        feats = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
            feats.append(self.net(x.to(self.device), return_features=True).double().cpu())
        return torch.cat(feats).numpy()


class FeatureMoments:
    """Mean and covariance (unbiased, as np.cov) of (N, F) features added batch by batch, merged
    with Chan et al.'s pairwise update: memory O(F^2) whatever N."""

    def __init__(self):
        self.count, self.mean, self.scatter = 0, None, None  # scatter: sum of (x - mean)(x - mean)^T

    def add(self, features: np.ndarray) -> None:
        """Add (B, F) features."""
        features = np.asarray(features, dtype=np.float64)
        if not len(features):
            return
        mean = features.mean(0)
        centered = features - mean
        scatter = centered.T @ centered
        if self.count == 0:
            self.count, self.mean, self.scatter = len(features), mean, scatter
            return
        total = self.count + len(features)
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.count * len(features) / total)
        self.mean = self.mean + delta * (len(features) / total)
        self.count = total

    @property
    def covariance(self) -> np.ndarray:
        return self.scatter / (self.count - 1)


def frechet_distance(a: FeatureMoments, b: FeatureMoments) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    from scipy import linalg

    mu_a, mu_b = a.mean, b.mean
    cov_a, cov_b = a.covariance, b.covariance
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * np.real(root)))
