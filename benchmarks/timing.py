"""Time one callable and its peak memory, the same way on CPU and CUDA.

As `triton.testing.do_bench`: a first untimed call (compilation, autotuning, lazy set-up), warm-up
calls, then repetitions reported as median and 20th/80th percentiles. On CUDA each repetition is
timed by CUDA events after the L2 cache is flushed (a 256 MiB buffer is zeroed); on CPU by
`time.perf_counter`. Every call takes the next of several input copies, so no implementation runs
on inputs left warm in a cache by its previous call.

Before the timed repetitions one extra call gives the peak memory above what was in use just
before it (inputs, layer state) and the estimate of one call's time: `torch.cuda.max_memory_allocated`
on CUDA; on Linux CPUs the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
after `malloc_trim`, so that memory freed earlier and reused by the call is counted too.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

L2_FLUSH_BYTES = 256 << 20


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    peak_mem_bytes: int | None


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} missing from /proc/self/status")


def _memory_mark(device: torch.device) -> int | None:
    """Reset the device's peak-memory counter; bytes in use now (None: cannot measure here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages leave the resident set
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current resident set
        return _proc_status_bytes("VmRSS")
    except OSError:
        return None


def _memory_peak(device: torch.device, mark: int | None) -> int | None:
    """Peak bytes above `mark` since `_memory_mark`."""
    if mark is None:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - mark)
    return max(0, _proc_status_bytes("VmHWM") - mark)


def bench(
    fn, arg_sets: list[tuple], device: torch.device, *, warmup_ms: float, budget_ms: float, min_reps: int, max_reps: int
) -> Timing:
    """Time `fn(*args)` with args cycling through `arg_sets`: repetitions = budget_ms / (one call),
    clamped to [min_reps, max_reps], after warmup_ms of warm-up calls."""
    cuda = device.type == "cuda"
    args = itertools.cycle(arg_sets)
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if cuda else None

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed_calls(count: int) -> list[float]:
        if not cuda:
            times = []
            for _ in range(count):
                start = time.perf_counter()
                fn(*next(args))
                times.append((time.perf_counter() - start) * 1e3)
            return times
        events = []
        for _ in range(count):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            call_args = next(args)
            start.record()
            fn(*call_args)
            end.record()
            events.append((start, end))
        sync()
        return [start.elapsed_time(end) for start, end in events]

    fn(*next(args))
    sync()
    mark = _memory_mark(device)
    estimate = timed_calls(1)[0]
    peak = _memory_peak(device, mark)
    for _ in range(int(warmup_ms / max(estimate, 1e-3))):
        fn(*next(args))
    reps = min(max_reps, max(min_reps, math.ceil(budget_ms / max(estimate, 1e-3))))
    times = timed_calls(reps)
    p20, median, p80 = np.percentile(times, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), len(times), peak)
