"""Mutation testing of C, C++ and CUDA sources: plant one small bug at a time, rebuild, rerun chosen tests.

mutmut mutates Python only; this tool does the same for the native kernels (docs/mutation.md).

    python tests/tools/native_mutants.py list kernels/vq_tile.cuh            # every mutant, one a line
    python tests/tools/native_mutants.py show 'kernels/vq_tile.cuh:41:17:<-><='
    python tests/tools/native_mutants.py run --results runs/cuda.json --sample 40 --seed 1 \
        --timeout 300 kernels/nearest_code.cu kernels/vq_tile.cuh -- tests/kernels/test_cuda_emulated.py
    python tests/tools/native_mutants.py summary runs/cuda.json

Mutants: the classic operators (relational swaps < <= > >= == !=, arithmetic + - * / swaps, && ||,
! removed, unary minus removed, integer constants c -> c + 1 with 0 <-> 1, compound assignments
+= -= *= /=, min <-> max), one per (line, column, operator), outside comments, string and character
literals and preprocessor lines. A mutant's id is `path:line:column:old->new`, stable while the file
is unchanged. Template brackets and pointer stars are left alone where a simple look at the tokens
around them tells (a mutant that still does not compile is recorded as such and not counted).

Run: the files under test are never edited in place. Each mutant is written into one copy of the
repository's tracked files (`--workdir`), whose `fastvq` package and `kernels/` the tests then import
and build (PYTHONPATH points at the copy; kernel_sources_dir() and tests/tools/host_build.REPO follow
the package), with its own build caches (FASTVQ_CACHE_DIR, TORCH_EXTENSIONS_DIR), kept between mutants:
ninja rebuilds what a mutated file (or the restored original) changed, headers included (depfiles), and
pytest's temporary folder, where the emulator is built, is emptied before each run. The pytest selection
runs with a timeout; the outcome (killed, survived, timeout, no-compile) goes into a JSON file, rewritten
atomically after every mutant, from which an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PUNCTUATORS = sorted(
    (
        "<<= >>= -> ++ -- << >> <= >= == != && || += -= *= /= %= &= |= ^= :: "
        "( ) [ ] { } < > + - * / % ! ~ & | ^ = ? : ; , ."
    ).split(),
    key=len,
    reverse=True,
)
SWAPS = {
    "<": "<=",
    "<=": "<",
    ">": ">=",
    ">=": ">",
    "==": "!=",
    "!=": "==",
    "+": "-",
    "-": "+",
    "*": "/",
    "/": "*",
    "&&": "||",
    "||": "&&",
    "+=": "-=",
    "-=": "+=",
    "*=": "/=",
    "/=": "*=",
}
MIN_MAX = {"min": "max", "max": "min", "fminf": "fmaxf", "fmaxf": "fminf", "fmin": "fmax", "fmax": "fmin"}
TYPE_WORDS = set(
    "void bool char short int long float double unsigned signed const auto size_t half bfloat16 "
    "__half __nv_bfloat16 T scalar_t".split()
)
"""Identifiers after which `*` declares a pointer rather than multiplies (with every name ending in _t)."""
TOKEN = re.compile(r"(?P<name>[A-Za-z_]\w*)|(?P<number>(?:\d|\.\d)[\w.']*(?:[eEpP][+-]\d+\w*)?)|(?P<space>\s+)")
INTEGER = re.compile(r"(0[xX][0-9a-fA-F]+|\d+)([uUlL]*)$")


@dataclass(frozen=True)
class Token:
    text: str
    offset: int
    kind: str  # "name", "number" or "punct"


@dataclass(frozen=True)
class Mutant:
    """One planted bug: `path` (relative to the repository) with `old` at `offset` replaced by `new`."""

    path: str
    line: int
    column: int
    offset: int
    old: str
    new: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}:{self.column}:{self.old}->{self.new}"

    def apply(self, source: str) -> str:
        assert source[self.offset : self.offset + len(self.old)] == self.old, f"{self.id}: the source changed"
        return source[: self.offset] + self.new + source[self.offset + len(self.old) :]


def blank_non_code(source: str) -> str:
    """`source` with comments, string and character literals and preprocessor lines replaced by spaces
    (newlines kept, so offsets, lines and columns stay those of `source`)."""
    out = list(source)
    i, n, line_start = 0, len(source), True
    while i < n:
        c = source[i]
        if line_start and c == "#":  # a preprocessor line, with its backslash continuations
            j = i
            while j < n and not (source[j] == "\n" and source[j - 1] != "\\"):
                j += 1
            end = j
        elif source.startswith("//", i):
            end = source.find("\n", i)
            end = n if end < 0 else end
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            end = n if end < 0 else end + 2
        elif c in "\"'":
            end = i + 1
            while end < n and source[end] != c:
                end += 2 if source[end] == "\\" else 1
            end += 1
        else:
            line_start = c == "\n" or (line_start and c in " \t")
            i += 1
            continue
        for j in range(i, min(end, n)):
            if out[j] != "\n":
                out[j] = " "
        i = end
    return "".join(out)


def tokenize(code: str) -> list[Token]:
    """The tokens of blanked code (see `blank_non_code`)."""
    tokens, i = [], 0
    while i < len(code):
        match = TOKEN.match(code, i)
        if match:
            if match.lastgroup != "space":
                tokens.append(Token(match.group(), i, match.lastgroup))
            i = match.end()
            continue
        punct = next((p for p in PUNCTUATORS if code.startswith(p, i)), code[i])
        tokens.append(Token(punct, i, "punct"))
        i += len(punct)
    return tokens


def template_brackets(tokens: list[Token]) -> set[int]:
    """Indices of the `<` `>` (and `>>`) tokens that look like template brackets: `name<` whose match
    closes over type-like tokens only (names, numbers, ::, commas, *, &) and is followed by what
    follows a type or a template call."""
    brackets: set[int] = set()
    for i, token in enumerate(tokens):
        if token.text != "<" or i == 0 or tokens[i - 1].kind != "name":
            continue
        depth, j, inner = 1, i + 1, []
        while j < len(tokens) and depth:
            text = tokens[j].text
            if text == "<":
                depth += 1
            elif text in (">", ">>"):
                depth -= 1 if text == ">" else 2
            elif not (tokens[j].kind in ("name", "number") or text in ("::", ",", "*", "&", "(", ")")):
                break
            inner.append(j)
            j += 1
        following = tokens[j].text if j < len(tokens) else ";"
        if depth <= 0 and (following in ("(", "{", "::", ">", ",", ")", ";", "*", "&") or tokens[j].kind == "name"):
            brackets |= {i, *[k for k in inner if tokens[k].text in ("<", ">", ">>")]}
    return brackets


def is_operand_end(token: Token) -> bool:
    return (
        token.kind == "number"
        or (token.kind == "name" and token.text not in ("return", "case"))
        or token.text in (")", "]")
    )


def mutants_of(path: Path, root: Path = REPO) -> list[Mutant]:
    """Every mutant of the source file `path`, in file order."""
    source = path.read_text()
    tokens = tokenize(blank_non_code(source))
    types = TYPE_WORDS | {t.text for t in tokens if t.kind == "name" and t.text.endswith("_t")}
    templates = template_brackets(tokens)
    found: list[tuple[Token, str]] = []
    for i, token in enumerate(tokens):
        before = tokens[i - 1] if i else Token(";", 0, "punct")
        after = tokens[i + 1] if i + 1 < len(tokens) else Token(";", 0, "punct")
        binary = is_operand_end(before)
        text = token.text
        if token.kind == "number":
            integer = INTEGER.match(text)
            if integer:
                value = int(integer.group(1), 0)
                found.append((token, f"{1 if value == 0 else 0 if value == 1 else value + 1}{integer.group(2)}"))
        elif token.kind == "name" and text in MIN_MAX and after.text == "(":
            found.append((token, MIN_MAX[text]))
        elif text in ("<", ">", "<=", ">=") and i in templates:
            continue
        elif text == "*" and (
            not binary or before.text in types or before.text == ">" or after.text in (")", ",", ">")
        ):
            continue  # a dereference or a pointer type
        elif text == "-" and not binary:
            found.append((token, ""))  # unary minus removed
        elif text == "+" and not binary:
            continue
        elif text in SWAPS:
            found.append((token, SWAPS[text]))
        elif text == "!":
            found.append((token, ""))
    mutants = []
    for token, new in found:
        line = source.count("\n", 0, token.offset) + 1
        column = token.offset - (source.rfind("\n", 0, token.offset) + 1) + 1
        mutants.append(Mutant(str(path.resolve().relative_to(root)), line, column, token.offset, token.text, new))
    return mutants


def diff_line(mutant: Mutant, root: Path = REPO) -> str:
    """The mutated line, before and after."""
    source = (root / mutant.path).read_text()
    start = source.rfind("\n", 0, mutant.offset) + 1
    end = source.find("\n", mutant.offset)
    end = len(source) if end < 0 else end
    mutated = mutant.apply(source)[start : end + len(mutant.new) - len(mutant.old)]
    return f"- {source[start:end].strip()}\n+ {mutated.strip()}"


def wilson_interval(detected: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95 % interval of a proportion detected / total."""
    if total == 0:
        return 0.0, 1.0
    p = detected / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def prepare_copy(workdir: Path) -> Path:
    """A copy of the repository's tracked files under `workdir/repo` (refreshed from the worktree)."""
    copy = workdir / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source, target = REPO / name, copy / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return copy


