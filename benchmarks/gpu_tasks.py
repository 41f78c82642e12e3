"""The GPU check's stages that run in a child process of their own (they import torch; the driver does not).

    python3 benchmarks/gpu_tasks.py env OUT.json   # the environment's facts, as JSON, and printed
    python3 benchmarks/gpu_tasks.py build-cuda     # build the CUDA C++ extension: exit 0 built, 3 cannot
                                                   # be built here (the reason printed last), 1 failed

Every fact is read on its own: one that cannot be read is recorded as its error, never the end of the stage.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = 3
"""Exit status of a task that cannot run here (not a failure: the summary says why)."""
PACKAGES = (
    "torch",
    "triton",
    "numpy",
    "fastvq",
    "vector-quantize-pytorch",
    "flash-kmeans",
    "faiss-cpu",
    "pytest",
    "pytest-xdist",
    "pytest-timeout",
    "ninja",
    "matplotlib",
)


def python_header() -> tuple[str, bool]:
    """Where this Python's Python.h should be, and whether it is there (both C++ extension builds need it)."""
    path = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return str(path), path.is_file()


def _command(*argv: str) -> str:
    """The command's output, stripped (or why it gave none)."""
    if shutil.which(argv[0]) is None:
        return f"{argv[0]}: not on PATH"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{argv[0]}: {err}"
    return (done.stdout or done.stderr).strip()


def _read(facts: dict, name: str, read) -> None:
    try:
        facts[name] = read()
    except Exception as err:  # a fact that cannot be read is a fact too
        facts[name] = f"error: {type(err).__name__}: {err}"


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return dict(name=None, reason="torch sees no CUDA GPU", torch_cuda=torch.version.cuda)
    props = torch.cuda.get_device_properties(0)
    return dict(
        name=props.name,
        capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        l2_mib=getattr(props, "L2_cache_size", 0) >> 20,
        torch_cuda=torch.version.cuda,
        count=torch.cuda.device_count(),
    )


def _bench_rows() -> list[list[str]]:
    """(op, implementation) of every row benchmarks/run.py can plan, for the driver's slice filters."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import impls
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return [[impl.op, impl.name] for impl in impls.IMPLS + impls.CEILINGS]


def env_facts() -> dict:
    facts = dict(python=sys.version.split()[0], python_executable=sys.executable)
    facts["python_h"], facts["python_h_present"] = python_header()
    facts["cores"] = os.cpu_count()
    _read(facts, "cores_usable", lambda: len(os.sched_getaffinity(0)))
    _read(facts, "memory_gib", lambda: round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1))
    _read(facts, "disk_free_gib", lambda: round(shutil.disk_usage(REPO).free / 2**30, 1))
    facts["commit"] = os.environ.get("FASTVQ_COMMIT") or None
    _read(facts, "versions", _versions)
    _read(facts, "gpu", _gpu)
    facts["nvidia_smi"] = _command(
        "nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"
    )
    facts["nvcc"] = _command("nvcc", "--version").splitlines()[-1:]
    facts["ninja"] = _command("ninja", "--version")
    _read(facts, "bench_rows", _bench_rows)
    return facts


def describe(facts: dict) -> str:
    """Readable lines of the facts (the archive's env.txt and the stage's log)."""
    gpu = facts.get("gpu") if isinstance(facts.get("gpu"), dict) else {}
    versions = facts.get("versions") if isinstance(facts.get("versions"), dict) else {}
    lines = [
        f"python3 {facts['python']} ({facts['python_executable']})",
        f"Python.h {'present' if facts['python_h_present'] else 'MISSING'}: {facts['python_h']}",
        f"cores {facts['cores']} (usable {facts.get('cores_usable')}), memory {facts.get('memory_gib')} GiB, "
        f"disk free {facts.get('disk_free_gib')} GiB",
        f"GPU {gpu.get('name') or gpu.get('reason') or facts.get('gpu')}"
        + (
            f", sm {gpu['capability']}, {gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB, L2 {gpu['l2_mib']} MiB"
            if gpu.get("name")
            else ""
        ),
        f"nvidia-smi: {facts['nvidia_smi']}",
        f"nvcc: {' '.join(facts['nvcc']) or 'none'}; ninja {facts['ninja']}",
        "versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"commit {facts['commit'] or 'unknown (pass FASTVQ_COMMIT or --commit)'}",
        f"benchmark rows: {len(rows) if isinstance(rows := facts['bench_rows'], list) else rows}",
    ]
    return "\n".join(lines)


def build_cuda() -> int:
    """Build the CUDA C++ extension into FASTVQ_CACHE_DIR (the driver points it into its work folder)."""
    path, present = python_header()
    if not present:
        print(f"cannot build: {path} is missing (the C++ extension builds need Python's headers)", flush=True)
        return SKIP
    import torch

    from fastvq.ops.backend import unavailable_reason

    device = torch.device("cuda")
    reason = unavailable_reason("cuda", device, build=False)
    if reason:
        print(f"cannot build here: {reason}", flush=True)
        return SKIP
    reason = unavailable_reason("cuda", device, build=True)
    print(f"build failed: {reason}" if reason else "built", flush=True)
    return 1 if reason else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"] and len(argv) == 2:
        facts = env_facts()
        Path(argv[1]).write_text(json.dumps(facts, indent=1) + "\n")
        print(describe(facts))
        return 0
    if argv == ["build-cuda"]:
        return build_cuda()
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
