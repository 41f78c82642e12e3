"""The GPU check's driver (benchmarks/gpu_check.py) on stand-in stages: limits and the budget, SIGTERM then
SIGKILL, background stages and what needs them, the stage selection, and the pytest plugin of its test
stages (SIGTERM ends a session with its summary; the C++ CPU kernels are not built)."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


@pytest.fixture
def driver(monkeypatch):
    """benchmarks/gpu_check.py with short grace periods; SIGTERM / SIGINT handlers put back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "RESERVE_S", 2)
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 1)
    yield gpu_check
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _stand_ins(driver, monkeypatch, plan, programs):
    """Run `plan` (Stages) with `programs[name]` (python code) as each stage's one process."""
    monkeypatch.setattr(driver.gpu_plan, "PLAN", tuple(plan))
    monkeypatch.setattr(driver.Check, "commands", lambda self, stage: [_python(programs[stage.name])])
    monkeypatch.setattr(driver.Check, "skip_reason", lambda self, stage: "")


def _run(driver, tmp_path, *args):
    check = driver.Check(
        driver.parse_args([str(tmp_path / "out"), *args, "--work", str(tmp_path / "work"), "--commit", "0123abc"])
    )
    return check, check.run()


def _outcomes(tmp_path) -> dict:
    return json.loads((tmp_path / "work" / "check" / "summary.json").read_text())["stages"]


ENV = """
import json
json.dump(dict(python="3.12.3", python_h_present=True, cores=8, bench_rows=[]), open({path!r}, "w"))
print("facts written")
"""


