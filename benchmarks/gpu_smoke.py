"""The GPU check's correctness smoke: every op on a kernel backend against the reference, on the GPU, in seconds.

    python benchmarks/gpu_smoke.py OUT_FOLDER [--device cuda] [--backend triton|cuda] [--shard I/N]

For each op, D in (8, 64, 256), fp32 and bf16, l2 and cosine, at N and K that are not multiples of
any tile: the Triton result against the torch backend on the same device (and the nearest code
against a float64 brute force: regret within the stated bound), first-call time (compilation) and
steady median time; then one VectorQuantize training step on both backends; then the registers,
spills and shared memory of every compiled Triton kernel. With --backend cuda the CUDA C++ backend
is checked the same way (built first; its ops without a CUDA kernel run on Triton), and code_stats
also records the Triton times (sorted and atomic) beside it and whether it is bitwise the same on a
second run and as Triton's sorted result.

Every check is guarded: an exception (a compile error, an illegal address) becomes one record with
ok false and the error, and the next check runs. Each record is appended to OUT/smoke.jsonl and
flushed as soon as its check finishes (OUT/smoke-IofN.jsonl with --shard: the checks are split into
N groups of (D, dtype) and the layer step, run by N processes side by side to compile in parallel).
SIGTERM stops the checks; what finished is still tabled. Then OUT/kernels.json (registers and
spills of the compiled Triton kernels), a table, and the exit status: 1 when a check failed, 2 when
stopped before the end, else 0. A missed performance goal (the `goal` field) is reported, not failed.
On CPU (`--device cpu` under TRITON_INTERPRET=1, tiny shapes) it dry-runs the same code.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

import fastvq

DIMS = (8, 64, 256)
DTYPES = (torch.float32, torch.bfloat16)
METRICS = ("l2", "cosine")
UNIT = {"ieee": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """(first-call seconds, steady median seconds, first result) of fn() on device."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return first, sorted(times)[len(times) // 2], result


def regret_ok(x, codebook, indices, metric, precision) -> tuple[bool, float]:
    """The chosen code's float64 distance is within 4 (D + 2) u (|x|^2 + max |c|^2) of the best
    (l2; cosine: 4 (D + 2) u; dot: 4 (D + 2) u |x| max |c|), u the unit roundoff of the precision
    the product ran in."""
    x64, c64 = x.double().cpu(), codebook.double().cpu()
    if metric == "cosine":
        x64, c64 = torch.nn.functional.normalize(x64, dim=-1), torch.nn.functional.normalize(c64, dim=-1)
    dense = -(x64 @ c64.T) if metric == "dot" else torch.cdist(x64, c64).pow(2)
    chosen = dense.gather(1, indices.cpu().clamp_min(0)[:, None])[:, 0]
    regret = chosen - dense.min(1).values
    if metric == "dot":
        scale = x64.norm(dim=1) * c64.norm(dim=1).max()
    else:
        scale = 1.0 if metric == "cosine" else x64.pow(2).sum(1) + c64.pow(2).sum(1).max()
    bound = 4 * (x.shape[1] + 2) * UNIT[precision] * scale * (4 if metric == "cosine" else 1)
    return bool((regret <= bound).all()), float((regret / bound).max())


def groups(device: torch.device) -> list[tuple]:
    """The units the checks are sharded by: (D, dtype) pairs, then the layer step (on CUDA)."""
    return [(d, dtype) for d in DIMS for dtype in DTYPES] + ([("layer",)] if device.type == "cuda" else [])


