"""Benchmark records -> results.json, results.md (tables), time.png / memory.png (bars per shape) and
scaling.png (time and memory against K, when the run has the scaling op).

    python benchmarks/report.py benchmarks/results/<device>-<date>/results.json   # redraw from the JSON

Speedups are against the best "alternative" (what users would pick instead) measured in the same
run. Hardware fractions use the ceilings measured in the same run: the large square matmul of each
precision (TFLOP/s), the device-to-device copy (GB/s), and the dense matmul of each search shape.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path

import matplotlib
import torch

import fastvq

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

BAR_OPS = (
    "search",
    "train",
    "residual",
    "fsq",
    "simvq",
    "lfq",
    "head",
)  # drawn as bars per shape in time.png / memory.png
OPS = BAR_OPS + ("scaling",)  # scaling.png draws the last one against K
VQP_LAYER = {
    "train": "vqp-layer",
    "residual": "vqp-rvq",
    "fsq": "vqp-fsq",
    "simvq": "vqp-simvq",
    "lfq": "vqp-lfq",
    "scaling": "vqp-layer-eval",
}  # per op
SHORT = {"skipped": "skip", "oom": "oom", "error": "error"}
EPILOGUE_INSTRUCTIONS = 3  # CUDA-core instructions per (token, code) pair: score, compare, select
LINEAR_MEMORY_FACTOR = 32  # train-step goal: extra bytes <= 32 (N + K) (D + 1) fp32 words + 64 MiB


def write(meta: dict, records: list[dict], out_dir: Path) -> None:
    """results.json, then results.md, then the plots, each written atomically (a kill leaves the
    previous version or the new one); a plot that fails is reported on stderr and the rest still written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "results.json", json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    _write_atomic(out_dir / "results.md", markdown(meta, records))
    figures = [
        ("time.png", lambda path: plot(records, path, "median_ms", 1.0, "median time per call (ms, log)")),
        (
            "memory.png",
            lambda path: plot(records, path, "peak_mem_bytes", 2.0**-20, "peak memory above inputs (MiB, log)"),
        ),
    ]
    if any(r["op"] == "scaling" for r in records):
        figures.append(("scaling.png", lambda path: plot_scaling(records, path)))
    for name, draw in figures:
        partial = out_dir / f".{name}.partial.png"
        try:
            draw(partial)
            if partial.exists():
                os.replace(partial, out_dir / name)
        except Exception:  # a figure is the least of the outputs: keep the tables
            print(f"report: {name} not drawn:\n{traceback.format_exc(limit=3)}", file=sys.stderr)
            partial.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# derived numbers
# ---------------------------------------------------------------------------------------------


def _key(r: dict) -> tuple:
    return r["shape"], r["dtype"]


def _ok(r: dict | None) -> bool:
    return r is not None and r["status"] == "ok"


def _flops(r: dict) -> float:
    return 2.0 * r["N"] * r["K"] * r["D"]


def ceilings(records: list[dict]) -> dict[str, float]:
    """Measured ceilings: 'peak-mm[p]' in TFLOP/s, 'copy' in GB/s (read + write)."""
    out = {}
    for r in records:
        if r["op"] == "ceiling" and _ok(r):
            seconds = r["median_ms"] * 1e-3
            out[r["impl"]] = (
                2 * r["N"] * r["D"] * 4 / seconds / 1e9 if r["impl"] == "copy" else _flops(r) / seconds / 1e12
            )
    return out


def search_precision(r: dict) -> str:
    """Precision the product of a search record ran in: its own, or fastvq's default for its dtype."""
    dtype = getattr(torch, r["dtype"])
    return r["precision"] or fastvq.resolve_precision(None, dtype, dtype)


def _mm_precision(precision: str) -> str:
    return "bf16" if precision == "fp16" else precision  # same tensor-core rate on NVIDIA


