"""One optimisation step of a reference tokenizer, and the optimizers it uses."""

from __future__ import annotations

import torch
from torch import nn

from fastvq.models import VQGAN, VQModel

from .config import RunConfig


def make_optimizers(model: VQModel, config: RunConfig) -> list[torch.optim.Optimizer]:
    """Adam for the autoencoder (+ quantizer parameters); VQGAN adds one for its discriminator."""
    adam = dict(lr=config.lr, betas=tuple(config.betas))
    if isinstance(model, VQGAN):
        return [
            torch.optim.Adam(model.generator_parameters(), **adam),
            torch.optim.Adam(model.discriminator.parameters(), **adam),
        ]
    return [torch.optim.Adam(model.parameters(), **adam)]


def train_step(
    model: VQModel,
    optimizers: list[torch.optim.Optimizer],
    x: torch.Tensor,
    step: int,
    perceptual: nn.Module | None = None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """One optimisation step on batch ``x`` (B, 3, H, W) at 0-based ``step``: (float logs,
    indices (B, h, w), detached reconstruction (B, 3, H, W))."""
    reconstruction, indices, vq_loss = model(x)
    if isinstance(model, VQGAN):
        loss, logs = model.generator_loss(x, reconstruction, vq_loss, step, perceptual)
    else:
        loss, logs = model.loss(x, reconstruction, vq_loss)
    optimizers[0].zero_grad(set_to_none=True)
    loss.backward()
    optimizers[0].step()
    if isinstance(model, VQGAN) and step >= model.disc_start:
        d_loss, d_logs = model.discriminator_loss(x, reconstruction)
        optimizers[1].zero_grad(set_to_none=True)
        d_loss.backward()
        optimizers[1].step()
        logs.update(d_logs)
    logs = {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}
    return logs, indices, reconstruction.detach()
