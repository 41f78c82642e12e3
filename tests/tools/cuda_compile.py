"""Compile every CUDA C++ source of kernels/ (not kernels/cpu/) for real GPUs, without one.

nvcc (CUDA_HOME, PATH or /usr/local/cuda) compiles each `.cu` file for Hopper (sm_90) and Ampere
(sm_80) with warnings as errors, and ptxas reports every kernel's registers and spills. The files
include no torch header, so no CUDA build of torch is needed. Run as a script:

    python tests/tools/cuda_compile.py [CAPABILITY ...]      # default: 90 80

prints one line per kernel and capability and exits non-zero when a file does not compile, or
when a kernel spills registers on a capability of ptxas.SPILL_FREE. Nothing is written to the tree.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ptxas import SPILL_FREE, usage

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-Wall,-Wextra,-Werror", "--Werror", "all-warnings", "-Xptxas", "-v"]


def nvcc_path() -> str | None:
    """nvcc of $CUDA_HOME, else on PATH, else /usr/local/cuda's; None when there is none."""
    for candidate in (
        Path(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
        shutil.which("nvcc"),
        Path("/usr/local/cuda/bin/nvcc"),
    ):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def sources() -> list[Path]:
    """Every .cu file under kernels/, except the CPU sources of kernels/cpu/."""
    return sorted(p for p in KERNELS.rglob("*.cu") if p.relative_to(KERNELS).parts[0] != "cpu")


def _short_names(mangled: list[str]) -> list[str]:
    """Demangled kernel names without the namespace and argument list (mangled when no c++filt)."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not mangled:
        return mangled
    names = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    return [re.sub(r"^void |fastvq::|\(anonymous namespace\)::|\(fastvq::.*$", "", n) for n in names]


def compile_source(nvcc: str, source: Path, capability: int) -> tuple[int, str, list[tuple[str, int, int]]]:
    """(nvcc's return code, its output, [(kernel, registers, spill bytes)]) for one file and GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [
                nvcc,
                *FLAGS,
                f"-gencode=arch=compute_{capability},code=sm_{capability}",
                "-c",
                str(source),
                "-o",
                str(Path(tmp) / "kernel.o"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    output = result.stdout + result.stderr
    entries = usage(output)
    names = _short_names([name for name, _, _ in entries])
    return result.returncode, output, [(name, regs, spills) for name, (_, regs, spills) in zip(names, entries)]


def compile_all(capabilities=(90, 80)) -> dict[tuple[str, int], tuple[int, str, list]]:
    """compile_source for every source and capability, two at a time (CI has 2 cores)."""
    nvcc = nvcc_path()
    jobs = [(source, capability) for source in sources() for capability in capabilities]
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda job: compile_source(nvcc, *job), jobs)
        return {
            (source.relative_to(KERNELS).as_posix(), capability): result
            for (source, capability), result in zip(jobs, results)
        }


def main(capabilities=(90, 80)):
    if nvcc_path() is None:
        sys.exit("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    failed, spilling = [], []
    for (source, capability), (code, output, entries) in compile_all(capabilities).items():
        if code != 0:
            failed.append(f"sm_{capability} {source}:\n{output[-3000:]}")
        for name, registers, spills in entries:
            print(f"sm_{capability} {source} {name}: {registers} registers, {spills} B spilled", flush=True)
            if spills and capability in SPILL_FREE:
                spilling.append(f"sm_{capability} {source} {name}")
    if failed or spilling:
        print("\n".join(failed + [f"spills registers: {name}" for name in spilling]))
        sys.exit(1)


if __name__ == "__main__":
    main(*([tuple(int(c) for c in sys.argv[1:])] if len(sys.argv) > 1 else []))
