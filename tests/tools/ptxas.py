"""Reading `ptxas -v` reports: shared by the compile checks of the Triton kernels (gpu_compile.py)
and of the CUDA C++ kernels (cuda_compile.py)."""

import re

SPILL_FREE = (90,)
"""Capabilities whose every kernel must compile without register spills (sm_90: H100, H200; the
tiles are tuned there, Ampere's spills are only reported)."""


def usage(report: str) -> list[tuple[str, int, int]]:
    """(function, registers per thread, spill bytes stored + loaded) of each entry function that a
    `ptxas -v` report (ptxas itself, or nvcc -Xptxas -v) describes, in the order reported."""
    entries = []
    for chunk in re.split(r"(?=ptxas info\s*: Compiling entry function)", report):
        name = re.search(r"Compiling entry function '([^']+)'", chunk)
        registers = re.search(r"Used (\d+) registers", chunk)
        if name and registers:
            spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", chunk))
            entries.append((name.group(1), int(registers.group(1)), spills))
    return entries