def floors(r: dict, ceiling: dict[str, float], cuda: bool) -> dict[str, float]:
    """Lower bounds (ms) of a search from the measured ceilings: compute (16-bit products pad D to
    16, TF32 to 8), epilogue (3 CUDA-core instructions per pair at half the fp32 FMA FLOP rate;
    CUDA only) and memory (read x and codes, write index + distance)."""
    precision = _mm_precision(search_precision(r))
    n, k, d = r["N"], r["K"], r["D"]
    out = {}
    if f"peak-mm[{precision}]" in ceiling:
        padded = max(d, {"bf16": 16, "tf32": 8}.get(precision, 1))
        out["compute"] = 2.0 * n * k * padded / (ceiling[f"peak-mm[{precision}]"] * 1e12) * 1e3
    if cuda and "peak-mm[ieee]" in ceiling:
        out["epilogue"] = EPILOGUE_INSTRUCTIONS * n * k / (ceiling["peak-mm[ieee]"] * 1e12 / 2) * 1e3
    if "copy" in ceiling:
        size = 2 if r["dtype"] == "bfloat16" else 4
        out["memory"] = ((n + k) * d * size + n * 12) / (ceiling["copy"] * 1e9) * 1e3
    return out


def _best_alternatives(records: list[dict]) -> dict[tuple, dict]:
    """(op, shape, dtype) -> the fastest alternative measured there."""
    best = {}
    for r in records:
        if r["role"] == "alternative" and _ok(r):
            key = (r["op"], *_key(r))
            if key not in best or r["median_ms"] < best[key]["median_ms"]:
                best[key] = r
    return best


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _find(records: list[dict], **match) -> dict | None:
    return next((r for r in records if all(r[k] == v for k, v in match.items())), None)


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _impl_table(records: list[dict], op: str, cell, extra_header: list[str] = (), extra=None) -> list[str]:
    """One row per (shape, dtype) of `op`, one column per implementation: cell(record) -> text;
    extra(op, shape, dtype) -> the cells of `extra_header`."""
    rows_of = defaultdict(dict)
    for r in records:
        if r["op"] == op:
            rows_of[_key(r)][r["impl"]] = r
    names = list(dict.fromkeys(r["impl"] for r in records if r["op"] == op))
    rows = []
    for (shape, dtype), by_impl in rows_of.items():
        first = next(iter(by_impl.values()))
        cells = [cell(by_impl[n]) if n in by_impl else "" for n in names]
        more = extra(op, shape, dtype) if extra else []
        rows.append([shape, f"{first['N']}, {first['K']}, {first['D']}", dtype, *cells, *more])
    return _table(["shape", "N, K, D", "dtype", *names, *extra_header], rows)


def _header(meta: dict, count: int) -> list[str]:
    cuda = meta["device_type"] == "cuda"
    commit = (meta["git_commit"] or "unknown")[:10] + (" + uncommitted changes" if meta["git_dirty"] else "")
    slices = meta.get("slices") or [
        dict(argv=meta["argv"], measurements=count, run_seconds=meta["run_seconds"], stopped=meta.get("stopped"))
    ]
    commands = "; ".join(
        f"`python benchmarks/run.py {' '.join(s['argv'])}`"
        + (
            f" ({s['measurements']} in {s['run_seconds']:.0f} s, {s['stopped']})"
            if s.get("stopped")
            else f" ({s['measurements']} in {s['run_seconds']:.0f} s)"
            if len(slices) > 1
            else ""
        )
        for s in slices
    )
    run = (
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, fastvq {meta['fastvq']}, "
        f"vector-quantize-pytorch {meta['vector_quantize_pytorch']}; commit {commit}; {meta['mode']} "
        f"matrix, {count} measurements in {meta['run_seconds']:.0f} s ({commands})."
    )
    if not cuda:
        busy = max(meta["load_avg_1min"], meta["load_avg_1min_end"]) > meta["threads"]
        run += (
            f" {meta['threads']} CPU thread(s); 1-minute load average {meta['load_avg_1min']} at the "
            f"start, {meta['load_avg_1min_end']} at the end"
            + (" (above the thread count: other processes shared the cores and the times are noisy)." if busy else ".")
        )
    method = (
        "Times are medians over repetitions after warm-up (p20/p80 in results.json), each call on the "
        "next of several input copies"
        + (", L2 flushed before each (CUDA events)" if cuda else "")
        + ". Memory is the peak above what was allocated before the call (inputs, layer state): "
        + (
            "`torch.cuda.max_memory_allocated`."
            if cuda
            else "resident-set high-water mark of a forked child per measurement."
        )
        + " `oom`: ran out of memory, or estimated not to fit and not run (see Not run)."
    )
    return [f"# fastvq benchmarks: {meta['device']}, {meta['date']}", "", run, "", method]


