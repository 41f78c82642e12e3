"""What the GPU check brings back: one archive of its work folder and one short summary, written atomically.

The output folder holds at most four files, none in a sub-folder: summary.md, check.tar.gz and, only
while one of them is being written or if the check is killed right then, its .partial twin. The
archive holds the work folder `check/`: env.json, driver.log, logs/<stage>.log, smoke/ and smoke-cuda/
(one JSON line per check), bench/ (records.jsonl, results.json, results.md, plots), tests/ (junit
files), summary.md and summary.json. Every stage's detail line is read back from those files, so a
stage cut short by a kill is summarised from what it wrote before.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHIVE = "check.tar.gz"
SUMMARY = "summary.md"
MAX_ARCHIVE_BYTES = 15 << 20
"""Under the device tool's 16 MiB per file; a larger archive is packed again without the plots."""
OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
TEST_LINE = re.compile(
    rf"^(tests/\S+?::.+?) ({OUTCOMES})(?: +\[ *\d+%\])? *$"
    rf"|(?:^|\] )({OUTCOMES}) (tests/\S+?::.+?)(?: - .*| *)$"
)
"""A test's outcome line: `nodeid OUTCOME [ nn%]` (pytest -v) or `[gw0] [ nn%] OUTCOME nodeid` (-v with
xdist) or `OUTCOME nodeid - message` (the -rfE summary). Parametrised ids may hold spaces."""
SHOWN = 8
"""Failures listed per stage in the summary (the archive has them all)."""


@dataclass
class Outcome:
    """How a stage ended: status ok | failed | stopped | skipped | running | not reached."""

    status: str = "not reached"
    took_s: float = 0.0
    limit_s: float = 0.0
    detail: str = ""


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a kill is left out."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def smoke_results(folder: Path) -> tuple[str, list[str], list[str]]:
    """(detail line, failures, missed goals) of a smoke stage from its smoke*.jsonl files."""
    records = [r for path in sorted(folder.glob("smoke*.jsonl")) for r in read_jsonl(path)]
    failed = [r for r in records if not r.get("ok")]
    missed = [r for r in records if r.get("goal", "met") != "met"]

    def name(r):
        return f"{r.get('op')} D={r.get('D')} {r.get('dtype')} {r.get('metric', '')}".rstrip()

    detail = f"{len(records)} checks: {len(records) - len(failed)} ok, {len(failed)} failed"
    detail += f", {len(missed)} missed a performance goal" if missed else ""
    return (detail, [f"{name(r)}: {r.get('detail')}" for r in failed], [f"{name(r)}: {r['goal']}" for r in missed])


def bench_results(records: list[dict]) -> tuple[str, list[str]]:
    """(detail line, errors) of a benchmark slice's records."""
    counts = {}
    for r in records:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    detail = (
        f"{len(records)} measurements"
        + (": " if counts else "")
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda item: str(item[0])))
    )
    errors = [
        f"{r.get('impl')} {r.get('shape')} {r.get('dtype')}: {r.get('reason')}"
        for r in records
        if r.get("status") == "error"
    ]
    return detail, errors


def test_results(log: Path) -> tuple[str, list[str]]:
    """(detail line, failed tests) from a pytest log's outcome lines (the last outcome of a test wins)."""
    outcomes = {}
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            match = TEST_LINE.search(line)
            if match:
                node, outcome = (match[1], match[2]) if match[1] else (match[4], match[3])
                outcomes[node] = outcome
    counts = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    detail = (
        f"{len(outcomes)} tests"
        + (": " if counts else "")
        + ", ".join(f"{n} {outcome.lower()}" for outcome, n in sorted(counts.items()))
    )
    return detail, [f"{node} {outcome}" for node, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]


def last_line(path: Path) -> str:
    """The last non-empty line of a log (or '')."""
    if not path.exists():
        return ""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def env_line(facts: dict) -> str:
    """The environment in one line: python3, Python.h, cores, GPU, versions, commit."""
    if not facts:
        return "not read (the env stage did not finish)"
    gpu = facts.get("gpu") if isinstance(facts.get("gpu"), dict) else {}
    versions = facts.get("versions") if isinstance(facts.get("versions"), dict) else {}
    header = (
        "Python.h present"
        if facts.get("python_h_present")
        else f"**Python.h MISSING** at {facts.get('python_h')} (both C++ extension builds need it)"
    )
    return (
        f"python3 {facts.get('python')}, {header}, {facts.get('cores')} cores, "
        f"GPU {gpu.get('name') or gpu.get('reason', '?')}, torch {versions.get('torch')}, "
        f"triton {versions.get('triton')}, nvcc {' '.join(facts.get('nvcc') or []) or 'none'}, "
        f"vector-quantize-pytorch {versions.get('vector-quantize-pytorch')}"
    )


def summary_markdown(
    head: dict, rows: list[dict], failures: dict[str, list[str]], missed: list[str], retry: str
) -> str:
    """The short summary: header, environment, one row per stage, failures, missed goals, the retry command."""
    lines = [
        f"# GPU check {head['mode']}: {head['device']}, {head['date']}, commit {head['commit'] or 'unknown'}",
        "",
        f"Budget {head['budget_s']:.0f} s, ran {head['ran_s']:.0f} s"
        + (f" ({head['ended']})" if head.get("ended") else "")
        + ".",
        "",
        f"Environment: {head['env']}",
        "",
        "| stage | status | took s | limit s | H100 estimate s | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['status']} | {row['took_s']:.0f} | {row['limit_s']:.0f} | "
            f"{row['estimate']} | {row['detail'].replace('|', '/')} |"
        )
    if any(failures.values()):
        lines += ["", "## Failures (the archive has every record and log)", ""]
        for name, items in failures.items():
            lines += [f"- {name}: {item}" for item in items[:SHOWN]]
            lines += [f"- {name}: ... {len(items) - SHOWN} more"] if len(items) > SHOWN else []
    lines += ["", "## Missed performance goals (reported, not failures)", ""]
    lines += [f"- {item}" for item in missed] or ["- none in the smoke checks"]
    lines += ["- benchmark goals: check/bench/results.md (its goal columns)"]
    lines += [
        "",
        "## Retry",
        "",
        retry,
        "",
        f"Everything else: `tar xzf {ARCHIVE}` (the folder check/; benchmarks: check/bench/).",
    ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def pack(work: Path, out: Path) -> str:
    """Archive `work` as out/check.tar.gz, atomically; '' or a note (plots left out to stay under the limit)."""
    partial = out / (ARCHIVE + ".partial")
    note = ""
    for skip_plots in (False, True):
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(
                work, arcname=work.name, filter=lambda info: None if skip_plots and info.name.endswith(".png") else info
            )
        if partial.stat().st_size <= MAX_ARCHIVE_BYTES:
            break
        note = "plots left out of the archive (over 15 MiB with them)"
    os.replace(partial, out / ARCHIVE)
    return note


def summary_json(head: dict, outcomes: dict[str, Outcome]) -> str:
    return json.dumps(dict(head, stages={name: asdict(o) for name, o in outcomes.items()}), indent=1) + "\n"