def run_one(mutant: Mutant | None, copy: Path, workdir: Path, tests: list[str], timeout: float) -> dict:
    """Plant `mutant` (None: the clean code) in the copy, run the tests there, restore the file."""
    shutil.rmtree(workdir / "cache" / "tmp", ignore_errors=True)  # pytest's tmp_path: the emulator's builds
    (workdir / "cache").mkdir(parents=True, exist_ok=True)
    environment = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        FASTVQ_CACHE_DIR=str(workdir / "cache" / "fvq"),
        TORCH_EXTENSIONS_DIR=str(workdir / "cache" / "te"),
    )
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rs"]
    command += ["--basetemp", str(workdir / "cache" / "tmp"), *tests]
    target = copy / mutant.path if mutant else None
    original = target.read_text() if target else ""
    if target:
        target.write_text(mutant.apply(original))
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=copy, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        status = outcome(process.returncode, output.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = "timeout"
    finally:
        if target:
            target.write_text(original)
    tail = output.decode(errors="replace").strip().splitlines()[-3:]
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "tail": tail}


def outcome(returncode: int, output: str) -> str:
    """killed / survived / no-compile from a finished pytest run. no-compile: the C++ CPU search failed
    to build (its tests then skip, with that reason: the run passes -rs), or the first failure is a
    compiler's error (file:line:column: error:) and nothing passed before it; a crash is a kill."""
    if "failed to build" in output:
        return "no-compile"
    if returncode == 0:
        return "survived"
    compiler_error = re.search(r"\S+:\d+:\d+: (?:fatal )?error:|Error building extension", output)
    return "no-compile" if compiler_error and not re.search(r"\b\d+ passed", output) else "killed"


