"""The in-place codebook optimizer of `VectorQuantize` (1.32.0's `in_place_codebook_optimizer`).

In a training forward (codebook not frozen) the layer scores the codes it found against the
detached tokens, mean squared error over the unmasked tokens, back-propagates that loss into the
codebook's parameters (learnable codes, a `vq_bridge`), steps the optimizer (unless
`manual_in_place_optimizer_update`: then `update_in_place_optimizer()` does, as ResidualVQ with a
shared codebook once per forward) and searches again with the updated codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import distributed
from .arguments import check_arguments
from .losses import commitment_loss


def make_in_place_optimizer(factory: Callable | None, codebook: nn.Module) -> torch.optim.Optimizer | None:
    """factory(codebook's parameters), or None without a factory. ValueError when the codebook
    has no parameter to optimize (an EMA codebook without orthogonal regularisation or bridge)."""
    check_arguments(in_place_codebook_optimizer=factory)
    if factory is None:
        return None
    parameters = list(codebook.parameters())
    if not parameters:
        raise ValueError(
            "in_place_codebook_optimizer needs learnable codes: learnable_codebook=True (with "
            "ema_update=False), orthogonal_reg_weight > 0 or a vq_bridge"
        )
    return factory(parameters)


def step_in_place_optimizer_(optimizer: torch.optim.Optimizer, *, sync: bool) -> None:
    """Step the optimizer on its parameters' gradients (averaged over ranks with sync under
    torch.distributed), then zero them."""
    if sync and distributed.is_distributed():
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            distributed.all_reduce_mean_(*grads)
    optimizer.step()
    optimizer.zero_grad()


def optimize_in_place_(
    optimizer: torch.optim.Optimizer,
    codes: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    step: bool,
    sync: bool,
) -> torch.Tensor:
    """The in-place step on the codes found (heads, B * S, D) fp32 for z (B, S, heads, D), mask
    (B, S) bool or None: back-propagates their mean squared error to the detached z (over the
    unmasked tokens) into the codebook's parameters, then steps the optimizer if `step`
    (`step_in_place_optimizer_`) -> that loss, 0-d fp32, detached."""
    loss = commitment_loss(codes.transpose(0, 1).unflatten(0, z.shape[:2]), z.detach().float(), mask)
    loss.backward()
    if step:
        step_in_place_optimizer_(optimizer, sync=sync)
    return loss.detach()
