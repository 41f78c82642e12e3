"""The prepared GPU command dry-runs on CPU: every stage of the plan runs its CPU stand-in (Triton under the
interpreter, tiny shapes), and what comes back fits the device tool's limits (at most 8 files, at most
2 folders down, plain names): the summary and one archive holding every stage's records, also when the
check is killed half-way through its budget."""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_plan  # noqa: E402  (benchmarks/ is not a package)

sys.path.remove(str(REPO / "benchmarks"))
SMOKE_OPS = {
    "nearest_code",
    "topk_codes",
    "sample_code",
    "code_cross_entropy",
    "code_stats",
    "code_stats_searched",
    "code_stats_collapsed",
}


def _start(out: Path, work: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVQ_BACKEND")}
    env["PYTHON"] = sys.executable  # the image's python3 there; this environment's python here
    return subprocess.Popen(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), *args, "--dry-run", "--work", str(work)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _brought_back(out: Path, unpacked: Path) -> dict:
    """Check OUT as the device tool would bring it back; unpack the archive; the summary's stage outcomes."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and sorted(p.name for p in files) == ["check.tar.gz", "summary.md"], files
    assert all(len(p.relative_to(out).parts) <= 3 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    with tarfile.open(out / "check.tar.gz") as archive:
        archive.extractall(unpacked, filter="data")
    check = unpacked / "check"
    assert (check / "summary.md").read_text() == (out / "summary.md").read_text()
    return json.loads((check / "summary.json").read_text())["stages"]


def _bench_records(check: Path) -> list[dict]:
    lines = [json.loads(line) for line in (check / "bench" / "records.jsonl").read_text().splitlines()]
    assert json.loads((check / "bench" / "results.json").read_text())["records"] == lines
    return lines


def _assert_finished_stages_kept_their_records(stages: dict, check: Path) -> None:
    """Every stage that ran to its end has its records in the archive."""
    for stage in gpu_plan.PLAN:
        if stages[stage.name]["status"] != "ok":
            continue
        if stage.kind == "env":
            assert json.loads((check / "env.json").read_text())["python"]
        elif stage.kind == "smoke":
            smoke = [json.loads(line) for line in (check / stage.name / "smoke.jsonl").read_text().splitlines()]
            assert {r["op"] for r in smoke} == SMOKE_OPS and {r["D"] for r in smoke} == {8, 64, 256}
            assert all(r["ok"] for r in smoke), [r for r in smoke if not r["ok"]]
        elif stage.kind == "bench" and "only" in stage.options:
            assert stage.options["only"] in {r["op"] for r in _bench_records(check)}, stage.name
        elif stage.kind == "tests":
            assert " PASSED" in (check / "logs" / f"{stage.name}.log").read_text()
            assert (check / "tests" / f"{stage.name}.xml").exists()


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_and_brings_back_two_files(tmp_path):
    process = _start(tmp_path / "out", tmp_path / "work", "600")
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-5000:]
    stages = _brought_back(tmp_path / "out", tmp_path / "unpacked")
    check = tmp_path / "unpacked" / "check"
    assert list(stages) == [stage.name for stage in gpu_plan.PLAN]
    reasons = {
        "install": "no wheels in benchmarks/wheels",
        "build-cuda": "this torch build",
        "smoke-cuda": "no CPU stand-in",
        "bench-ibq": "no rows",
    }
    for name, outcome in stages.items():
        if outcome["status"] == "skipped":
            assert name in reasons and reasons[name] in outcome["detail"], (name, outcome)
        else:
            assert outcome["status"] == "ok", (name, outcome)
    assert {name for name, o in stages.items() if o["status"] == "ok"} >= {
        "env",
        "warm",
        "smoke",
        "bench-search",
        "bench-search-cuda",
        "bench-train",
        "bench-residual",
        "bench-fsq",
        "bench-simvq",
        "bench-lfq",
        "bench-head",
        "tests-cuda",
        "tests-triton",
        "bench-compile",
    }
    _assert_finished_stages_kept_their_records(stages, check)
    records = _bench_records(check)
    assert {r["op"] for r in records} == {
        "ceiling",
        "matmul",
        "search",
        "train",
        "residual",
        "fsq",
        "simvq",
        "lfq",
        "head",
    }
    assert not [r for r in records if r["status"] == "error"]
    # every bench slice that has rows in impls.py (bench-ibq has none yet)
    assert len(json.loads((check / "bench" / "results.json").read_text())["meta"]["slices"]) == 9
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| smoke | ok |" in summary and "66 checks: 66 ok, 0 failed" in summary
    assert "Every stage ran to its end: nothing to retry." in summary


@pytest.mark.slow
def test_gpu_check_killed_half_way_keeps_the_finished_stages(tmp_path):
    budget = 100
    process = _start(tmp_path / "out", tmp_path / "work", str(budget))
    time.sleep(budget / 2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-5000:]
    stages = _brought_back(tmp_path / "out", tmp_path / "unpacked")
    check = tmp_path / "unpacked" / "check"
    assert stages["env"]["status"] == "ok"
    _assert_finished_stages_kept_their_records(stages, check)
    stopped = [name for name, o in stages.items() if o["status"] == "stopped"]
    assert all("stopped by SIGTERM" in stages[name]["detail"] for name in stopped)
    assert any(o["status"] == "not reached" for o in stages.values())
    if stages["smoke"]["status"] == "stopped":  # cut in the middle: the checks that finished are kept
        assert (check / "smoke" / "smoke.jsonl").read_text().count("\n") == int(
            re.search(r"(\d+) checks", stages["smoke"]["detail"])[1]
        )
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "stopped by SIGTERM" in summary and "--retry --stages " in summary
