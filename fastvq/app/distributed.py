"""Data-parallel training over torch.distributed, for runs launched by torchrun
(``torchrun --nproc-per-node N -m fastvq train ...``).

Every process builds the same model from the same seed and trains on its slice of each global
batch; gradients are averaged by one all_reduce per optimizer step (which keeps the VQGAN's
adaptive weight, an autograd.grad inside the loss, working), and the quantizer syncs its codebook
statistics itself. Logged values are averaged over the processes; process 0 alone writes
checkpoints, metrics and progress.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether ``start`` initialised the process group (and ``stop`` ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(device: torch.device) -> Ranks:
    """Join the process group that torchrun's environment (WORLD_SIZE > 1) describes: NCCL on
    CUDA, gloo on CPU. A single process gets ``Ranks()``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def launched_by_torchrun() -> bool:
    """Whether this process is a worker of torchrun's elastic agent (which forwards SIGINT and
    SIGTERM to its workers)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop(ranks: Ranks) -> None:
    if ranks.owns_group:
        dist.destroy_process_group()


def active() -> bool:
    """Whether gradients must be averaged: a process group of two or more."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Replace the gradient of each of ``optimizer``'s parameters by its mean over the processes
    (one all_reduce of all of them, flattened)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(mean)


def agree(
    ranks: Ranks, logs: dict[str, float], indices: torch.Tensor, codebook_size: int, stop: bool
) -> tuple[dict[str, float], float, bool]:
    """(``logs`` averaged over the processes, the fraction of codes used in the global batch,
    whether any process was asked to stop), from one all_reduce and one all_gather."""
    if ranks.world == 1:
        return logs, torch.unique(indices).numel() / codebook_size, stop
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys] + [float(stop)], dtype=torch.float64)
    dist.all_reduce(values)
    gathered = [torch.empty_like(indices) for _ in range(ranks.world)]
    dist.all_gather(gathered, indices.contiguous())
    usage = torch.unique(torch.cat(gathered)).numel() / codebook_size
    return ({k: float(v) / ranks.world for k, v in zip(keys, values[:-1].tolist())}, usage, bool(values[-1] > 0))


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()