def group_checks(group: tuple, device: torch.device, n: int, k: int, repeats: int, backend: str):
    """Yield (the fields naming a check, a callable returning its result fields) for each check of a group."""
    if group == ("layer",):
        yield (
            dict(op="VectorQuantize train step", N=4096, K=4099, D=64, dtype="float32"),
            functools.partial(layer_check, device, repeats, backend),
        )
        return
    d, dtype = group
    x = torch.randn(n, d, device=device).to(dtype)
    codebook = torch.randn(k, d, device=device).to(dtype)
    precision = fastvq.resolve_precision(None, dtype, dtype)
    base = dict(N=n, K=k, D=d, dtype=str(dtype).removeprefix("torch."))
    for metric in METRICS:
        for op in ("nearest_code", "topk_codes", "sample_code", "code_cross_entropy"):
            yield (
                dict(base, op=op, metric=metric, precision=precision),
                functools.partial(op_check, op, x, codebook, metric, precision, backend, device, repeats),
            )
    yield dict(base, op="code_stats"), functools.partial(code_stats_check, x, codebook, backend, device, repeats)
    if backend == "triton":
        for batch in ("searched", "collapsed"):
            yield (
                dict(base, op=f"code_stats_{batch}"),
                functools.partial(code_stats_variant, batch, x, codebook, device, repeats),
            )


def op_check(op, x, codebook, metric, precision, backend, device, repeats) -> dict:
    """One op on the kernel backend against the torch backend: times and the comparison."""
    n, k = x.shape[0], codebook.shape[0]
    calls = {
        "nearest_code": lambda b: fastvq.nearest_code(x, codebook, metric=metric, backend=b),
        "topk_codes": lambda b: fastvq.topk_codes(x, codebook, 4, metric=metric, backend=b),
        "sample_code": lambda b: fastvq.sample_code(x, codebook, temperature=0.5, metric=metric, seed=7, backend=b),
        "code_cross_entropy": lambda b: fastvq.code_cross_entropy(
            x, codebook, torch.arange(n, device=device) % k, metric=metric, backend=b
        ),
    }
    first, steady, got = timed(lambda: calls[op](backend), device, repeats)
    want = calls[op]("torch")
    return dict(
        first_s=first, steady_ms=steady * 1e3, **compare(op, got, want, x, codebook, metric, precision, backend)
    )


def code_stats_check(x, codebook, backend, device, repeats) -> dict:
    """code_stats of the searched indices against the torch backend; on backend='cuda' also bitwise
    the same on a second run and as Triton's sorted result, with its time beside Triton's two variants."""
    k = codebook.shape[0]
    indices = fastvq.nearest_code(x, codebook, backend="torch")[0]
    first, steady, got = timed(lambda: fastvq.code_stats(x, indices, k, backend=backend), device, repeats)
    want = fastvq.code_stats(x, indices, k, backend="torch")
    ok = torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-3)
    detail = f"max sum error {(got[1] - want[1]).abs().max():.2e}"
    if backend == "cuda":
        again = fastvq.code_stats(x, indices, k, backend=backend)
        kernels = importlib.import_module("fastvq.ops.triton.code_stats")
        _, triton_time, triton = timed(lambda: kernels.code_stats(x[None], indices[None], k), device, repeats)
        atomic = timed(lambda: kernels.code_stats(x[None], indices[None], k, deterministic=False), device, repeats)[1]
        repeatable = torch.equal(got[1], again[1])
        as_triton = torch.equal(got[0], triton[0][0]) and torch.equal(got[1], triton[1][0])
        ok = ok and repeatable and as_triton
        detail += (
            f", bitwise repeatable {repeatable}, bitwise Triton's {as_triton}, "
            f"{steady / triton_time:.2f}x Triton's time, {steady / atomic:.2f}x atomic time"
        )
    return dict(first_s=first, steady_ms=steady * 1e3, ok=ok, detail=detail)


