"""The prepared GPU command dry-runs on CPU: every phase runs (Triton under the interpreter, tiny
shapes), writes its output folder and reports its outcome."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVQ_BACKEND")}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["1-env", "2-smoke", "3-bench-search", "4-tests"]
    assert all(": exit 0 " in line for line in summary[1:]), summary
    smoke = [json.loads(line) for line in (tmp_path / "2-smoke" / "smoke.jsonl").read_text().splitlines()]
    ops = {r["op"] for r in smoke}
    assert ops == {"nearest_code", "topk_codes", "sample_code", "code_cross_entropy", "code_stats",
                   "code_stats_searched", "code_stats_collapsed"}
    assert all(r["ok"] for r in smoke) and {r["D"] for r in smoke} == {8, 64, 256}
    (bench,) = (tmp_path / "3-bench").iterdir()
    records = [json.loads(line) for line in (bench / "records.jsonl").read_text().splitlines()]
    assert records and json.loads((bench / "results.json").read_text())["records"] == records
