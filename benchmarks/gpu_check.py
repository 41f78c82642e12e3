"""The one prepared command for a lent GPU: run the plan (benchmarks/gpu_plan.py) inside a time budget
and bring back what finished, whatever happens. Started by benchmarks/gpu_check.sh:

    bash benchmarks/gpu_check.sh OUT [BUDGET_S] [--retry] [--stages a,b] [--commit HASH] [--dry-run]

Each stage runs as its own process group with a time limit (its cap, or what is left of the budget
less a reserve for ending): at the limit it gets SIGTERM, writes what it finished, and after a grace
period SIGKILL. Stages stream their records into the work folder; after every stage, and every
PACK_EVERY_S while one runs, the work folder is packed into OUT/check.tar.gz and the summary is written
to OUT/summary.md (gpu_report.py). SIGTERM to the check ends the running stages the same way, writes
the summary and the archive, and exits 143. Exit 0: every stage ran to its end (or was skipped for a
stated reason); 1: a stage failed, was stopped or never ran.

--dry-run runs every stage's CPU stand-in (Triton's interpreter, run.py --quick, a few CPU tests).
The commit is taken from --commit, FASTVQ_COMMIT or git (.git does not travel to the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gpu_plan
import gpu_report
from gpu_plan import Stage
from gpu_report import Outcome

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 15
"""From SIGTERM to SIGKILL: a stopped stage writes its reports in this time."""
RESERVE_S = GRACE_S + 5
"""Kept at the end of the budget for the last stage's ending and the final packing."""
MIN_STAGE_S = 10
PACK_EVERY_S = 20
QUIET_WAIT_S = 20
"""How long a timing stage lets the background compiles finish before ending them."""
SKIP = 3
"""Exit status of a stage's process that cannot run here (gpu_tasks.SKIP)."""


@dataclass
class Job:
    """A stage's processes: `commands` run at most `parallel` at a time, each logging to its own file."""

    stage: Stage
    commands: list[list[str]]
    logs: list[Path]
    env: dict
    parallel: int
    started: float
    limit: float
    mark: int = 0  # benchmark records before the slice
    procs: list[subprocess.Popen] = field(default_factory=list)
    term_at: float | None = None
    why: str = ""
    done: bool = False

    def launch(self) -> None:
        """Start the next commands while fewer than `parallel` run (none once the job is being ended)."""
        while (
            self.term_at is None
            and len(self.procs) < len(self.commands)
            and sum(p.poll() is None for p in self.procs) < self.parallel
        ):
            with open(self.logs[len(self.procs)], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        self.commands[len(self.procs)],
                        cwd=REPO,
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        process_group=0,
                    )
                )

    def running(self) -> bool:
        self.launch()
        return any(p.poll() is None for p in self.procs) or (
            self.term_at is None and len(self.procs) < len(self.commands)
        )


