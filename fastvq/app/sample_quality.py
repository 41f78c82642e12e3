"""How good are generated MNIST digits, with nothing downloaded: a small digit classifier trained
once on MNIST's train split (cached as a checkpoint) judges a set of images by

- confidence: the mean of the classifier's top softmax probability (real digits: ~0.99);
- histogram and coverage: how many images it assigns to each digit, and the fraction of the 10
  digits that receive at least 1 % of them;
- frechet_distance: the Frechet distance between Gaussians fitted to the classifier's features
  (its 128-wide hidden layer) of the images and of held-out real digits (FID's formula, with this
  classifier in place of Inception).

`reference_quality` gives the same numbers for held-out real digits, the point to compare with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..models.classifier import DigitClassifier
from . import checkpoint
from .errors import CheckpointError
from .mnist import load_mnist

CLASSIFIER_VERSION = "digit-classifier/1"  # bump when the architecture or its training changes
MIN_TEST_ACCURACY = 0.98
COVERAGE_SHARE = 0.01


def cache_dir() -> Path:
    """$FASTVQ_CACHE, else ~/.cache/fastvq."""
    return Path(os.environ.get("FASTVQ_CACHE") or Path.home() / ".cache" / "fastvq")


def to_digit_batch(images) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 (C = 1 or 3: averaged to grey), or float in [0, 1] ->
    (N, 1, 28, 28) float32 in [0, 1] (bilinear resize when H, W != 28)."""
    t = torch.tensor(np.asarray(images))  # a copy: mnist arrays are read-only views
    if t.dim() == 4:
        t = t.float().mean(-1) if t.shape[-1] in (1, 3) else None
    if t is None or t.dim() != 3:
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, 1|3), got {np.shape(images)}")
    t = t.float() / 255.0 if not t.dtype.is_floating_point or t.max() > 1.0 else t.float()
    t = t.unsqueeze(1)
    if t.shape[-2:] != (28, 28):
        t = F.interpolate(t, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return t.clamp(0.0, 1.0)


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)]) if x.shape[0] else fn(x)


def train_digit_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 2,
    batch: int = 128,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> DigitClassifier:
    """Adam, one-cycle learning rate, random 2-pixel shifts; images (N, 28, 28) uint8."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    x, y = to_digit_batch(images), torch.as_tensor(labels)
    steps = epochs * ((x.shape[0] + batch - 1) // batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], batch):
            take = order[i : i + batch]
            shift = [int(s) for s in torch.randint(-2, 3, (2,))]
            loss = F.cross_entropy(model(torch.roll(x[take], shifts=shift, dims=(2, 3))), y[take])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        progress(f"digit classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}")
    return model.eval()


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    predicted = _batched(model, to_digit_batch(images)).argmax(-1)
    return float((predicted == torch.as_tensor(labels)).float().mean())


def digit_classifier(progress: Callable[[str], None] = print) -> DigitClassifier:
    """The cached classifier, trained on MNIST's train split the first time (about a minute on 2
    CPU cores) and kept only if it reaches 98 % on the test split."""
    path = cache_dir() / "digit-classifier.safetensors"
    if path.is_file():
        tensors, meta = checkpoint.load(path)
        if isinstance(meta, dict) and meta.get("version") == CLASSIFIER_VERSION:
            model = DigitClassifier()
            try:
                model.load_state_dict(tensors)
            except RuntimeError as err:
                raise CheckpointError(
                    path,
                    f"does not hold the digit classifier ({str(err).splitlines()[0]}); "
                    "delete it to train the classifier again",
                ) from None
            return model.eval()
    progress(f"training the MNIST digit classifier once (cached at {path})")
    model = train_digit_classifier(*load_mnist("train"), progress=progress)
    test_accuracy = accuracy(model, *load_mnist("test"))
    if test_accuracy < MIN_TEST_ACCURACY:
        raise RuntimeError(
            f"the digit classifier reached {test_accuracy:.2%} on MNIST test, below "
            f"{MIN_TEST_ACCURACY:.0%}; its judgements would not be trustworthy"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, model.state_dict(), {"version": CLASSIFIER_VERSION, "test_accuracy": test_accuracy})
    progress(f"digit classifier: {test_accuracy:.2%} on MNIST test")
    return model


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussians fitted to the
    rows of a (N, F) and b (M, F), N, M >= 2; in float64 through symmetric eigendecompositions."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need two sets of >= 2 feature rows of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root)


def quality(images, model: DigitClassifier, reference_images) -> dict:
    """confidence, histogram, coverage and frechet_distance (see the module docstring) of images
    against reference_images (real held-out digits), both as `to_digit_batch` takes them."""
    x = to_digit_batch(images)
    probs = _batched(lambda t: model(t).softmax(-1), x)
    histogram = torch.bincount(probs.argmax(-1), minlength=10)
    features = _batched(model.features, x)
    reference = _batched(model.features, to_digit_batch(reference_images))
    return {
        "count": int(x.shape[0]),
        "confidence": float(probs.max(-1).values.mean()),
        "histogram": histogram.tolist(),
        "coverage": int((histogram >= COVERAGE_SHARE * x.shape[0]).sum()) / len(histogram),
        "frechet_distance": frechet_distance(features, reference),
    }


def reference_quality(model: DigitClassifier, count: int = 1000) -> dict:
    """`quality` of `count` real test digits against `count` other test digits."""
    images, _ = load_mnist("test")
    return quality(images[:count], model, images[count : 2 * count])


MAX_REFERENCE = 5000
"""Held-out digits the samples are compared with (at most; as many as there are samples)."""


def evaluate_samples(images, progress: Callable[[str], None] = print) -> dict:
    """The numbers `quality` gives for ``images`` (as `to_digit_batch` takes them, at least 2) and
    for as many real test digits, each against the same other test digits (at most MAX_REFERENCE):
    {"samples": ..., "real": ..., "reference_count": n}. The Frechet distance grows as the sets
    shrink, so only numbers of equal counts compare."""
    count = len(images)
    if count < 2:
        raise ValueError(f"need at least 2 images to judge, got {count}")
    model = digit_classifier(progress)
    test, _ = load_mnist("test")
    n = min(count, MAX_REFERENCE)
    reference = test[len(test) - n :]  # disjoint from the real digits below while n <= 5000
    return {
        "samples": quality(images, model, reference),
        "real": quality(test[:n], model, reference),
        "reference_count": n,
    }
