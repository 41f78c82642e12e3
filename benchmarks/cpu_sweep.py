"""fastvq's C++ CPU search against faiss-cpu over a grid of shapes, on an idle CPU and with one busy thread.

    python benchmarks/cpu_sweep.py                  # the full grid (estimated 10-15 min on an idle 2-core machine)
    python benchmarks/cpu_sweep.py --quick          # a small grid, about a minute
    python benchmarks/cpu_sweep.py --committed      # the CPU matrix's search shapes (benchmarks/run.py)

Each point: N tokens (odd sizes included) x D dimensions x K codes, fp32 and bf16 inputs, k = 1, l2.
fastvq: `fastvq.nearest_code(x, codebook, backend="cpu")` on the inputs as they are; faiss-cpu:
`IndexFlatL2.search(x, 1)` on fp32 copies (what a user converts bf16 to; building the index is
counted), both with --threads threads. The two run in turn within each repetition (interleaved, so
both see the same load; each timed call after a pause and an untimed one of the same library), and a point's
ratio is faiss's median time over fastvq's: above 1, fastvq is faster. "busy" repeats the grid while
a process started here spins on one core.

Writes <out>/cpu-sweep-<date>[-quick|-committed]/sweep.json (every point's times and ratio, with the
machine, threads, load and commit) and sweep.png (heat maps of the ratio: a row per dtype and K, idle
and busy side by side). The default <out> is benchmarks/results, or the git-ignored benchmarks/scratch
with --quick.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import impls
import run
import torch

import fastvq
from fastvq.app.files import write_atomic
from fastvq.ops.cpu._extension import vector_unit

REPO = Path(__file__).resolve().parents[1]
GRID = dict(n=(999, 8191, 32769), d=(4, 8, 16, 32, 64, 128, 256), k=(1024, 16384))
QUICK_GRID = dict(n=(1001, 4097), d=(8, 16, 64), k=(1024,))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOADS = ("idle", "busy")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="a small grid, few repetitions")
    grid.add_argument(
        "--committed",
        action="store_true",
        help="the search shapes of benchmarks/run.py's CPU matrix instead of the grid",
    )
    for axis in ("n", "d", "k"):
        parser.add_argument(f"--{axis}", type=_sizes, help=f"comma-separated {axis.upper()} values (the grid's axis)")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES), help="float32,bfloat16")
    parser.add_argument("--loads", type=lambda s: s.split(","), default=list(LOADS), help="idle,busy")
    parser.add_argument("--threads", type=int, default=2, help="threads of each search (default 2)")
    parser.add_argument("--repeats", type=int, help="timed repetitions per point (default 7, 3 with --quick)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=2.0,
        help="fewer repetitions (at least 3) past this many seconds per point and implementation",
    )
    parser.add_argument("--out", type=Path, help="parent folder of the results folder")
    args = parser.parse_args(argv)
    if set(args.dtypes) - set(DTYPES) or set(args.loads) - set(LOADS):
        parser.error(f"--dtypes takes {','.join(DTYPES)}, --loads takes {','.join(LOADS)}")
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.out = args.out or REPO / "benchmarks" / ("scratch" if args.quick else "results")
    return args


def _sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(v) for v in text.split(","))
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


def shapes(args) -> list[tuple[int, int, int]]:
    """(N, D, K) points: the committed CPU search shapes, or the grid (--n/--d/--k override its axes)."""
    if args.committed:
        return [(s.n, s.d, s.k) for s in run.SHAPES["cpu"] if "search" in s.ops and s.default]
    grid = QUICK_GRID if args.quick else GRID
    ns, ds, ks = (getattr(args, axis) or grid[axis] for axis in ("n", "d", "k"))
    return [(n, d, k) for k in ks for n in ns for d in ds]


def _spin() -> None:
    while True:
        pass


class BusyThread:
    """A process spinning on one core while the block runs (started and stopped here)."""

    def __enter__(self):
        self.process = multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
        self.process.start()
        time.sleep(0.2)  # let it reach its loop
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.join()


SETTLE_S = 0.02
"""Pause before each library's calls (see `time_pair`)."""


def time_pair(fastvq_call, faiss_call, repeats: int, budget_s: float) -> tuple[list[float], list[float]]:
    """Seconds of each call, the two in turn (which goes first alternates), until `repeats` pairs or,
    after 3, `budget_s` seconds of either. Each library's turn starts with a pause of SETTLE_S, then an
    untimed call, then the timed one, so that each is timed in its own steady state, as in a loop of its
    calls: faiss's OpenMP threads keep spinning for a few ms after a call, and a fastvq call timed in
    that window ran 1.5-3x slower (32769 x 1024, D = 8, fp32, 2 threads: 6.7 against 3.7 ms; with a
    pause of 5 ms or more, 3.8 ms)."""
    times = ([], [])
    for rep in range(repeats):
        order = ((0, fastvq_call), (1, faiss_call)) if rep % 2 == 0 else ((1, faiss_call), (0, fastvq_call))
        for slot, call in order:
            time.sleep(SETTLE_S)
            call()
            start = time.perf_counter()
            call()
            times[slot].append(time.perf_counter() - start)
        if rep >= 2 and max(sum(times[0]), sum(times[1])) > budget_s:
            break
    return times