def code_stats_variant(batch: str, x, codebook, device, repeats) -> dict:
    """The deterministic sorted reduction against the fp32-atomic variant on the search's indices
    ("searched") or a collapsed batch (every token on code 0): bitwise equal on a rerun (ok), and
    issue 15's goal of at most 1.2x the atomic time on CUDA (goal: met or missed, not a failure)."""
    kernels = importlib.import_module("fastvq.ops.triton.code_stats")
    k = codebook.shape[0]
    idx = fastvq.nearest_code(x, codebook, backend="torch")[0]
    idx = idx if batch == "searched" else torch.zeros_like(idx)
    times, results = {}, {}
    for deterministic in (True, False):
        first, times[deterministic], results[deterministic] = timed(
            lambda: kernels.code_stats(x[None], idx[None], k, deterministic=deterministic), device, repeats
        )
    bitwise = torch.equal(kernels.code_stats(x[None], idx[None], k)[1], results[True][1])
    ratio = times[True] / times[False]
    record = dict(
        first_s=first,
        steady_ms=times[True] * 1e3,
        atomic_ms=times[False] * 1e3,
        ok=bitwise,
        detail=f"deterministic / atomic {ratio:.2f}x, rerun bitwise equal: {bitwise}",
    )
    if device.type == "cuda":
        record["goal"] = "met" if ratio <= 1.2 else f"missed: {ratio:.2f}x the atomic time (goal <= 1.2x)"
    return record


def compare(op, got, want, x, codebook, metric, precision, backend) -> dict:
    """Whether the kernel backend's result is right: agreement with the torch backend (and, for the
    search, the regret bound against float64)."""
    if op == "nearest_code":
        ok, ratio = regret_ok(x, codebook, got[0], metric, precision)
        agree = float((got[0] == want[0]).float().mean())
        return dict(ok=ok and agree > 0.97, detail=f"regret/bound {ratio:.2f}, agreement {agree:.4f}")
    if op == "topk_codes":
        nearest = fastvq.nearest_code(x, codebook, metric=metric, backend=backend)[0]
        ordered = bool((got[1].diff(dim=-1) >= 0).all())
        agree = float((got[0] == want[0]).float().mean())
        return dict(ok=ordered and torch.equal(got[0][:, 0], nearest) and agree > 0.9, detail=f"agreement {agree:.4f}")
    if op == "sample_code":
        agree = float((got == want).float().mean())
        return dict(ok=agree > 0.97, detail=f"same draw as torch {agree:.4f}")
    error = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
    return dict(ok=error < 5e-2 if precision != "ieee" else error < 1e-4, detail=f"max rel error {error:.2e}")


