"""What the GPU check's summary reads back from its work folder (benchmarks/gpu_report.py), and its packing."""

import json
import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PYTEST_LOG = """\
collecting ... collected 7 items
tests/test_a.py::test_one[cuda-cuda] PASSED                                [ 14%]
tests/test_a.py::test_two[N1-K1-D1-H1-fp32-l2-cuda-cuda] FAILED            [ 28%]
[gw1] [ 42%] PASSED tests/test_b.py::test_three[cuda-triton]
[gw0] [ 57%] SKIPPED tests/test_b.py::test_four
[gw0] [ 71%] ERROR tests/test_b.py::test_five[cuda-triton]
tests/test_b.py::test_six PASSED
tests/test_c.py::test_rejects[args1-ValueError-backend must be one of ('auto', 'torch'), got] PASSED      [ 86%]
=========================== short test summary info ============================
FAILED tests/test_a.py::test_two[N1-K1-D1-H1-fp32-l2-cuda-cuda] - AssertionError: regret
ERROR tests/test_b.py::test_five[cuda-triton] - RuntimeError: CUDA error
"""


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_report

    return gpu_report


def test_test_outcomes_are_read_from_verbose_xdist_and_summary_lines_once_each(report, tmp_path):
    (tmp_path / "tests.log").write_text(PYTEST_LOG)
    detail, failed = report.test_results(tmp_path / "tests.log")
    assert detail == "7 tests: 1 error, 1 failed, 4 passed, 1 skipped"
    assert failed == [
        "tests/test_a.py::test_two[N1-K1-D1-H1-fp32-l2-cuda-cuda] FAILED",
        "tests/test_b.py::test_five[cuda-triton] ERROR",
    ]
    assert report.test_results(tmp_path / "missing.log") == ("0 tests", [])


def test_smoke_and_benchmark_records_are_counted_and_a_cut_line_is_skipped(report, tmp_path):
    records = [
        dict(op="nearest_code", D=8, dtype="float32", metric="l2", ok=True, detail="fine"),
        dict(op="topk_codes", D=8, dtype="bfloat16", metric="cosine", ok=False, detail="agreement 0.5"),
        dict(op="code_stats_collapsed", D=64, dtype="float32", ok=True, detail="", goal="missed: 1.3x"),
    ]
    (tmp_path / "smoke-1of2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    (tmp_path / "smoke-2of2.jsonl").write_text(json.dumps(records[2]) + "\n" + '{"op": "cut sh')
    assert report.smoke_results(tmp_path) == (
        "3 checks: 2 ok, 1 failed, 1 missed a performance goal",
        ["topk_codes D=8 bfloat16 cosine: agreement 0.5"],
        ["code_stats_collapsed D=64 float32: missed: 1.3x"],
    )
    bench = [
        dict(status="ok"),
        dict(status="ok"),
        dict(status="oom"),
        dict(status="error", impl="fastvq-cuda[bf16]", shape="vqvae", dtype="bfloat16", reason="RuntimeError: x"),
    ]
    assert report.bench_results(bench) == (
        "4 measurements: 1 error, 2 ok, 1 oom",
        ["fastvq-cuda[bf16] vqvae bfloat16: RuntimeError: x"],
    )


def test_the_summary_names_every_stage_the_failures_and_the_retry(report):
    head = dict(
        mode="run",
        device="NVIDIA H100 80GB HBM3",
        date="2026-12-07",
        commit="abc123",
        budget_s=450,
        ran_s=431.2,
        ended="",
        env="python3 3.12.3, Python.h present",
    )
    rows = [
        dict(name="env", status="ok", took_s=7.2, limit_s=45, estimate="6-15", detail="python3 3.12.3"),
        dict(
            name="smoke",
            status="stopped",
            took_s=150,
            limit_s=150,
            estimate="35-75",
            detail="stopped at its limit of 150 s; 40 checks: 40 ok, 0 failed",
        ),
    ]
    failures = {"tests-cuda": [f"tests/test_a.py::test_{i} FAILED" for i in range(report.SHOWN + 3)]}
    text = report.summary_markdown(head, rows, failures, ["smoke: code_stats_collapsed D=64: missed: 1.3x"], "RETRY")
    assert text.startswith("# GPU check run: NVIDIA H100 80GB HBM3, 2026-12-07, commit abc123\n")
    assert "| smoke | stopped | 150 | 150 | 35-75 | stopped at its limit of 150 s; 40 checks: 40 ok, 0 failed |" in text
    assert text.count("- tests-cuda: tests/test_a.py") == report.SHOWN and "- tests-cuda: ... 3 more" in text
    assert "- smoke: code_stats_collapsed D=64: missed: 1.3x" in text and "\nRETRY\n" in text


def test_the_archive_replaces_the_last_one_atomically_and_drops_the_plots_past_the_limit(report, monkeypatch, tmp_path):
    work, out = tmp_path / "check", tmp_path / "out"
    (work / "bench").mkdir(parents=True)
    out.mkdir()
    (work / "bench" / "results.md").write_text("tables")
    (work / "bench" / "time.png").write_bytes(os.urandom(1 << 20))  # 1 MiB that gzip cannot shrink
    assert report.pack(work, out) == ""
    monkeypatch.setattr(report, "MAX_ARCHIVE_BYTES", 100_000)
    assert report.pack(work, out) == "plots left out of the archive (over 15 MiB with them)"
    assert sorted(p.name for p in out.iterdir()) == ["check.tar.gz"]
    with tarfile.open(out / "check.tar.gz") as archive:
        assert sorted(archive.getnames()) == ["check", "check/bench", "check/bench/results.md"]
