"""The device a run uses, and the clocks and memory figures measured on it."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

from .errors import SettingError


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; other names as given (must be usable)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise SettingError(
            "{device} {name!r} is not a device name: use auto, cpu or cuda[:N] ({err})",
            name=name,
            err=str(err).splitlines()[0],
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} {name}: CUDA is not available on this machine", name=name)
    return device


def machine_cpus() -> int:
    """The CPUs of this machine: the most CPU threads a command may ask for (more only wait for
    each other: a tiny model's step took 150 s with 1000 threads on 2 CPUs)."""
    return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """``threads`` must be None (the default) or an int in [1, machine_cpus()]."""
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= machine_cpus()
    ):
        raise SettingError(
            "{threads} must be an int in [1, {cpus}] (the CPUs of this machine), got {value!r}",
            cpus=machine_cpus(),
            value=threads,
        )


def default_threads(device: torch.device) -> int:
    """CPU threads for torch on ``device``: on CPU, the CPUs this process may use minus the load
    average (other processes' runnable threads), at least 1 -- oversubscribed cores made a tiny model
    train 8x slower with torch's default than with one thread; on CUDA, torch's default."""
    if device.type != "cpu":
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), round(cpus - os.getloadavg()[0])))


@contextlib.contextmanager
def torch_threads(threads: int | None, device: torch.device) -> Iterator[int]:
    """Run the body with ``threads`` CPU threads (None: ``default_threads(device)``; at most
    ``machine_cpus()``); yields the number used and restores torch's setting afterwards."""
    check_threads(threads)
    before = torch.get_num_threads()
    used = threads if threads is not None else default_threads(device)
    torch.set_num_threads(used)
    try:
        yield used
    finally:
        torch.set_num_threads(before)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after waiting for queued CUDA work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class QuantizerTimer:
    """Wall-clock seconds spent in a quantizer's forward and backward, via module and tensor
    hooks: backward time runs from the gradient reaching the quantizer's output to the gradient
    of its input being complete. Synchronises CUDA at each boundary. ``close()`` removes hooks."""

    def __init__(self, quantizer: nn.Module, device: torch.device):
        self.device, self.seconds, self._start = device, 0.0, 0.0
        self._handles = [
            quantizer.register_forward_pre_hook(self._forward_start),
            quantizer.register_forward_hook(self._forward_end),
        ]

    def _forward_start(self, module, args) -> None:
        self._start = now(self.device)
        if args[0].requires_grad:
            args[0].register_hook(self._backward_end)

    def _forward_end(self, module, args, output) -> None:
        self.seconds += now(self.device) - self._start
        if output[0].requires_grad:
            output[0].register_hook(self._backward_start)

    def _backward_start(self, grad: torch.Tensor) -> None:
        self._start = now(self.device)

    def _backward_end(self, grad: torch.Tensor) -> None:
        self.seconds += now(self.device) - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
