"""One optimisation step of a reference tokenizer, and the optimizers it uses."""

from __future__ import annotations

import torch
from torch import nn

from fastvq.models import VQGAN, VQModel

from . import distributed
from .config import PRECISIONS, RunConfig


def make_optimizers(model: VQModel, config: RunConfig) -> list[torch.optim.Optimizer]:
    """Adam for the autoencoder (+ quantizer parameters); VQGAN adds one for its discriminator."""
    adam = dict(lr=config.lr, betas=tuple(config.betas))
    if isinstance(model, VQGAN):
        return [
            torch.optim.Adam(model.generator_parameters(), **adam),
            torch.optim.Adam(model.discriminator.parameters(), **adam),
        ]
    return [torch.optim.Adam(model.parameters(), **adam)]


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its small range needs a scaled loss); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if distributed.active():
        distributed.average_gradients(optimizer)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)


def train_step(
    model: VQModel,
    optimizers: list[torch.optim.Optimizer],
    x: torch.Tensor,
    step: int,
    perceptual: nn.Module | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """One optimisation step on batch ``x`` (B, 3, H, W) at 0-based ``step``: (float logs,
    indices (B, h, w), detached fp32 reconstruction (B, 3, H, W)). ``precision`` 'bf16' or 'fp16'
    runs the forward and losses under autocast (the quantizer outside it, on the 16-bit latents);
    fp16 needs ``scaler`` (``make_scaler``)."""
    dtype = PRECISIONS[precision]
    if (precision == "fp16") != (scaler is not None):
        raise ValueError(f"precision {precision!r} needs {'a' if precision == 'fp16' else 'no'} GradScaler")
    autocast = torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with autocast:
        reconstruction, indices, vq_loss = model(x)
        if isinstance(model, VQGAN):
            loss, logs = model.generator_loss(x, reconstruction, vq_loss, step, perceptual)
        else:
            loss, logs = model.loss(x, reconstruction, vq_loss)
    _update(loss, optimizers[0], scaler)
    if isinstance(model, VQGAN) and step >= model.disc_start:
        with autocast:
            d_loss, d_logs = model.discriminator_loss(x, reconstruction)
        _update(d_loss, optimizers[1], scaler)
        logs.update(d_logs)
    if scaler is not None:
        scaler.update()
    logs = {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}
    return logs, indices, reconstruction.detach().float()
