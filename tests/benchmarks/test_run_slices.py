"""benchmarks/run.py as the GPU check runs it: slices filtered by implementation name, several slices
into one results folder, a compile-only warm-up, and SIGTERM during an in-process measurement (the
CUDA path, forced on CPU) still writing the reports."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


@pytest.fixture
def run_module():
    """benchmarks/run.py imported, with this process's SIGTERM handler put back afterwards (main sets its own)."""
    handler = signal.getsignal(signal.SIGTERM)
    sys.path.insert(0, str(BENCH))
    try:
        import run

        yield run
    finally:
        sys.path.remove(str(BENCH))
        signal.signal(signal.SIGTERM, handler)


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVQ_BACKEND")}


def test_plan_keeps_only_the_implementations_the_filters_select(run_module):
    shapes = run_module.select_shapes("quick", None)
    everything = run_module.plan("quick", shapes, "search")
    names = {impl.name for impl, _, _ in everything}
    assert {"peak-mm[ieee]", "dense-mm[bf16]", "fastvq-triton[fp16]", "naive"} <= names
    chosen = run_module.plan("quick", shapes, "search", wanted=["triton"], unwanted=["fp16|tf32"])
    assert {impl.name for impl, _, _ in chosen} == {"fastvq-triton[ieee]", "fastvq-triton[bf16]"}
    assert len(chosen) == 2  # the one quick search shape has fp32 inputs only
    both = run_module.plan("quick", shapes, "search", wanted=["fastvq", r"\[(ieee|bf16)\]"])
    assert {impl.name for impl, _, _ in both} == {
        "fastvq-triton[ieee]",
        "fastvq-triton[bf16]",
        "fastvq-cuda[ieee]",
        "fastvq-cuda[bf16]",
    }
    assert not [t for t in run_module.plan("quick", shapes, "search", ceilings=False) if t[0].op == "ceiling"]


def test_slices_add_up_in_one_results_folder_with_the_ceilings_measured_once(run_module, tmp_path):
    folder = tmp_path / "bench"
    common = ["--quick", "--device", "cpu", "--in-process", "--threads", "1", "--results-dir", str(folder)]
    run_module.main(common + ["--only", "head", "--impls", "torch"])
    first = json.loads((folder / "results.json").read_text())
    run_module.main(common + ["--only", "head", "--skip-impls", "torch"])
    data = json.loads((folder / "results.json").read_text())

    records = data["records"]
    lines = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert records == lines and records[: len(first["records"])] == first["records"]
    assert [r["impl"] for r in records if r["op"] == "head"] == [
        "fastvq-head[torch]",
        "fastvq-head[triton]",
        "linear+cross_entropy",
    ]
    assert not [r for r in first["records"] if r["op"] == "ceiling"], "--impls torch selects no ceiling"
    assert sorted(r["impl"] for r in records if r["op"] == "ceiling") == [
        "copy",
        "peak-mm[bf16]",
        "peak-mm[ieee]",
        "peak-mm[tf32]",
    ]
    assert [s["measurements"] for s in data["meta"]["slices"]] == [1, 6]
    markdown = (folder / "results.md").read_text()
    assert markdown.count("`python benchmarks/run.py ") == 2 and "--skip-impls torch" in markdown
    assert "| tiny-head | 512, 2048, 32 | float32 |" in markdown


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_next_slice_starts_a_new_line(run_module, tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "records.jsonl").write_text('{"op": "head", "impl": "cut')  # a kill in the middle of a write
    run_module.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--in-process",
            "--threads",
            "1",
            "--results-dir",
            str(folder),
            "--only",
            "head",
            "--impls",
            "linear",
        ]
    )
    lines = (folder / "records.jsonl").read_text().splitlines()
    assert (
        lines[0] == '{"op": "head", "impl": "cut'
        and [json.loads(line)["impl"] for line in lines[1:]][-1] == "linear+cross_entropy"
    )
    assert [r["impl"] for r in json.loads((folder / "results.json").read_text())["records"]][
        -1
    ] == "linear+cross_entropy"


def test_compile_only_calls_each_implementation_once_and_writes_nothing(run_module, tmp_path, capsys):
    assert (
        run_module.main(
            [
                "--quick",
                "--device",
                "cpu",
                "--compile-only",
                "--only",
                "head",
                "--out",
                str(tmp_path),
                "--impls",
                "torch|linear",
            ]
        )
        is None
    )
    printed = capsys.readouterr().out
    assert printed.count("  compiled ") == 2 and "compiled fastvq-head[torch] tiny-head float32 in" in printed
    assert ": ok" in printed and not list(tmp_path.iterdir())


SLOW_RUN = """
import sys, time
sys.path.insert(0, {bench!r})
import impls, run

def sleeps(shape, dtype, device):
    def call(x, codebook):
        print("measuring the slow implementation", flush=True)
        time.sleep(120)
    return call

impls.IMPLS.append(impls.Impl("slow-sleep", "search", "alternative", sleeps))
run.main(["--quick", "--device", "cpu", "--in-process", "--threads", "1", "--only", "search",
          "--impls", "^naive$|slow-sleep", "--results-dir", {out!r}])
"""


@pytest.mark.slow
def test_sigterm_during_an_in_process_measurement_stops_the_run_and_writes_the_reports(tmp_path):
    """On CUDA a measurement runs in the benchmark's own process, inside `except Exception`: the stop must
    pass through it (not be recorded as one failed measurement while the run goes on)."""
    folder = tmp_path / "bench"
    script = tmp_path / "slow_run.py"
    script.write_text(textwrap.dedent(SLOW_RUN.format(bench=str(BENCH), out=str(folder))))
    process = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    for line in process.stdout:
        output.append(line)
        if "measuring the slow implementation" in line:
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output += process.stdout.readlines()
    process.wait(timeout=60)
    text = "".join(output)
    assert process.returncode == 0, text
    assert time.monotonic() - sent < 45, "the run went on after SIGTERM"
    data = json.loads((folder / "results.json").read_text())
    assert data["meta"]["stopped"] == "stopped after 1 of 2 measurements (_Stopped)"
    assert [(r["impl"], r["status"]) for r in data["records"]] == [("naive", "ok")]
    assert "stopped after 1 of 2 measurements" in (folder / "results.md").read_text()
    assert (folder / "time.png").read_bytes().startswith(b"\x89PNG")
    assert [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()] == data["records"]


def test_the_stop_exception_is_not_an_exception_that_measure_records(run_module):
    """measure() turns every Exception into a record and goes on; the stop must get through it."""
    assert not issubclass(run_module._Stopped, Exception)
    impl = run_module.impls.Impl("stops", "search", "alternative", setup=lambda *a: run_module._stop(15, None))
    settings = run_module.Settings(torch.device("cpu"), 0.0, 1.0, 1, 1, True, 1 << 30, 1, in_process=True)
    shape = run_module.select_shapes("quick", None)[0]
    with pytest.raises(run_module._Stopped):
        run_module.measure(impl, shape, torch.float32, 1, settings)