class Check:
    """One run of the plan: its stages' outcomes, the background jobs, the environment's facts, the stop flag."""

    def __init__(self, args: argparse.Namespace):
        self.out, self.budget, self.dry = Path(args.out), float(args.budget), args.dry_run
        self.root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastvq-gpu-check-"))
        self.work, self.build = self.root / "check", self.root / "build"
        for folder in (self.out, self.work / "logs", self.work / "tests", self.build):
            folder.mkdir(parents=True, exist_ok=True)
        self.mode = "dry run" if self.dry else "retry" if args.retry else "run"
        self.cap_scale = args.cap_scale if args.cap_scale is not None else (10.0 if self.dry else 1.0)
        self.commit = args.commit or os.environ.get("FASTVQ_COMMIT") or _git_commit()
        self.stages = select(
            args.stages.split(",") if args.stages else list(gpu_plan.DEFAULT_RETRY) if args.retry else None
        )
        self.outcomes = {stage.name: Outcome() for stage in self.stages}
        self.background: dict[str, Job] = {}
        self.facts: dict = {}
        self.stop = ""
        self.ended = ""
        self.notes: list[str] = []
        self.start = self.last_pack = time.monotonic()

    # ----------------------------------------------------------------------------------------- running

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self) -> int:
        self.say(
            f"GPU check ({self.mode}): budget {self.budget:.0f} s, work folder {self.root}, commit "
            f"{self.commit or 'unknown'}; stages {', '.join(s.name for s in self.stages)}"
        )
        for stage in self.stages:
            if self.stop:
                break
            self.run_stage(stage)
            self.poll_background()
            self.pack()
        for job in self.background.values():
            if not job.done:
                self.terminate(job, f"by {self.stop}" if self.stop else "when the check ended")
        while not all(self.reap(job) for job in self.background.values()):
            time.sleep(0.2)
        self.ended = f"stopped by {self.stop}" if self.stop else ""
        self.pack()
        print(self.summary()[0], flush=True)  # the end of the output is what the device call's reply shows
        if self.stop:
            return 143
        finished = all(
            self.outcomes[s.name].status != "failed"
            if s.background
            else self.outcomes[s.name].status in ("ok", "skipped")
            and "no time left" not in self.outcomes[s.name].detail
            for s in self.stages
        )
        return 0 if finished else 1

    def run_stage(self, stage: Stage) -> None:
        started = time.monotonic()
        limit = min(stage.cap_s * self.cap_scale, self.left() - RESERVE_S)
        reason = self.skip_reason(stage)
        if not reason and limit < MIN_STAGE_S:
            reason = f"no time left ({max(0, self.left()):.0f} s of the budget)"
        for name in () if reason else stage.needs + stage.after:
            self.wait_for(self.background.get(name), started + limit)
        reason = reason or (f"the check was stopped by {self.stop}" if self.stop else "") or self.unmet_need(stage)
        if reason:
            self.outcomes[stage.name] = Outcome("skipped", detail=reason)
            self.say(f"{stage.name}: skipped, {reason}")
            return
        if stage.quiet:
            self.quiet_gpu(started + limit)
        records = self.work / "bench" / "records.jsonl"
        mark = len(gpu_report.read_jsonl(records)) if stage.kind == "bench" else 0
        commands = self.commands(stage)
        logs = [self.work / "logs" / (stage.name + (f"-{i + 1}" if i else "") + ".log") for i in range(len(commands))]
        job = Job(stage, commands, logs, self.child_env(stage), self.parallel(), started, limit, mark)
        job.launch()
        self.outcomes[stage.name] = Outcome("running", limit_s=limit)
        self.say(
            f"{stage.name}: started ({len(commands)} process{'es' if len(commands) > 1 else ''}, "
            f"{min(job.parallel, len(commands))} at a time, limit {limit:.0f} s)"
        )
        if stage.background:
            self.background[stage.name] = job
            return
        self.wait_for(job, float("inf"))

    def wait_for(self, job: Job | None, deadline: float) -> None:
        """Poll until `job` ends (enforcing its limit and the stop) or `deadline` passes, packing as it goes."""
        while job is not None and not self.reap(job) and time.monotonic() < deadline:
            if self.stop and job.term_at is None:
                self.terminate(job, f"by {self.stop}")
            self.poll_background()
            if time.monotonic() - self.last_pack > PACK_EVERY_S:
                self.pack()
            time.sleep(0.2)

    def reap(self, job: Job) -> bool:
        """Whether the job has ended (its outcome then recorded); ends it past its limit."""
        if job.done:
            return True
        now = time.monotonic()
        if job.running():
            if job.term_at is None and now - job.started > job.limit:
                self.terminate(job, f"at its limit of {job.limit:.0f} s")
            elif job.term_at is not None and now - job.term_at > GRACE_S:
                for p in job.procs:
                    _signal_group(p, signal.SIGKILL)
            return False
        job.done = True
        outcome = self.outcome(job, now)
        self.outcomes[job.stage.name] = outcome
        self.say(f"{job.stage.name}: {outcome.status} after {outcome.took_s:.0f} s: {outcome.detail}")
        return True

    def poll_background(self) -> None:
        for job in self.background.values():
            self.reap(job)

    def terminate(self, job: Job, why: str) -> None:
        job.term_at, job.why = time.monotonic(), why
        for p in job.procs:
            _signal_group(p, signal.SIGTERM)

    def quiet_gpu(self, deadline: float) -> None:
        """Let the background GPU work (the warm-up compiles) end before a timing stage, then end it."""
        for job in self.background.values():
            if job.stage.kind == "warm" and not job.done:
                self.wait_for(job, min(deadline, time.monotonic() + QUIET_WAIT_S))
                if not job.done:
                    self.terminate(job, "when a timing stage began")
                    self.wait_for(job, float("inf"))

    def parallel(self) -> int:
        """Processes of one stage side by side: one per 4 cores (each compiles on one, the GPU work is light)."""
        return max(1, (self.facts.get("cores") or os.cpu_count() or 1) // 4)

    def on_signal(self, signum, frame) -> None:
        self.stop = signal.Signals(signum).name

    # ------------------------------------------------------------------------------------ the stages

    def skip_reason(self, stage: Stage) -> str:
        if self.dry and not stage.dry:
            return "no CPU stand-in in a dry run"
        if stage.kind == "install":
            if not list((REPO / "benchmarks" / "wheels").glob("*.whl")):
                return "no wheels in benchmarks/wheels (make them with benchmarks/fetch_wheels.sh and carry them)"
        if stage.kind == "bench" and not self.has_rows(stage):
            return "no rows in benchmarks/impls.py match this slice yet"
        if stage.kind == "warm" and not self.warm_slices():
            return "no benchmark slice to warm up"
        return ""

    def unmet_need(self, stage: Stage) -> str:
        for name in stage.needs:
            outcome = self.outcomes.get(name)
            if outcome is not None and outcome.status != "ok" and not self.dry:
                return f"needs {name}, which is {outcome.status}: {outcome.detail}"
        return ""

    def cuda_built(self) -> bool:
        return self.outcomes.get("build-cuda", Outcome()).status == "ok"

    def has_rows(self, stage: Stage) -> bool:
        """Whether benchmarks/impls.py has a row this slice selects (unknown before the env stage: yes)."""
        rows = self.facts.get("bench_rows")
        if not isinstance(rows, list):
            return True
        only, wanted, unwanted = (stage.options.get(key) for key in ("only", "impls", "skip"))
        return any(
            (only is None or op == only)
            and all(re.search(p, name) for p in wanted or ())
            and not any(re.search(p, name) for p in unwanted or ())
            for op, name in rows
        )

    def warm_slices(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "bench" and s.options.get("warm") and self.has_rows(s)]

    def bench_args(self, stage: Stage) -> list[str]:
        args = ["--quick", "--device", "cpu", "--threads", "1"] if self.dry else ["--device", "cuda"]
        args += ["--only", stage.options["only"]] if stage.options.get("only") else []
        for pattern in stage.options.get("impls", ()):
            args += ["--impls", pattern]
        skip = list(stage.options.get("skip", ()))
        skip += [r"fastvq-cpu|\[cpu\]"] if self.dry else []  # as on the GPU: the C++ CPU kernels are not built
        skip += ["cuda"] if "build-cuda" in stage.after and not self.cuda_built() and not self.dry else []
        for pattern in skip:
            args += ["--skip-impls", pattern]
        return args

    def commands(self, stage: Stage) -> list[list[str]]:
        """The argv of each process of the stage (several run side by side)."""
        python, bench = sys.executable, str(REPO / "benchmarks")
        if stage.kind == "install":
            return [
                [
                    python,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--upgrade",
                    "--target",
                    str(self.build / "site"),
                    *map(str, sorted((REPO / "benchmarks" / "wheels").glob("*.whl"))),
                ]
            ]
        if stage.kind == "env":
            return [[python, f"{bench}/gpu_tasks.py", "env", str(self.work / "env.json")]]
        if stage.kind == "build":
            return [[python, f"{bench}/gpu_tasks.py", "build-cuda"]]
        if stage.kind == "warm":  # a dry run has nothing to compile (no Triton rows on CPU): one slice shows the way
            return [
                [python, f"{bench}/run.py", "--compile-only", *self.bench_args(s), "--impls", "triton|flash-kmeans"]
                for s in self.warm_slices()[: 1 if self.dry else None]
            ]
        if stage.kind == "smoke":
            shards = min(stage.options["shards"], self.parallel())
            return [
                [
                    python,
                    f"{bench}/gpu_smoke.py",
                    str(self.work / stage.name),
                    "--backend",
                    stage.options["backend"],
                    "--shard",
                    f"{i}/{shards}",
                    *(["--device", "cpu"] if self.dry else []),
                ]
                for i in range(1, shards + 1)
            ]
        if stage.kind == "bench":
            return [[python, f"{bench}/run.py", "--results-dir", str(self.work / "bench"), *self.bench_args(stage)]]
        if stage.kind == "tests":
            return [self.pytest_argv(stage)]
        raise ValueError(f"stage {stage.name}: unknown kind {stage.kind!r}")

    def pytest_argv(self, stage: Stage) -> list[str]:
        files = stage.options["dry_files" if self.dry else "files"]
        select = stage.options["dry_select" if self.dry else "select"]
        if "build-cuda" in stage.after and not self.cuda_built() and not self.dry:  # and a killed build's lock
            select = f"({select}) and not cuda-cuda and not two_to_the_31[cuda]"
        versions = self.facts.get("versions") if isinstance(self.facts.get("versions"), dict) else {}
        workers = min(8, (self.facts.get("cores") or 2) - 2)
        return [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "gpu_pytest",
            "-p",
            "no:cacheprovider",
            "-v",
            "-rfE",
            "--durations=15",
            f"--junitxml={self.work / 'tests' / stage.name}.xml",
            *(["-n", str(workers)] if versions.get("pytest-xdist") and workers > 1 else []),
            *(["--timeout=180"] if versions.get("pytest-timeout") else []),
            *files,
            "-k",
            select,
        ]

    def child_env(self, stage: Stage) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVQ_BACKEND")}
        paths = [str(REPO), str(REPO / "benchmarks"), str(self.build / "site")]
        env.update(
            PYTHONUNBUFFERED="1",
            FASTVQ_COMMIT=self.commit or "",
            PYTHONPATH=os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            PATH=os.pathsep.join([str(self.build / "site" / "bin"), os.environ.get("PATH", "")]),
            TORCH_EXTENSIONS_DIR=str(self.build / "torch_extensions"),  # fresh: no stale lock from elsewhere
            FASTVQ_CACHE_DIR=str(self.build / "fastvq"),
            MAX_JOBS=str(max(1, (self.facts.get("cores") or os.cpu_count() or 2) - 2)),
        )
        if self.dry and stage.kind == "smoke":
            env["TRITON_INTERPRET"] = "1"
        return env

    def outcome(self, job: Job, now: float) -> Outcome:
        codes = [p.returncode for p in job.procs]
        detail = self.stage_detail(job)
        if job.stage.kind == "env":
            self.facts = _load_json(self.work / "env.json")
        if job.why:
            status, detail = "stopped", f"stopped {job.why}; {detail}"
        elif all(code == SKIP for code in codes):
            status = "skipped"
        elif all(code == 0 for code in codes):
            status = "ok"
        else:
            status, detail = "failed", f"exit {max(codes, key=abs)}; {detail}"
        return Outcome(status, now - job.started, job.limit, detail)

    def stage_detail(self, job: Job) -> str:
        stage = job.stage
        if stage.kind == "env":
            return gpu_report.env_line(_load_json(self.work / "env.json"))
        if stage.kind == "smoke":
            return gpu_report.smoke_results(self.work / stage.name)[0]
        if stage.kind == "bench":
            return gpu_report.bench_results(gpu_report.read_jsonl(self.work / "bench" / "records.jsonl")[job.mark :])[0]
        if stage.kind == "tests":
            return gpu_report.test_results(job.logs[0])[0]
        if stage.kind == "warm":
            compiled = sum(log.read_text(errors="replace").count("  compiled ") for log in job.logs if log.exists())
            return f"{compiled} (implementation, shape, dtype) warmed by {len(job.procs)} of {len(job.logs)} slices"
        if stage.kind == "install" and job.procs[0].returncode == 0:
            return "installed " + ", ".join(Path(argv).name for argv in job.commands[0] if argv.endswith(".whl"))
        return gpu_report.last_line(job.logs[0])

    # ------------------------------------------------------------------------------- bringing it back

    def summary_path(self) -> Path:
        return self.out / gpu_report.SUMMARY

    def pack(self) -> None:
        """Write the summary (into the archive and OUT) and the archive; a failure leaves the last ones."""
        self.last_pack = time.monotonic()
        try:
            text, data = self.summary()
            gpu_report.write_atomic(self.work / gpu_report.SUMMARY, text)
            gpu_report.write_atomic(self.work / "summary.json", data)
            note = gpu_report.pack(self.work, self.out)
            if note and note not in self.notes:
                self.notes.append(note)
            gpu_report.write_atomic(self.summary_path(), text)
        except Exception as err:  # a file changing under tar: the next pack takes it
            self.say(f"packing failed ({type(err).__name__}: {err}); the previous archive stays")

    def summary(self) -> tuple[str, str]:
        failures, missed = {}, []
        for stage in self.stages:
            if stage.kind == "smoke":
                _, failures[stage.name], stage_missed = gpu_report.smoke_results(self.work / stage.name)
                missed += [f"{stage.name}: {item}" for item in stage_missed]
            elif stage.kind == "tests":
                failures[stage.name] = gpu_report.test_results(self.work / "logs" / f"{stage.name}.log")[1]
        records = gpu_report.read_jsonl(self.work / "bench" / "records.jsonl")
        failures["bench"] = gpu_report.bench_results(records)[1]
        gpu = self.facts.get("gpu")
        head = dict(
            mode=self.mode,
            device=(gpu.get("name") or "no GPU") if isinstance(gpu, dict) else "unknown",
            date=time.strftime("%Y-%m-%d", time.gmtime()),
            commit=self.commit,
            budget_s=self.budget,
            ran_s=time.monotonic() - self.start,
            ended="; ".join(filter(None, [self.ended, *self.notes])),
            env=gpu_report.env_line(self.facts),
        )
        rows = [
            dict(
                name=s.name + (" (background)" if s.background else ""),
                estimate=f"{s.estimate_s[0]}-{s.estimate_s[1]}",
                **vars(self.outcomes[s.name]),
            )
            for s in self.stages
        ]
        return (
            gpu_report.summary_markdown(head, rows, failures, missed, self.retry_hint()),
            gpu_report.summary_json(head, self.outcomes),
        )

    def retry_hint(self) -> str:
        unfinished = [
            s.name
            for s in self.stages
            if not s.background
            and s.kind not in ("install", "env")
            and (
                self.outcomes[s.name].status in ("stopped", "running")
                or self.outcomes[s.name].status == "not reached"
                and not self.skip_reason(s)
                or "no time left" in self.outcomes[s.name].detail
            )
        ]
        if not unfinished:
            return "Every stage ran to its end: nothing to retry."
        return (
            f"Stages that did not finish: {', '.join(unfinished)}. A second try in the same lease "
            f"(docs/gpu-check.md): `FASTVQ_COMMIT={self.commit or 'HASH'} bash benchmarks/gpu_check.sh $OUT "
            f"B --retry --stages {','.join(unfinished)}` with B = min(240, budget_left_s - 150) and "
            "timeout_s B + 50, if budget_left_s >= 270"
        )

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        with open(self.work / "driver.log", "a") as log:
            log.write(line + "\n")


def select(names: list[str] | None) -> list[Stage]:
    """The stages to run in the plan's order: the named ones (all without names) with install and env
    first and the background stages they use."""
    if names is None:
        return list(gpu_plan.PLAN)
    wanted = {gpu_plan.stage(name).name for name in names} | {"install", "env"}
    chosen = [s for s in gpu_plan.PLAN if s.name in wanted]
    wanted |= {need for s in chosen for need in s.needs + s.after}
    if any(s.kind == "bench" and s.options.get("warm") for s in chosen):
        wanted.add("warm")
    return [s for s in gpu_plan.PLAN if s.name in wanted]


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder: summary.md and check.tar.gz (what the device tool brings back)")
    parser.add_argument("budget", nargs="?", type=float, default=450.0, help="seconds the whole check may take")
    parser.add_argument(
        "--retry",
        action="store_true",
        help=f"a second try: {', '.join(gpu_plan.DEFAULT_RETRY)}, "
        "or the --stages named (the summary of the first try names the unfinished ones)",
    )
    parser.add_argument(
        "--stages",
        help="comma-separated stage names to run (install, env and the background stages they use are added)",
    )
    parser.add_argument("--commit", help="the commit checked (default: FASTVQ_COMMIT, else git)")
    parser.add_argument("--dry-run", action="store_true", help="every stage's CPU stand-in (tiny, on CPU)")
    parser.add_argument("--work", help="work folder (default: a fresh folder under the temporary directory)")
    parser.add_argument("--cap-scale", type=float, help="multiply every stage's cap (default 1; 10 in a dry run)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        check = Check(args)
    except ValueError as err:  # an unknown stage name
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, check.on_signal)
    signal.signal(signal.SIGINT, check.on_signal)
    return check.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