def test_a_stage_past_its_cap_is_stopped_and_the_next_one_runs(driver, monkeypatch, tmp_path):
    Stage = driver.gpu_plan.Stage
    plan = [
        Stage("install", "install", (1, 1), 30, ""),
        Stage("env", "env", (1, 1), 30, ""),
        Stage("slow", "build", (1, 2), 2, "sleeps past its cap"),
        Stage("deaf", "build", (1, 2), 2, "ignores SIGTERM"),
        Stage("after", "build", (1, 2), 30, "runs after them"),
    ]
    programs = dict(
        install="print('nothing to install')",
        env=ENV.format(path=str(tmp_path / "work" / "check" / "env.json")),
        slow="import time; print('started', flush=True); time.sleep(60)",
        deaf="""
                         import signal, time
                         signal.signal(signal.SIGTERM, signal.SIG_IGN)
                         print('deaf', flush=True); time.sleep(60)""",
        after="print('the last stage ran')",
    )
    _stand_ins(driver, monkeypatch, plan, programs)
    check, code = _run(driver, tmp_path, "100", "--cap-scale", "1")
    outcomes = _outcomes(tmp_path)
    assert code == 1
    assert outcomes["slow"]["status"] == "stopped" and outcomes["slow"]["detail"].startswith(
        "stopped at its limit of 2 s; started"
    )
    assert outcomes["deaf"]["status"] == "stopped" and 2 <= outcomes["deaf"]["took_s"] < 10  # SIGKILL after the grace
    assert outcomes["after"] == dict(
        status="ok", took_s=outcomes["after"]["took_s"], limit_s=30, detail="the last stage ran"
    )
    assert check.facts["cores"] == 8 and check.parallel() == 2
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| slow | stopped | 2 | 2 | 1-2 | stopped at its limit of 2 s; started |" in summary
    assert "--retry --stages slow,deaf" in summary and "FASTVQ_COMMIT=0123abc" in summary
    with tarfile.open(tmp_path / "out" / "check.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"check/logs/slow.log", "check/logs/deaf.log", "check/env.json", "check/summary.json"} <= names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["check.tar.gz", "summary.md"]


def test_the_budget_limits_the_stages_and_what_is_left_is_skipped(driver, monkeypatch, tmp_path):
    Stage = driver.gpu_plan.Stage
    plan = [
        Stage("env", "env", (1, 1), 30, ""),
        Stage("long", "build", (1, 2), 600, "sleeps"),
        Stage("later", "build", (1, 2), 30, "never has time"),
    ]
    programs = dict(
        env=ENV.format(path=str(tmp_path / "work" / "check" / "env.json")),
        long="import time; time.sleep(60)",
        later="print('ran')",
    )
    _stand_ins(driver, monkeypatch, plan, programs)
    _, code = _run(driver, tmp_path, "8")
    outcomes = _outcomes(tmp_path)
    assert code == 1 and outcomes["long"]["status"] == "stopped" and outcomes["long"]["limit_s"] < 6
    assert outcomes["later"]["status"] == "skipped" and outcomes["later"]["detail"].startswith("no time left")
    assert "--retry --stages long,later" in (tmp_path / "out" / "summary.md").read_text()


def test_a_failed_background_build_skips_what_needs_it(driver, monkeypatch, tmp_path):
    Stage = driver.gpu_plan.Stage
    bench, tests = driver.gpu_plan.stage("bench-train"), driver.gpu_plan.stage("tests-triton")
    plan = [
        Stage("env", "env", (1, 1), 30, ""),
        Stage("build-cuda", "build", (1, 2), 30, "", background=True),
        Stage("independent", "build", (1, 2), 30, ""),
        Stage("needs-it", "build", (1, 2), 30, "", needs=("build-cuda",)),
        Stage("runs-after-it", "build", (1, 2), 30, "", after=("build-cuda",)),
    ]
    programs = {
        "env": ENV.format(path=str(tmp_path / "work" / "check" / "env.json")),
        "build-cuda": "import time, sys; time.sleep(2); print('build failed: nvcc error'); sys.exit(1)",
        "independent": "print('ran beside the build')",
        "needs-it": "print('never')",
        "runs-after-it": "print('ran without the CUDA rows')",
    }
    _stand_ins(driver, monkeypatch, plan, programs)
    check, code = _run(driver, tmp_path, "60")
    outcomes = _outcomes(tmp_path)
    assert code == 1 and outcomes["build-cuda"]["status"] == "failed"
    assert outcomes["independent"]["status"] == "ok" and outcomes["independent"]["took_s"] < 2
    assert outcomes["needs-it"] == dict(
        status="skipped",
        took_s=0.0,
        limit_s=0.0,
        detail="needs build-cuda, which is failed: exit 1; build failed: nvcc error",
    )
    assert outcomes["runs-after-it"]["status"] == "ok"
    args = check.bench_args(bench)
    assert args[args.index("--skip-impls") + 1] == "cuda"
    assert check.pytest_argv(tests)[-1].endswith(") and not cuda-cuda and not two_to_the_31[cuda]")


def test_the_selection_adds_install_env_and_the_background_stages_used(driver):
    assert [s.name for s in driver.select(["bench-train"])] == ["install", "env", "build-cuda", "warm", "bench-train"]
    assert [s.name for s in driver.select(list(driver.gpu_plan.DEFAULT_RETRY))] == [
        "install",
        "env",
        "warm",
        "smoke",
        "bench-search",
    ]
    assert [s.name for s in driver.select(["tests-cuda"])] == ["install", "env", "build-cuda", "tests-cuda"]
    with pytest.raises(ValueError, match="no stage 'bench-nothing' in the plan; it has install, env"):
        driver.select(["bench-nothing"])


def test_a_slice_runs_only_once_impls_has_rows_for_it(driver, tmp_path):
    check = driver.Check(driver.parse_args([str(tmp_path / "out"), "--work", str(tmp_path / "work")]))
    lfq, search = driver.gpu_plan.stage("bench-lfq"), driver.gpu_plan.stage("bench-search")
    assert check.has_rows(lfq), "before the env stage the rows are unknown: run it"
    check.facts = dict(bench_rows=[["search", "fastvq-triton[ieee]"], ["train", "fastvq-layer[triton]"]])
    assert not check.has_rows(lfq) and check.skip_reason(lfq) == "no rows in benchmarks/impls.py match this slice yet"
    assert check.has_rows(search)
    check.facts["bench_rows"].append(["train", "fastvq-LFQ[triton]"])
    assert check.has_rows(lfq) and check.skip_reason(lfq) == ""
    check.facts["bench_rows"] = [["search", "fastvq-cuda[ieee]"]]
    assert not check.has_rows(search), "bench-search leaves the CUDA rows to bench-search-cuda"


def test_the_commands_are_the_image_s_python_with_the_plan_s_filters(driver, tmp_path):
    check = driver.Check(driver.parse_args([str(tmp_path / "out"), "--work", str(tmp_path / "work")]))
    check.facts = dict(cores=16, versions={"pytest-xdist": "3.8", "pytest-timeout": "2.4"})
    (search,) = check.commands(driver.gpu_plan.stage("bench-search"))
    assert search[:2] == [sys.executable, str(BENCH / "run.py")] and search[search.index("--device") + 1] == "cuda"
    assert search.count("--skip-impls") == 2 and r"compile\(" in search
    smoke = check.commands(driver.gpu_plan.stage("smoke"))
    assert [argv[argv.index("--shard") + 1] for argv in smoke] == ["1/4", "2/4", "3/4", "4/4"]
    tests = check.pytest_argv(driver.gpu_plan.stage("tests-cuda"))
    assert tests[tests.index("-n") + 1] == "8" and "--timeout=180" in tests and tests[-1] == "cuda-cuda"
    assert tests[tests.index("-p") + 1] == "gpu_pytest"
    env = check.child_env(driver.gpu_plan.stage("build-cuda"))
    assert env["MAX_JOBS"] == "14" and env["TORCH_EXTENSIONS_DIR"].startswith(str(tmp_path / "work"))
    assert "TRITON_INTERPRET" not in env and env["PYTHONUNBUFFERED"] == "1"


PLUGGED = """
import time
import torch
import fastvq
from fastvq.ops.backend import unavailable_reason


def test_the_cpu_kernels_are_reported_unavailable_without_a_build():
    assert "cpu" not in fastvq.available_backends("cpu")
    assert "not built in the GPU check" in unavailable_reason("cpu", torch.device("cpu"))


def test_sleeps():
    print("sleeping", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_the_test_stages_plugin_ends_on_sigterm_with_a_summary_and_builds_no_cpu_kernels(tmp_path):
    (tmp_path / "test_plugged.py").write_text(PLUGGED)
    extensions = tmp_path / "extensions"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVQ_BACKEND")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH)]), TORCH_EXTENSIONS_DIR=str(extensions), PYTHONUNBUFFERED="1"
    )
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "gpu_pytest",
        "-p",
        "no:cacheprovider",
        "-v",
        "-s",
        f"--junitxml={tmp_path / 'junit.xml'}",
        str(tmp_path / "test_plugged.py"),
    ]
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "sleeping" in line:
            break
    process.send_signal(signal.SIGTERM)
    output = "".join(output) + process.communicate(timeout=60)[0]
    assert process.returncode == 2, output  # pytest's "interrupted"
    assert "test_the_cpu_kernels_are_reported_unavailable_without_a_build PASSED" in output
    assert "KeyboardInterrupt" in output and "1 passed" in output
    assert "testcase" in (tmp_path / "junit.xml").read_text()
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
