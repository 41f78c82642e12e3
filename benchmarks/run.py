"""Benchmark fastvq against what users would pick instead and against the device's own limits.

    python benchmarks/run.py                      # full matrix on the GPU, or the CPU matrix without one
    python benchmarks/run.py --device cpu --quick # a tiny shape, seconds
    python benchmarks/run.py --only search --shapes vqvae,llamagen
    python benchmarks/run.py --device cpu --only scaling  # time and memory against K (scaling.png)
    python benchmarks/run.py --only search --impls triton --results-dir DIR  # one slice, added to DIR's records

Writes benchmarks/results/<device>-<date>/ (a partial run adds -quick, -<op>, -<shapes>; a --quick
run goes to the git-ignored benchmarks/scratch/ instead, as it records nothing worth keeping) with
results.json (one record per measurement), results.md (tables) and time.png / memory.png, plus
scaling.png with the scaling op (see report.py). With --results-dir the records go to that folder,
after the ones already there, and the reports cover them all: several slices of the matrix (separate
processes, separate time limits) make one report. records.jsonl gets each record as it is measured;
SIGTERM (a time limit) abandons the measurement in progress and the reports are written from the
records so far. On CPU every measurement runs in a
forked child process, so that its peak resident memory is its own and an out-of-memory kill ends
only that child; on CUDA (or with --in-process) they run in this process.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import impls
import report
import timing
import torch
from impls import FP32, Impl, Shape

REPO = Path(__file__).resolve().parents[1]


def residual_shapes(frames: int) -> list[Shape]:
    """Codec quantizers over `frames` frames: EnCodec-like (K = 1024, D = 128; 8 and 32 stages) and
    DAC-like (9 stages, K = 1024, codebook dim 8 projected from D = 1024)."""
    return [Shape(f"encodec-{q}q", frames, 1024, 128, FP32, ops=("residual",), stages=q) for q in (8, 32)] + [
        Shape("dac-9q", frames, 1024, 1024, FP32, ops=("residual",), stages=9, codebook_dim=8)
    ]


def fsq_shapes(frames: int) -> list[Shape]:
    """Scalar quantizers over `frames` tokens: FSQ [8, 5, 5, 5] from D = 64 (the FSQ paper's 1000
    codes), 8-stage ResidualFSQ, fish-speech's GroupedResidualFSQ (D = 512, 8 groups of one stage
    [8, 5, 5, 5]), ChatTTS's DVAE (D = 1024, 2 groups of 2 stages [5, 5, 5, 5]), and FSQ [4] * 16
    (2^32 codes, whose implicit codebook 1.32.0 builds in its constructor)."""
    fsq = dict(ops=("fsq",))
    return [
        Shape("fsq-8555", frames, 1000, 64, levels=(8, 5, 5, 5), **fsq),
        Shape("rfsq-8q", frames, 1000, 64, FP32, levels=(8, 5, 5, 5), stages=8, **fsq),
        Shape("fish-speech-grfsq", frames, 1000, 512, levels=(8, 5, 5, 5), groups=8, **fsq),
        Shape("chattts-grfsq", frames, 625, 1024, FP32, levels=(5, 5, 5, 5), stages=2, groups=2, **fsq),
        Shape("fsq-4x16", frames, 4**16, 16, FP32, levels=(4,) * 16, **fsq),
    ]


def simvq_shapes(n: int, ks: tuple[int, ...], large: bool) -> list[Shape]:
    """SimVQ's training step over n tokens of D = 32 for each K in ks (fp32 and bf16); the last, where
    vector-quantize-pytorch's N x K matrix does not fit, runs by default only when `large`."""
    return [Shape(f"simvq-{k >> 10}k", n, k, 32, ops=("simvq",), default=large or k != ks[-1]) for k in ks]


def lfq_shapes(n: int) -> list[Shape]:
    """LFQ's training step with its entropy loss over n tokens at d = 10, 14, 16, 18 (K = 2^d codes, D = d)."""
    return [Shape(f"lfq-{d}", n, 2**d, d, ops=("lfq",)) for d in (10, 14, 16, 18)]


def head_shapes(positions: int) -> list[Shape]:
    """A prior's output layer (width 256) over `positions` code positions and K = 1k, 16k, 262k codes."""
    return [Shape(f"head-{k >> 10}k", positions, k, 256, FP32, ops=("head",)) for k in (1024, 16384, 262144)]


