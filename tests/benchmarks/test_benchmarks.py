"""The benchmark harness end to end on CPU (--quick): complete records, tables and plots, nothing dropped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {
    "device",
    "torch",
    "triton",
    "git_commit",
    "date",
    "op",
    "impl",
    "role",
    "shape",
    "N",
    "K",
    "D",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "peak_mem_bytes",
    "status",
    "reason",
}
EXPECTED = {
    ("ceiling", "peak-mm[ieee]"),
    ("ceiling", "copy"),
    ("matmul", "dense-mm[ieee]"),
    ("search", "fastvq-triton[ieee]"),
    ("search", "fastvq-triton[bf16]"),
    ("search", "fastvq-torch"),
    ("search", "naive"),
    ("search", "cdist"),
    ("search", "compile(naive)"),
    ("search", "vqp-cdist"),
    ("search", "fastvq-cuda[ieee]"),
    ("search", "fastvq-cuda[bf16]"),
    ("train", "fastvq-layer[triton]"),
    ("train", "fastvq-layer[cuda]"),
    ("train", "fastvq-layer[torch]"),
    ("train", "vqp-layer"),
    ("train", "taming-vq2"),
    ("residual", "fastvq-rvq[torch]"),
    ("residual", "fastvq-rvq[triton]"),
    ("residual", "vqp-rvq"),
    ("fsq", "fastvq-fsq"),
    ("fsq", "vqp-fsq"),
    ("head", "fastvq-head[torch]"),
    ("head", "fastvq-head[triton]"),
    ("head", "linear+cross_entropy"),
    ("scaling", "fastvq-cpu"),
    ("scaling", "faiss-cpu"),
    ("scaling", "fastvq-layer-eval[cpu]"),
    ("scaling", "vqp-layer-eval"),
    ("simvq", "fastvq-simvq[torch]"),
    ("simvq", "fastvq-simvq[triton]"),
    ("simvq", "vqp-simvq"),
    ("lfq", "fastvq-lfq"),
    ("lfq", "vqp-lfq"),
}


def _run_quick(out: Path) -> Path:
    # the interpreter that conftest enables for the kernel tests must not reach the benchmark
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVQ_BACKEND")}
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "run.py"),
        "--quick",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    (folder,) = out.iterdir()
    return folder


def test_quick_cpu_run_writes_complete_records_tables_and_plots(tmp_path):
    folder = _run_quick(tmp_path)
    assert folder.name.startswith("cpu-") and folder.name.endswith("-quick")
    data = json.loads((folder / "results.json").read_text())
    records = data["records"]

    for r in records:
        assert REQUIRED <= r.keys(), f"{r['impl']} lacks {sorted(REQUIRED - r.keys())}"
        assert r["device"] and r["torch"] and r["date"] == data["meta"]["date"]
        assert r["status"] in ("ok", "oom", "skipped", "error"), r
    assert EXPECTED <= {(r["op"], r["impl"]) for r in records}, "a planned implementation was dropped"
    errors = [(r["impl"], r["reason"]) for r in records if r["status"] == "error"]
    assert not errors

    ok = [r for r in records if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {
        "fastvq-torch",
        "naive",
        "cdist",
        "vqp-cdist",
        "fastvq-layer[torch]",
        "vqp-layer",
        "taming-vq2",
        "dense-mm[ieee]",
        "copy",
        "fastvq-rvq[torch]",
        "vqp-rvq",
        "fastvq-fsq",
        "vqp-fsq",
        "fastvq-head[torch]",
        "linear+cross_entropy",
        "vqp-layer-eval",
        "fastvq-simvq[torch]",
        "vqp-simvq",
        "fastvq-lfq",
        "vqp-lfq",
    }
    for r in ok:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["reps"] >= 2 and isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0, r
    for r in records:
        if r["status"] != "ok":
            assert r["reason"] and r["median_ms"] is None, r
    # CPU: the Triton rows are reported as skipped with the reason, not run under the interpreter
    assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in records if "triton" in r["impl"])
    assert all(r["status"] == "skipped" and "needs a CUDA GPU" in r["reason"] for r in records if "cuda" in r["impl"])
    # the memory column is real: the textbook formula holds at least one N x K fp32 matrix
    naive = next(r for r in ok if r["impl"] == "naive" and r["dtype"] == "float32")
    assert naive["peak_mem_bytes"] >= naive["N"] * naive["K"] * 4

    markdown = (folder / "results.md").read_text()
    for title in (
        "## Measured ceilings",
        "## Nearest-code search",
        "## Training step",
        "## Residual VQ training",
        "## Prior output head",
        "## Scaling with K",
        "## Peak memory",
        "## Not run",
    ):
        assert title in markdown
    assert "| tiny | 2048, 256, 16 | float32 |" in markdown
    assert sorted(r["K"] for r in records if r["impl"] == "vqp-layer-eval") == [256, 1024]
    for name in ("time.png", "memory.png", "scaling.png"):
        png = (folder / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # the report is a pure function of the JSON
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    assert report.markdown(data["meta"], records) == markdown


def test_quick_runs_go_to_a_git_ignored_folder_and_full_runs_to_results():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run
    finally:
        sys.path.pop(0)
    quick, full = Path(run.parse_args(["--quick"]).out), Path(run.parse_args([]).out)
    assert full == REPO / "benchmarks" / "results"
    probe = quick / "cpu-2026-01-01-quick" / "results.json"
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        raise AssertionError("the repository must be a git work tree to check what git ignores")
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(probe)])
    assert ignored.returncode == 0, f"{probe} is not ignored by git"
    assert subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(full / "x.json")]).returncode == 1


def test_scaling_measurements_past_the_cap_are_recorded_as_oom_without_running():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import impls
        import run
    finally:
        sys.path.pop(0)
    (shape,) = run.scaling_shapes(16384, 32, (262144,))
    vqp = next(i for i in impls.IMPLS if i.op == "scaling" and i.name == "vqp-layer-eval")
    never = impls.Impl(vqp.name, vqp.op, vqp.role, setup=None, dtypes=vqp.dtypes, nk_bytes=vqp.nk_bytes)
    settings = run.Settings(torch.device("cpu"), 0.0, 1.0, 1, 1, False, mem_limit=1 << 50, threads=1)
    record = run.run_one(never, shape, torch.float32, settings, {})
    assert record["status"] == "oom" and record["median_ms"] is None
    assert record["reason"].startswith("not run: needs about 97") and record["reason"].endswith("limit 8.0 GiB")