def _ceiling_table(records: list[dict], ceiling: dict[str, float]) -> list[str]:
    rows = []
    for r in records:
        if r["op"] == "ceiling":
            copy = r["impl"] == "copy"
            size = f"{r['N'] * r['D'] * 4 >> 20} MiB" if copy else f"{r['N']}³ {r['dtype']}"
            measured = (
                f"{_fmt(ceiling[r['impl']])} {'GB/s' if copy else 'TFLOP/s'}" if r["impl"] in ceiling else r["reason"]
            )
            rows.append([r["impl"], size, _fmt(r["median_ms"]) if _ok(r) else r["status"], measured])
    return _table(["ceiling", "size", "median ms", "measured"], rows)


def markdown(meta: dict, records: list[dict]) -> str:
    cuda = meta["device_type"] == "cuda"
    ceiling = ceilings(records)
    best = _best_alternatives(records)

    def time_cell(r):
        if not _ok(r):
            return SHORT[r["status"]]
        alt = best.get((r["op"], *_key(r)))
        if r["role"] != "fastvq" or not alt:
            return _fmt(r["median_ms"])
        speedups = [f"{alt['median_ms'] / r['median_ms']:.2g}×"]
        vqp = _find(records, op=r["op"], impl=VQP_LAYER.get(r["op"]), shape=r["shape"], dtype=r["dtype"])
        if r["op"] in VQP_LAYER and _ok(vqp) and vqp is not alt:
            speedups.append(f"{vqp['median_ms'] / r['median_ms']:.2g}× vqp")
        return f"{_fmt(r['median_ms'])} ({', '.join(speedups)})"

    def best_cell(op, shape, dtype):
        alt = best.get((op, shape, dtype))
        return [f"{alt['impl']} {_fmt(alt['median_ms'])}" if alt else "none ran"]

    def mem_cell(r):
        if _ok(r) and r["peak_mem_bytes"] is not None:
            return f"{r['peak_mem_bytes'] / 2**20:.3g}"
        return SHORT.get(r["status"], "n/a")

    lines = _header(meta, len(records)) + ["", "## Measured ceilings", ""] + _ceiling_table(records, ceiling)
    titles = {
        "search": "Nearest-code search",
        "train": "Training step (forward, backward, codebook update)",
        "residual": "Residual VQ training step (N frames, K codes, D = input dim; stages and codebook "
        "dim in the shape's name and results.json)",
        "fsq": "Scalar quantizers (FSQ, ResidualFSQ, GroupedResidualFSQ): forward + backward (N tokens, "
        "K = prod(levels), D = input dim; levels, stages and groups in results.json)",
        "simvq": "SimVQ training step (forward, backward, Adam on the map; N tokens, K codes, D)",
        "lfq": "LFQ training step with the entropy loss over all K = 2^D codes (forward + backward; N tokens)",
        "head": "Prior output head over K codes: cross-entropy forward + backward (N positions, width D)",
        "scaling": "Scaling with K (fixed N and D): search, and a layer's eval forward",
    }
    for op in OPS:
        if any(r["op"] == op for r in records):
            versus = ", and over vector-quantize-pytorch's layer" if op in VQP_LAYER else ""
            lines += [
                "",
                f"## {titles[op]}: median ms",
                "",
                f"(n×): fastvq's speedup over the best alternative in the same row{versus}.",
                "",
            ]
            lines += _impl_table(records, op, time_cell, ["best alternative (ms)"], best_cell)
    if any(r["op"] == "search" and r["role"] == "fastvq" and _ok(r) for r in records):
        lines += ["", "## fastvq search against the hardware", "", _hardware_legend(cuda), ""]
        lines += _hardware_table(records, ceiling, best, cuda)
    if cuda and any(r["op"] == "train" and r["role"] == "fastvq" and _ok(r) for r in records):
        lines += ["", "## Training-step goals", ""] + _train_goals(records)
    for op in OPS:
        if any(r["op"] == op for r in records):
            lines += ["", f"## Peak memory above inputs, {op} (MiB)", ""] + _impl_table(records, op, mem_cell)
    lines += ["", "## Not run", ""] + _not_run(records)
    return "\n".join(lines) + "\n"