def scaling_shapes(n: int, d: int, ks: tuple[int, ...]) -> list[Shape]:
    """The scaling figure: N tokens of D dims (fp32) against K codes for each K in ks."""
    return [Shape(f"scale-{k >> 10}k" if k >= 1024 else f"scale-{k}", n, k, d, FP32, ops=("scaling",)) for k in ks]


SHAPES = {
    "cuda": [
        Shape("vqvae", 65536, 1024, 64),
        Shape("vqgan-f16", 65536, 16384, 256),
        Shape("llamagen", 262144, 16384, 8),
        Shape("vqgan-lc", 131072, 100000, 8),
        Shape("large-codebook", 16384, 262144, 32),
        Shape("small-n", 1024, 262144, 32),
        *residual_shapes(65536),
        *fsq_shapes(65536),
        *simvq_shapes(65536, (16384, 65536, 1 << 20), large=True),  # K = 1M: 1.32.0 needs 256 GiB
        *lfq_shapes(8192),  # 1.32.0 at d = 18: two 8 GiB N x K tables and their gradients
        *head_shapes(16384),
    ],
    "cpu": [
        Shape("vqvae-cpu", 16384, 1024, 64),
        Shape("vqgan-cpu", 4096, 8192, 256, FP32),
        Shape("llamagen-cpu", 65536, 16384, 8),  # D = 8 (LlamaGen, DAC) and D = 32 at K = 16384 (issue 15)
        Shape("k16k-cpu", 16384, 16384, 32),
        # the N x K peers need 4-12 GiB and ~10-50 s a call here: only when named in --shapes
        Shape("large-cpu", 65536, 16384, 32, FP32, default=False),
        *residual_shapes(8192),
        *fsq_shapes(16384),
        # K = 1M: 1.32.0 needs 16 GiB per call; fastvq's step takes ~a minute on CPU: only when named
        *simvq_shapes(4096, (16384, 65536, 1 << 20), large=False),
        *lfq_shapes(1024),
        *head_shapes(4096),
        *scaling_shapes(16384, 32, (1024, 4096, 16384, 65536, 262144)),
    ],
    "quick": [
        Shape("tiny", 2048, 256, 16, FP32),
        Shape("tiny-rvq", 2048, 256, 16, FP32, ops=("residual",), stages=3, codebook_dim=8),
        Shape("tiny-head", 512, 2048, 32, FP32, ops=("head",)),
        Shape("tiny-grfsq", 2048, 1000, 16, FP32, ops=("fsq",), levels=(8, 5, 5, 5), stages=2, groups=2),
        Shape("tiny-simvq", 1024, 512, 16, FP32, ops=("simvq",)),
        Shape("tiny-lfq", 512, 256, 8, FP32, ops=("lfq",)),
        *scaling_shapes(512, 16, (256, 1024)),
    ],
}
# square matmul (N = K = D) and copy (N x D fp32) for the measured ceilings
CEILING_SIZES = {"cuda": (8192, 1 << 30), "cpu": (2048, 256 << 20), "quick": (512, 16 << 20)}