def measure_point(n: int, d: int, k: int, dtype: torch.dtype, args) -> dict:
    """One point's interleaved times (ms) and ratio (faiss median / fastvq median)."""
    generator = torch.Generator().manual_seed(n * 7919 + d * 31 + k)
    x = torch.randn(n, d, generator=generator).to(dtype)
    codebook = torch.randn(k, d, generator=generator).to(dtype)
    fastvq_ms, faiss_ms = time_pair(
        lambda: fastvq.nearest_code(x, codebook, backend="cpu"),
        lambda: impls.faiss_search(x, codebook),
        args.repeats,
        args.budget_s,
    )
    fastvq_median, faiss_median = statistics.median(fastvq_ms), statistics.median(faiss_ms)
    return dict(
        n=n,
        d=d,
        k=k,
        dtype=str(dtype).removeprefix("torch."),
        fastvq_ms=[t * 1e3 for t in fastvq_ms],
        faiss_ms=[t * 1e3 for t in faiss_ms],
        fastvq_median_ms=fastvq_median * 1e3,
        faiss_median_ms=faiss_median * 1e3,
        ratio=faiss_median / fastvq_median,
        load_avg_1min=round(os.getloadavg()[0], 2),
    )


def sweep(args) -> list[dict]:
    """Every point of the grid in every dtype and load, printed as it is measured."""
    torch.set_num_threads(args.threads)
    impls.faiss.omp_set_num_threads(args.threads)
    points = []
    for load in args.loads:
        with BusyThread() if load == "busy" else contextlib.nullcontext():
            for name in args.dtypes:
                for n, d, k in shapes(args):
                    point = dict(load=load, **measure_point(n, d, k, DTYPES[name], args))
                    points.append(point)
                    print(
                        f"  {load:4} {name:8} N={n:<6} D={d:<4} K={k:<6} fastvq {point['fastvq_median_ms']:9.3f} ms"
                        f"  faiss {point['faiss_median_ms']:9.3f} ms  ratio {point['ratio']:5.2f}"
                        f"  (load {point['load_avg_1min']})",
                        flush=True,
                    )
    return points


def heat_maps(points: list[dict], meta: dict):
    """A matplotlib figure: the ratio over N (rows) x D (columns), a row of panels per dtype and K, a
    column per load; cells annotated, green above 1 (fastvq faster), red below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    loads = [load for load in LOADS if any(p["load"] == load for p in points)]
    rows = sorted({(p["dtype"], p["k"]) for p in points})
    fig, axes = plt.subplots(
        len(rows), len(loads), squeeze=False, figsize=(4.8 * len(loads), 3.2 * len(rows)), layout="constrained"
    )
    norm = LogNorm(vmin=0.5, vmax=2.0)
    for (dtype, k), row in zip(rows, axes):
        for load, ax in zip(loads, row):
            here = [p for p in points if (p["dtype"], p["k"], p["load"]) == (dtype, k, load)]
            ns, ds = sorted({p["n"] for p in here}), sorted({p["d"] for p in here})
            ratio = [[math.nan] * len(ds) for _ in ns]
            for p in here:
                ratio[ns.index(p["n"])][ds.index(p["d"])] = p["ratio"]
            image = ax.imshow(ratio, cmap="RdYlGn", norm=norm, aspect="auto")
            for i, j in ((i, j) for i in range(len(ns)) for j in range(len(ds))):
                ax.text(j, i, f"{ratio[i][j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set(
                xticks=range(len(ds)),
                xticklabels=ds,
                yticks=range(len(ns)),
                yticklabels=ns,
                xlabel="D",
                ylabel="N",
                title=f"{load}: {dtype}, K = {k}",
            )
    bar = fig.colorbar(image, ax=axes, shrink=0.6, label="faiss time / fastvq time (above 1: fastvq faster)")
    bar.set_ticks([0.5, 0.8, 1.0, 1.2, 1.5, 2.0], labels=["0.5", "0.8", "1", "1.2", "1.5", "2"])
    bar.minorticks_off()
    fig.suptitle(
        f"fastvq-cpu vs faiss-cpu {meta['faiss']}, nearest code (l2, k = 1), {meta['threads']} threads, "
        f"{meta['device']} ({meta['vector_unit']})",
        fontsize=9,
    )
    return fig


def main(argv=None) -> Path:
    """Run the sweep; the results folder it wrote."""
    args = parse_args(argv)
    if impls.FAISS_MISSING:
        raise SystemExit(f"cpu_sweep: {impls.FAISS_MISSING}")
    mode = "quick" if args.quick else "committed" if args.committed else "grid"
    meta = dict(
        run.run_meta(torch.device("cpu"), mode, args.threads),
        faiss=impls.faiss.__version__,
        vector_unit=vector_unit(),
        argv=sys.argv[1:] if argv is None else argv,
    )
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    out_dir = args.out / "-".join(["cpu-sweep", date] + ([mode] if mode != "grid" else []))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"{meta['device']} ({meta['vector_unit']}), {args.threads} threads, faiss {meta['faiss']}: "
        f"{len(shapes(args))} shapes x {args.dtypes} x {args.loads} -> {out_dir}",
        flush=True,
    )
    start = time.perf_counter()
    points = sweep(args)
    meta.update(run_seconds=round(time.perf_counter() - start, 1), load_avg_1min_end=round(os.getloadavg()[0], 2))
    text = json.dumps(dict(meta=meta, points=points), indent=1) + "\n"
    write_atomic(out_dir / "sweep.json", lambda f: f.write(text.encode()))
    figure, png = heat_maps(points, meta), io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    write_atomic(out_dir / "sweep.png", lambda f: f.write(png.getvalue()))
    for load in args.loads:
        ratios = [p["ratio"] for p in points if p["load"] == load]
        print(f"{load}: ratio {min(ratios):.2f} (lowest) .. {max(ratios):.2f}, median {statistics.median(ratios):.2f}")
    return out_dir


if __name__ == "__main__":
    main()