def _hardware_legend(cuda: bool) -> str:
    text = (
        "TFLOP/s counts 2·N·K·D. % of peak: against the square matmul of the same precision. "
        "dense mm: the same (N, D)×(D, K) product by torch.mm in that precision, writing its N×K output "
        "in blocks (fp16 uses the bf16 one). Floor: the largest of compute (D padded to 16 for 16-bit, "
        "8 for TF32), memory (read inputs, write outputs at the copy rate)"
    )
    if cuda:
        text += (
            f" and epilogue ({EPILOGUE_INSTRUCTIONS} CUDA-core instructions per (token, code) pair at "
            "half the measured fp32 FMA FLOP rate). Goals: ≥ 70 % of the dense mm at D ≥ 64; ≤ 2× the "
            "epilogue floor at D ≤ 32; never slower than the best alternative"
        )
    return text + "."


def _hardware_table(records, ceiling, best, cuda) -> list[str]:
    rows = []
    for r in records:
        if not (r["op"] == "search" and r["role"] == "fastvq" and _ok(r)):
            continue
        precision = search_precision(r)
        tflops = _flops(r) / (r["median_ms"] * 1e-3) / 1e12
        peak = ceiling.get(f"peak-mm[{_mm_precision(precision)}]")
        mm = _find(records, op="matmul", shape=r["shape"], precision=_mm_precision(precision))
        bounds = floors(r, ceiling, cuda)
        bound = max(bounds, key=bounds.get) if bounds else None
        row = [
            r["shape"],
            r["dtype"],
            r["impl"],
            _fmt(r["median_ms"]),
            f"{tflops:.3g}",
            f"{100 * tflops / peak:.0f} %" if peak else "n/a",
            _fmt(mm["median_ms"]) if _ok(mm) else (mm["status"] if mm else "n/a"),
            f"{100 * mm['median_ms'] / r['median_ms']:.0f} %" if _ok(mm) else "n/a",
            f"{_fmt(bounds[bound])} ({bound})" if bound else "n/a",
            f"{100 * bounds[bound] / r['median_ms']:.0f} %" if bound else "n/a",
        ]
        if cuda:
            row.append(_search_goal(r, mm, bounds, best.get(("search", *_key(r)))))
        rows.append(row)
    header = [
        "shape",
        "dtype",
        "impl",
        "ms",
        "TFLOP/s",
        "% of peak",
        "dense mm ms",
        "% of dense mm",
        "floor ms",
        "% of floor",
    ] + (["goal"] if cuda else [])
    return _table(header, rows)


def _search_goal(r, mm, bounds, alt) -> str:
    missed = []
    if r["D"] >= 64 and _ok(mm) and mm["median_ms"] / r["median_ms"] < 0.7:
        missed.append("< 70 % of dense mm")
    if r["D"] <= 32 and "epilogue" in bounds and r["median_ms"] > 2 * bounds["epilogue"]:
        missed.append("> 2× epilogue floor")
    if alt and alt["median_ms"] < r["median_ms"]:
        missed.append(f"slower than {alt['impl']}")
    return "missed: " + "; ".join(missed) if missed else "met"


def _train_goals(records) -> list[str]:
    rows = []
    for r in records:
        if not (r["op"] == "train" and r["role"] == "fastvq" and _ok(r)):
            continue
        vqp = _find(records, op="train", impl="vqp-layer", shape=r["shape"], dtype=r["dtype"])
        speedup = vqp["median_ms"] / r["median_ms"] if _ok(vqp) else None
        linear = LINEAR_MEMORY_FACTOR * (r["N"] + r["K"]) * (r["D"] + 1) * 4 + (64 << 20)
        peak = r["peak_mem_bytes"]
        rows.append(
            [
                r["shape"],
                r["dtype"],
                r["impl"],
                _fmt(r["median_ms"]),
                f"{speedup:.2g}× ({'met' if speedup >= 3 else 'missed'})"
                if speedup
                else f"vqp {vqp['status'] if vqp else 'not run'}",
                f"{peak / 2**20:.3g} MiB = {peak / (r['N'] * r['K'] * 4):.2g} N·K fp32 "
                f"({'met' if peak <= linear else 'missed'})",
            ]
        )
    return _table(
        [
            "shape",
            "dtype",
            "impl",
            "ms",
            "vs vqp (goal ≥ 3×)",
            f"peak extra (goal ≤ {LINEAR_MEMORY_FACTOR}·(N+K)·(D+1)·4 B + 64 MiB)",
        ],
        rows,
    )