def summarize(results: dict) -> str:
    """Counts, the score (detected = killed + timeout, over those that compiled) and its Wilson interval."""
    statuses = [entry["status"] for entry in results["mutants"].values()]
    counts = {name: statuses.count(name) for name in ("killed", "timeout", "survived", "no-compile")}
    equivalent = sum(1 for entry in results["mutants"].values() if entry.get("equivalent"))
    detected = counts["killed"] + counts["timeout"]
    counted = detected + counts["survived"] - equivalent
    low, high = wilson_interval(detected, counted)
    score = f"{detected}/{counted} = {100 * detected / counted:.1f} %" if counted else "none"
    return f"{counts}, equivalent {equivalent}; score {score} (Wilson 95 %: {100 * low:.1f}-{100 * high:.1f} %)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print every mutant of the files")
    listing.add_argument("files", nargs="+", type=Path)
    show = commands.add_parser("show", help="print a mutant's line before and after")
    show.add_argument("ids", nargs="+")
    summary = commands.add_parser("summary", help="counts and score of a results file")
    summary.add_argument("results", type=Path)
    run = commands.add_parser("run", help="run the mutants of the files against a pytest selection (after --)")
    run.add_argument("files", nargs="+", type=Path)
    run.add_argument("--results", type=Path, required=True)
    run.add_argument("--workdir", type=Path, default=REPO / ".cache" / "native-mutants")
    run.add_argument(
        "--sample", type=int, default=0, help="a uniform random sample of this size, run in random order (0: all)"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    run.add_argument("--id", action="append", dest="ids", help="only this mutant (repeatable)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, tests = parser.parse_args(argv[:split]), argv[split + 1 :]  # pytest's arguments follow --
    if args.command == "list":
        for mutant in (m for path in args.files for m in mutants_of(path)):
            print(mutant.id)
    elif args.command == "show":
        by_id = {m.id: m for path in {i.split(":")[0] for i in args.ids} for m in mutants_of(REPO / path)}
        for mutant_id in args.ids:
            print(mutant_id, diff_line(by_id[mutant_id]), sep="\n")
    elif args.command == "summary":
        print(summarize(json.loads(args.results.read_text())))
    else:
        if not tests:
            parser.error("run: give the pytest selection after --")
        run_mutants(args, tests)


def run_mutants(args: argparse.Namespace, tests: list[str]) -> None:
    """The `run` command: the clean run first (it must pass), then each chosen mutant not yet recorded."""
    everything = [m for path in args.files for m in mutants_of(path)]
    chosen = [m for m in everything if args.ids is None or m.id in args.ids]
    if args.sample and args.ids is None:  # a prefix of one shuffle: a larger sample keeps a smaller one's mutants,
        chosen = chosen[:]  # and the mutants done when a run is cut short are a uniform sample too
        random.Random(args.seed).shuffle(chosen)
        chosen = chosen[: args.sample]
    results = json.loads(args.results.read_text()) if args.results.exists() else {"mutants": {}}
    results["meta"] = {
        "files": {str(p): sum(m.path == str(p.resolve().relative_to(REPO)) for m in everything) for p in args.files},
        "sample": args.sample,
        "seed": args.seed,
        "tests": tests,
        "timeout": args.timeout,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
    }
    args.workdir = args.workdir.resolve()
    copy = prepare_copy(args.workdir)
    if "clean" not in results:
        results["clean"] = run_one(None, copy, args.workdir, tests, args.timeout)
        write_json(args.results, results)
        print("clean:", results["clean"], flush=True)
        if results["clean"]["status"] != "survived":
            sys.exit("the tests fail on the clean code")
    for number, mutant in enumerate(chosen, 1):
        if mutant.id in results["mutants"]:
            continue
        entry = run_one(mutant, copy, args.workdir, tests, args.timeout)
        results["mutants"][mutant.id] = {**asdict(mutant), **entry}
        write_json(args.results, results)
        print(f"[{number}/{len(chosen)}] {entry['status']:10} {entry['seconds']:6.1f}s {mutant.id}", flush=True)
    print(summarize(results))


if __name__ == "__main__":
    main()