@dataclass(frozen=True)
class Settings:
    device: torch.device
    warmup_ms: float
    budget_ms: float
    min_reps: int
    max_reps: int
    quick: bool
    mem_limit: int
    threads: int | None
    child_timeout_s: float = 900.0
    in_process: bool = False  # measure in this process (always on CUDA); else in a forked child

    def timing_args(self) -> dict:
        return dict(warmup_ms=self.warmup_ms, budget_ms=self.budget_ms, min_reps=self.min_reps, max_reps=self.max_reps)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument(
        "--out",
        help="parent folder of the <device>-<date> results folder (default: "
        "benchmarks/results, or the git-ignored benchmarks/scratch with --quick)",
    )
    parser.add_argument(
        "--only",
        choices=("search", "train", "residual", "fsq", "simvq", "lfq", "head", "scaling"),
        help="only this op (ceilings always run; the CPU sweep against faiss is benchmarks/cpu_sweep.py)",
    )
    parser.add_argument(
        "--shapes",
        help="comma-separated shape names of the device's matrix (also runs "
        "shapes left out by default, e.g. large-cpu)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="most timed repetitions per measurement (default: 100 on CUDA, 20 on CPU, 3 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per measurement (default: torch's, "
        "one per core); 1 is steadier when other processes share the cores",
    )
    parser.add_argument(
        "--mem-limit",
        type=float,
        help="GiB a measurement may need (estimated before it "
        "runs; more is recorded as oom). Default: 90%% of free GPU memory, 80%% of "
        "available RAM",
    )
    parser.add_argument(
        "--impls",
        action="append",
        default=[],
        metavar="REGEX",
        help="only implementations whose name matches (re.search; repeat: all must match)",
    )
    parser.add_argument(
        "--skip-impls",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave out implementations whose name matches (repeatable)",
    )
    parser.add_argument(
        "--results-dir",
        help="write into this folder exactly, after the records already in "
        "its records.jsonl (the reports cover all of them): slices of one run",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="call each planned implementation once "
        "(compiling its kernels into the on-disk caches) and time nothing, write nothing",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process on CPU too (as on CUDA) instead of a forked child per measurement",
    )
    args = parser.parse_args(argv)
    args.out = args.out or str(REPO / "benchmarks" / ("scratch" if args.quick else "results"))
    return args


# ---------------------------------------------------------------------------------------------
# the run's context
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "cpu"
    return model


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(device: torch.device, mode: str, threads: int | None) -> dict:
    """Fields every record carries."""
    status = _git("status", "--porcelain")
    return dict(
        device=device_name(device),
        device_type=device.type,
        threads=None if device.type == "cuda" else threads or torch.get_num_threads(),
        load_avg_1min=round(os.getloadavg()[0], 2),
        torch=torch.__version__,
        triton=_version("triton"),
        cuda=torch.version.cuda,
        fastvq=_version("fastvq"),
        vector_quantize_pytorch=_version("vector-quantize-pytorch"),
        git_commit=_git("rev-parse", "HEAD") or os.environ.get("FASTVQ_COMMIT") or None,
        git_dirty=None if status is None else bool(status),
        date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        mode=mode,
    )


def default_mem_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as meminfo:
        available_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable"))
    return int(0.8 * available_kib * 1024)


def rotation_copies(impl: Impl, shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    """Input copies to cycle through: enough to exceed twice the last-level cache (at least 2, at most
    8, and at most 2 GiB of them unless one set is larger)."""
    cache = 32 << 20  # a CPU's last-level cache, roughly
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    one = impls.input_bytes(impl.op, shape, dtype)
    return max(1, min(8, max(2, math.ceil(2 * cache / one)), (2 << 30) // one))


# ---------------------------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------------------------


def _is_oom(err: BaseException) -> bool:
    message = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def measure(impl: Impl, shape: Shape, dtype: torch.dtype, copies: int, settings: Settings) -> dict:
    """Time one implementation on one shape in this process: the result fields of its record."""
    device = settings.device
    try:
        fn = impl.setup(shape, dtype, device)
        arg_sets = impls.make_inputs(impl.op, shape, dtype, device, copies)
        result = timing.bench(fn, arg_sets, device, **settings.timing_args())
        return dict(status="ok", reason="", **vars(result))
    except Exception as err:  # recorded, never dropped
        if _is_oom(err):
            return dict(status="oom", reason=str(err).strip().splitlines()[0][:300])
        return dict(
            status="error", reason=f"{type(err).__name__}: {err}"[:300], traceback=traceback.format_exc(limit=4)
        )
    finally:
        fn = arg_sets = None
        gc.collect()
        if impl.compiles:
            torch.compiler.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _child(conn, impl, shape, dtype, copies, settings) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a stopped run's parent reports; the child just ends
    if settings.threads:
        torch.set_num_threads(settings.threads)
    conn.send(measure(impl, shape, dtype, copies, settings))
    conn.close()


def measure_in_child(impl: Impl, shape: Shape, dtype: torch.dtype, copies: int, settings: Settings) -> dict:
    """`measure` in a forked child process (CPU): its own peak RSS, and a kill ends only the child."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, impl, shape, dtype, copies, settings))
    child.start()
    sender.close()
    try:
        if not receiver.poll(settings.child_timeout_s):
            return dict(status="error", reason=f"timed out after {settings.child_timeout_s:.0f} s")
        try:
            result = receiver.recv()
        except EOFError:  # the child died before sending
            result = None
        child.join()
    finally:  # also when the run is stopped while the child measures
        if child.is_alive():
            child.kill()
            child.join()
    if result is not None:
        return result
    if child.exitcode == -9:
        return dict(status="oom", reason="child killed by SIGKILL (the kernel's out-of-memory killer)")
    return dict(status="error", reason=f"child exited with code {child.exitcode} without a result")


def run_one(impl: Impl, shape: Shape, dtype: torch.dtype, settings: Settings, meta: dict) -> dict:
    """The record of one (implementation, shape, dtype): measured, or skipped / oom with the reason."""
    device = settings.device
    copies = rotation_copies(impl, shape, dtype, device)
    record = dict(
        meta,
        op=impl.op,
        impl=impl.name,
        role=impl.role,
        shape=shape.name,
        N=shape.n,
        K=shape.k,
        D=shape.d,
        stages=shape.stages,
        codebook_dim=shape.codebook_dim,
        levels=list(shape.levels) or None,
        groups=shape.groups,
        dtype=str(dtype).removeprefix("torch."),
        precision=impl.precision,
        copies=copies,
        median_ms=None,
        p20_ms=None,
        p80_ms=None,
        reps=0,
        peak_mem_bytes=None,
    )
    estimate = impls.estimate_bytes(impl, shape, dtype, copies)
    limit = min(settings.mem_limit, impls.SCALING_MEM_CAP) if impl.op == "scaling" else settings.mem_limit
    if reason := impl.why_not(device):
        record.update(status="skipped", reason=reason)
    elif settings.quick and impl.compiles:
        record.update(
            status="skipped", reason="--quick skips torch.compile (a cold inductor compile takes ~40 s on a 2-core CPU)"
        )
    elif estimate > limit:
        record.update(
            status="oom", reason=f"not run: needs about {estimate / 2**30:.1f} GiB, limit {limit / 2**30:.1f} GiB"
        )
    else:
        run = measure if settings.in_process or device.type == "cuda" else measure_in_child
        record.update(run(impl, shape, dtype, copies, settings))
    return record


# ---------------------------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------------------------


def select_shapes(matrix: str, names: str | None) -> list[Shape]:
    shapes = SHAPES[matrix]
    if names is None:
        return [s for s in shapes if s.default]
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {s.name for s in shapes})
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; this matrix has {[s.name for s in shapes]}")
    return [s for s in shapes if s.name in wanted]


def plan(
    matrix: str, shapes: list[Shape], only: str | None, wanted=(), unwanted=(), ceilings: bool = True
) -> list[tuple[Impl, Shape, torch.dtype]]:
    """(implementation, shape, dtype) in run order: ceilings, then per shape its dense products and,
    per input dtype, each op; only implementations whose name matches every regex of `wanted` and
    none of `unwanted`."""

    def chosen(impl: Impl) -> bool:
        return all(re.search(p, impl.name) for p in wanted) and not any(re.search(p, impl.name) for p in unwanted)

    mm, copy_bytes = CEILING_SIZES[matrix]
    ceiling_shapes = {"copy": Shape(f"copy-{copy_bytes >> 20}MiB", copy_bytes // 64, 1, 16)}
    tasks = [
        (c, ceiling_shapes.get(c.name, Shape(f"mm-{mm}", mm, mm, mm)), c.dtypes[0]) for c in impls.CEILINGS if ceilings
    ]
    for shape in shapes:
        ops = [op for op in shape.ops if only in (None, op)]
        if "search" in ops:  # the dense product of the shape in every precision, whatever the input dtype
            tasks += [(impl, shape, impl.dtypes[0]) for impl in impls.IMPLS if impl.op == "matmul"]
        for dtype in shape.dtypes:
            tasks += [(impl, shape, dtype) for impl in impls.IMPLS if impl.op in ops and dtype in impl.dtypes]
    return [(impl, shape, dtype) for impl, shape, dtype in tasks if chosen(impl)]


def compile_only(tasks, settings: Settings) -> None:
    """Call each task's implementation once on one input set (its kernels compile into Triton's and
    inductor's on-disk caches, so that a later measuring process finds them); print what it took."""
    device = settings.device
    for impl, shape, dtype in tasks:
        if impl.why_not(device) or impls.estimate_bytes(impl, shape, dtype, 1) > settings.mem_limit:
            continue
        start = time.perf_counter()
        try:
            args = impls.make_inputs(impl.op, shape, dtype, device, 1)[0]
            impl.setup(shape, dtype, device)(*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            outcome = "ok"
        except Exception as err:  # the measuring run records it properly
            outcome = f"{type(err).__name__}: {err}"[:200]
        args = None
        gc.collect()
        if impl.compiles:
            torch.compiler.reset()
        print(
            f"  compiled {impl.name} {shape.name} {str(dtype).removeprefix('torch.')} in "
            f"{time.perf_counter() - start:.1f} s: {outcome}",
            flush=True,
        )


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    matrix = "quick" if args.quick else device.type
    if args.quick:
        budget, min_reps, max_reps, warmup = 50.0, 2, 3, 0.0
    elif use_cuda:
        budget, min_reps, max_reps, warmup = 100.0, 5, 100, 25.0
    else:
        budget, min_reps, max_reps, warmup = 2000.0, 5, 20, 0.0
    settings = Settings(
        device,
        warmup,
        budget,
        min_reps,
        args.repeats or max_reps,
        args.quick,
        int(args.mem_limit * 2**30) if args.mem_limit else default_mem_limit(device),
        args.threads,
        in_process=args.in_process,
    )
    if args.threads and (args.in_process or args.compile_only):
        torch.set_num_threads(args.threads)
    shapes = select_shapes(matrix, args.shapes)
    if args.compile_only:
        compile_only(plan(matrix, shapes, args.only, args.impls, args.skip_impls, ceilings=False), settings)
        return None
    mode = "quick" if args.quick else "partial" if args.only or args.shapes or args.impls else "full"
    meta = run_meta(device, mode, args.threads)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-") if use_cuda else "cpu"
    # a partial run (--quick, --shapes, --only) never overwrites the full run of the day
    parts = [
        slug,
        meta["date"],
        "quick" if args.quick else "",
        args.only or "",
        args.shapes.replace(",", "+") if args.shapes else "",
    ]
    out_dir = Path(args.results_dir) if args.results_dir else Path(args.out) / "-".join(p for p in parts if p)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier, slices = _earlier_slices(out_dir) if args.results_dir else ([], [])

    # ceilings once per results folder
    tasks = plan(
        matrix,
        shapes,
        args.only,
        args.impls,
        args.skip_impls,
        ceilings=not any(r["op"] == "ceiling" and r["status"] == "ok" for r in earlier),
    )
    print(f"{meta['device']}: {len(tasks)} measurements -> {out_dir}", flush=True)
    start = time.perf_counter()
    records, stopped = [], None
    signal.signal(signal.SIGTERM, _stop)  # `timeout` ends a slice: keep what was measured
    try:
        with open(out_dir / "records.jsonl", "a" if args.results_dir else "w") as log:
            if log.tell() and (out_dir / "records.jsonl").read_bytes()[-1:] != b"\n":
                log.write("\n")  # after a line cut short by a kill
            for impl, shape, dtype in tasks:
                record = run_one(impl, shape, dtype, settings, meta)
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                value = f"{record['median_ms']:.4g} ms" if record["status"] == "ok" else record["reason"]
                print(
                    f"  {impl.op:7} {impl.name:26} {shape.name:15} {record['dtype']:9} {record['status']:7} {value}",
                    flush=True,
                )
    except (KeyboardInterrupt, _Stopped) as err:
        stopped = f"stopped after {len(records)} of {len(tasks)} measurements ({type(err).__name__})"
        print(stopped, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the reports are written whatever arrives now
    run_seconds = time.perf_counter() - start
    this = dict(
        argv=sys.argv[1:] if argv is None else argv, run_seconds=run_seconds, stopped=stopped, measurements=len(records)
    )
    report.write(
        dict(
            meta,
            run_seconds=run_seconds + sum(s["run_seconds"] for s in slices),
            load_avg_1min_end=round(os.getloadavg()[0], 2),
            argv=this["argv"],
            stopped=stopped,
            slices=slices + [this],
        ),
        earlier + records,
        out_dir,
    )
    print(f"done in {run_seconds:.0f} s: {out_dir}", flush=True)
    return out_dir


def _earlier_slices(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """The records already in out_dir/records.jsonl (a line cut short by a kill is left out) and the
    slices that wrote them (from results.json)."""
    records = []
    if (out_dir / "records.jsonl").exists():
        for line in (out_dir / "records.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    try:
        slices = json.loads((out_dir / "results.json").read_text())["meta"].get("slices", [])
    except (OSError, ValueError, KeyError):
        slices = []
    return records, slices


class _Stopped(BaseException):
    """SIGTERM arrived (a time limit): the records so far are still reported. A BaseException, so
    that `measure`'s `except Exception` (which records a failed measurement and goes on) lets it through."""


def _stop(signum, frame):
    raise _Stopped()


if __name__ == "__main__":
    main()
