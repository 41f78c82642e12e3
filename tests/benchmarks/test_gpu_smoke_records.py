"""benchmarks/gpu_smoke.py keeps what it checked: every check guarded, every record written as it
finishes, SIGTERM ending it with a table of what finished, missed goals reported apart from failures."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


@pytest.fixture
def smoke():
    handler = signal.getsignal(signal.SIGTERM)
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_smoke

        yield gpu_smoke
    finally:
        sys.path.remove(str(BENCH))
        signal.signal(signal.SIGTERM, handler)


def test_a_check_that_raises_is_one_failed_record_and_the_next_checks_run(smoke, monkeypatch):
    def fake_checks(group, device, n, k, repeats, backend):
        d, dtype = group
        if d == 33:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield dict(op="first", D=d, dtype="float32"), lambda: dict(ok=True, detail="fine", first_s=0.1, steady_ms=1.0)
        yield dict(op="second", D=d, dtype="float32"), lambda: 1 / 0
        yield dict(op="third", D=d, dtype="float32"), lambda: dict(ok=True, detail="fine")

    monkeypatch.setattr(smoke, "group_checks", fake_checks)
    log, records = io.StringIO(), []
    chosen = [(8, torch.float32), (33, torch.bfloat16), (64, torch.float32)]
    smoke.run_checks(chosen, torch.device("cpu"), 5, 7, 1, "triton", log, records)
    assert [(r["op"], r["D"], r["dtype"], r["ok"]) for r in records] == [
        ("first", 8, "float32", True),
        ("second", 8, "float32", False),
        ("third", 8, "float32", True),
        ("inputs", 33, "bfloat16", False),
        ("first", 64, "float32", True),
        ("second", 64, "float32", False),
        ("third", 64, "float32", True),
    ]
    assert records[1]["detail"] == "ZeroDivisionError: division by zero" and "1 / 0" in records[1]["error"]
    assert records[3]["detail"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert [json.loads(line) for line in log.getvalue().splitlines()] == records


def test_shards_split_the_groups_without_overlap(smoke):
    groups = smoke.groups(torch.device("cpu"))
    assert len(groups) == len(smoke.DIMS) * len(smoke.DTYPES)
    for count in (1, 2, 4):
        parts = [groups[index::count] for index in range(count)]
        assert sorted(map(str, sum(parts, []))) == sorted(map(str, groups))


def test_a_missed_goal_is_reported_and_does_not_fail_the_smoke(smoke, monkeypatch, tmp_path, capsys):
    def fake_run(chosen, device, n, k, repeats, backend, log, records):
        records += [
            dict(
                op="code_stats_collapsed",
                D=64,
                dtype="float32",
                ok=True,
                first_s=0.1,
                steady_ms=2.0,
                detail="deterministic / atomic 1.50x",
                goal="missed: 1.50x the atomic time (goal <= 1.2x)",
            ),
            dict(
                op="nearest_code",
                D=64,
                dtype="float32",
                metric="l2",
                ok=True,
                first_s=0.1,
                steady_ms=1.0,
                detail="regret/bound 0.01",
            ),
        ]

    monkeypatch.setattr(smoke, "run_checks", fake_run)
    monkeypatch.setattr(smoke, "kernel_resources", lambda: [])
    assert smoke.main([str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "[goal missed: 1.50x the atomic time (goal <= 1.2x)]" in printed
    assert "2 passed, 0 failed, 1 missed a performance goal" in printed
    assert json.loads((tmp_path / "kernels.json").read_text()) == []


@pytest.mark.slow
def test_sigterm_keeps_the_records_written_so_far_and_prints_their_table(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "gpu_smoke.py"), str(tmp_path), "--device", "cpu", "--shard", "1/2"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    records = tmp_path / "smoke-1of2.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (records.exists() and records.read_text().count("\n") >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 2, output
    written = [json.loads(line) for line in records.read_text().splitlines()]
    assert 2 <= len(written) < 33 and all(r["ok"] for r in written), output
    assert f"{len(written)} passed, 0 failed, 0 missed a performance goal (stopped before the end)" in output
    assert sum(" ok  " in line for line in output.splitlines()[1:]) == len(written)  # the header, then a row each
    assert (tmp_path / "kernels-1of2.json").exists()