def layer_check(device: torch.device, repeats: int, kernels: str) -> dict:
    """One VectorQuantize training step (forward, backward, EMA) on the kernel backend and on torch
    from the same state."""
    out = {}
    x = torch.randn(4, 1024, 64, device=device, requires_grad=True)
    for backend in (kernels, "torch"):
        torch.manual_seed(0)
        layer = fastvq.VectorQuantize(dim=64, codebook_size=4099, decay=0.9, backend=backend).to(device).train()

        def step():
            quantized, indices, loss = layer(x)
            (quantized.sum() + loss).backward()
            return indices

        first, steady, indices = timed(step, device, repeats)
        out[backend] = (first, steady, indices, layer.codebook.detach().clone())
    agree = float((out[kernels][2] == out["torch"][2]).float().mean())
    return dict(
        first_s=out[kernels][0],
        steady_ms=out[kernels][1] * 1e3,
        torch_steady_ms=out["torch"][1] * 1e3,
        ok=agree > 0.97,
        detail=f"first-step index agreement {agree:.4f}",
    )


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every kernel compiled in this process (triton's
    JIT caches; fields absent in a version are None)."""
    import triton

    rows = []
    for module in (
        importlib.import_module(f"fastvq.ops.triton.{name}")  # the modules, not the ops
        for name in ("nearest_code", "code_cross_entropy", "code_stats")
    ):
        for name, fn in vars(module).items():
            if not isinstance(fn, triton.runtime.JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                for compiled in caches[0].values():
                    meta = compiled.metadata
                    rows.append(
                        dict(
                            kernel=name,
                            warps=meta.num_warps,
                            stages=meta.num_stages,
                            shared=meta.shared,
                            registers=getattr(compiled, "n_regs", None),
                            spills=getattr(compiled, "n_spills", None),
                        )
                    )
    return rows


class _Stopped(BaseException):
    """SIGTERM arrived (the check's time limit): the finished checks are still reported."""


def _stop(signum, frame):
    raise _Stopped()


def run_checks(
    chosen: list[tuple], device: torch.device, n: int, k: int, repeats: int, backend: str, log, records: list[dict]
) -> None:
    """Run the checks of the chosen groups, each guarded, appending every record to `records` and to
    `log` (flushed) as it finishes."""

    def keep(record: dict) -> None:
        records.append(record)
        log.write(json.dumps(record) + "\n")
        log.flush()

    for group in chosen:
        checks = group_checks(group, device, n, k, repeats, backend)
        fields = dict(op="inputs", D=group[0], dtype=str(group[1]).removeprefix("torch.") if group[1:] else "")
        while True:
            try:  # making a group's inputs can fail too: one record, then the next group
                fields, check = next(checks)
            except StopIteration:
                break
            except Exception as err:
                keep(dict(fields, ok=False, **_failure(err)))
                break
            try:
                keep(dict(fields, **check()))
            except Exception as err:
                keep(dict(fields, ok=False, **_failure(err)))


def _failure(err: Exception) -> dict:
    return dict(
        detail=f"{type(err).__name__}: {err}".splitlines()[0][:300], error=traceback.format_exc(limit=6)[-3000:]
    )


def print_table(records: list[dict], resources: list[dict]) -> None:
    print(f"{'op':<28}{'D':>5} {'dtype':<9}{'metric':<8}{'first s':>9}{'steady ms':>11}  ok  detail")
    for r in records:
        first, steady = r.get("first_s"), r.get("steady_ms")
        goal = f" [goal {r['goal']}]" if "goal" in r else ""
        print(
            f"{r['op']:<28}{r['D']:>5} {r['dtype']:<9}{r.get('metric', ''):<8}"
            f"{'' if first is None else f'{first:.2f}':>9}{'' if steady is None else f'{steady:.3f}':>11}  "
            f"{'ok' if r['ok'] else 'FAIL'}  {r['detail']}{goal}"
        )
    spilling = [r for r in resources if r["spills"]]
    print(
        f"{len(resources)} compiled kernels, {len(spilling)} with spills"
        + "".join(
            f"\n  {r['kernel']} warps={r['warps']}: {r['registers']} registers, {r['spills']} spills" for r in spilling
        )
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    parser.add_argument("--shard", default="1/1", help="I/N: run the I-th of N interleaved parts of the checks")
    args = parser.parse_args(argv)
    index, count = (int(part) for part in args.shard.split("/"))
    if not 1 <= index <= count:
        parser.error(f"--shard must be I/N with 1 <= I <= N, got {args.shard!r}")
    device = torch.device(args.device)
    n, k, repeats = (1003, 4099, 20) if device.type == "cuda" else (37, 70, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if count == 1 else f"-{index}of{count}"
    signal.signal(signal.SIGTERM, _stop)
    records, stopped = [], False
    with open(args.out / f"smoke{suffix}.jsonl", "w") as log:
        try:
            run_checks(groups(device)[index - 1 :: count], device, n, k, repeats, args.backend, log, records)
        except (_Stopped, KeyboardInterrupt):
            stopped = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the reports are written whatever arrives now
    try:
        resources = kernel_resources() if args.backend == "triton" else []  # CUDA C++: tests/tools/cuda_compile.py
    except Exception as err:  # a triton version without these caches
        resources = [
            dict(
                kernel="?",
                warps=None,
                stages=None,
                shared=None,
                registers=None,
                spills=None,
                error=f"{type(err).__name__}: {err}",
            )
        ]
    (args.out / f"kernels{suffix}.json").write_text(json.dumps(resources, indent=1) + "\n")
    print_table(records, resources)
    failed = [r for r in records if not r["ok"]]
    missed = [r for r in records if r.get("goal", "met") != "met"]
    print(
        f"{len(records) - len(failed)} passed, {len(failed)} failed, {len(missed)} missed a performance goal"
        + (" (stopped before the end)" if stopped else "")
    )
    return 1 if failed else 2 if stopped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