def _not_run(records) -> list[str]:
    groups = defaultdict(list)
    for r in records:
        if not _ok(r):
            groups[(r["impl"], r["status"], r["reason"])].append(f"{r['shape']} {r['dtype']}")
    if not groups:
        return ["Every measurement ran."]
    return _table(
        ["impl", "status", "reason", "where"],
        [
            [impl, status, reason.replace("|", "/"), ", ".join(where)]
            for (impl, status, reason), where in groups.items()
        ],
    )


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------

FASTVQ_COLORS = ("#1f77b4", "#2ca02c", "#17becf", "#6baed6", "#74c476", "#08519c", "#006d2c")
OTHER_COLORS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def plot(records: list[dict], path: Path, field: str, scale: float, ylabel: str) -> None:
    """Bars per shape and implementation, one panel per (op, dtype), log scale; fastvq in blues and
    greens, alternatives in warm colours. Runs that ran out of memory or failed keep their slot,
    labelled; skipped implementations are left out (they are listed under "Not run")."""
    shown = [r for r in records if r["op"] in BAR_OPS and r["status"] != "skipped"]
    panels = list(dict.fromkeys((r["op"], r["dtype"]) for r in shown))
    if not panels:  # e.g. --only scaling: its figure is scaling.png
        return
    colors = {}
    for role, palette in (("fastvq", FASTVQ_COLORS), ("alternative", OTHER_COLORS)):
        names = dict.fromkeys(r["impl"] for r in shown if r["role"] == role)
        colors.update({name: palette[i % len(palette)] for i, name in enumerate(names)})
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * max(1, len(panels))), squeeze=False)
    for ax, (op, dtype) in zip(axes[:, 0], panels):
        rows = [r for r in shown if r["op"] == op and r["dtype"] == dtype]
        dims = {r["shape"]: f"{r['N']}×{r['K']}×{r['D']}" for r in rows}
        names = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(names)
        values = [r[field] * scale for r in rows if _ok(r) and r[field] is not None]
        floor = max(min(values, default=1.0), 1e-3) / 3
        for j, name in enumerate(names):
            labelled = False
            for i, shape in enumerate(dims):
                r = _find(rows, impl=name, shape=shape)
                x = i - 0.4 + (j + 0.5) * width
                if r is not None and _ok(r) and r[field] is not None:
                    ax.bar(x, max(r[field] * scale, floor), width, color=colors[name], label=None if labelled else name)
                    labelled = True
                elif r is not None:
                    ax.text(
                        x,
                        floor * 1.1,
                        SHORT.get(r["status"], "n/a"),
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color=colors[name],
                    )
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xlim(-0.5, len(dims) - 0.5)
        ax.set_xticks(range(len(dims)))
        ax.set_xticklabels([f"{shape}\n{nkd}" for shape, nkd in dims.items()], fontsize=8)
        ax.set_title(f"{op}, {dtype} inputs", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(records: list[dict], path: Path) -> None:
    """Two log-log panels against K: median time and peak memory above inputs, one line per
    implementation of the scaling op. A K where it did not run (oom: its estimate passed the cap, or
    it failed) is named in the legend."""
    rows = [r for r in records if r["op"] == "scaling" and r["status"] != "skipped"]
    names = list(dict.fromkeys(r["impl"] for r in rows))
    palettes = {"fastvq": iter(FASTVQ_COLORS), "alternative": iter(OTHER_COLORS)}
    colors = {name: next(palettes[_find(rows, impl=name)["role"]]) for name in names}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (field, scale, label) in zip(
        axes,
        [
            ("median_ms", 1.0, "median time per call (ms)"),
            ("peak_mem_bytes", 2.0**-20, "peak memory above inputs (MiB)"),
        ],
    ):
        for name in names:
            mine = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["K"])
            ran = [r for r in mine if _ok(r) and r[field] is not None]
            missing = [f"{r['K']}: {SHORT.get(r['status'], r['status'])}" for r in mine if not _ok(r)]
            legend = name + (f" (not at K = {', '.join(missing)})" if missing else "")
            ax.plot(
                [r["K"] for r in ran],
                [max(r[field] * scale, 1e-3) for r in ran],
                "o-",
                color=colors[name],
                label=legend,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (codes)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if rows:
        fig.suptitle(f"against K at N = {rows[0]['N']}, D = {rows[0]['D']}, {rows[0]['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    path = Path(argv[0])
    data = json.loads(path.read_text())
    write(data["meta"], data["records"], path.parent)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
