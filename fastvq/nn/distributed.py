"""Collectives that keep a codebook identical on every rank (the only module that calls torch.distributed).

Each helper packs what it is given into one flat buffer so that a training step costs one collective:
`all_reduce_sum_` for per-code counts and sums (EMA, k-means), `all_gather_rows` for the candidates
that k-means initialisation and dead-code replacement sample from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum float32 tensors over all ranks, in place, with a single all_reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate t (H, M, C) of every rank along dim 1 -> (H, world_size * M, C), rank order."""
    t = t.contiguous()
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return torch.cat(gathered, dim=1)


def all_reduce_mean_(*tensors: torch.Tensor) -> None:
    """Average float32 tensors over all ranks, in place, with a single all_reduce."""
    all_reduce_sum_(*tensors)
    for t in tensors:
        t.div_(dist.get_world_size())


def differentiable_mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over all ranks, with gradients flowing back to every rank's t (t itself when not
    distributed), as 1.32.0's LFQ averages its batch distribution over codes."""
    if not is_distributed():
        return t
    from torch.distributed import nn as dist_nn

    return dist_nn.all_reduce(t) / dist.get_world_size()
