"""`DigitClassifier`: a small CNN for 28 x 28 grey digits, the judge of generated MNIST samples
(class confidence, coverage, and the features of a Frechet distance)."""

from __future__ import annotations

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """Three convolutions (32, 64, 64 channels; two stride-2) and a 128-wide hidden layer.

    Input (B, 1, 28, 28) float in [0, 1]. forward -> logits (B, num_classes); features -> the
    hidden layer (B, 128), after its ReLU.
    """

    FEATURES = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.FEATURES),
            nn.ReLU(),
        )
        self.out = nn.Linear(self.FEATURES, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (1, 28, 28):
            raise ValueError(f"images must have shape (B, 1, 28, 28), got {tuple(images.shape)}")
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))
