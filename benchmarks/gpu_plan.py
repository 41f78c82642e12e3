"""The GPU check's plan: its stages in the order they run, most valuable first, in one place.

Each stage has the time it is estimated to take on an H100 (low, high; written before any GPU run,
see docs/gpu-check.md for how each was counted) and its cap, the most it may take there: a stage
still running at its cap (or when the budget runs out) gets SIGTERM, writes what it finished, and
the next stage runs. Background stages start and are left running beside the next stages (CPU
builds and compiles on the idle cores); a stage waits for the background stages it `needs` (and is
skipped on the GPU when one failed) or runs `after` (and then leaves out its CUDA C++ rows or tests
when the build failed), and a `quiet` stage (it times the GPU) first lets the background GPU work end.
A dry run (CPU) runs every stage's CPU stand-in; a stage with `dry` false has none and is skipped.

A benchmark slice is a `benchmarks/run.py` run with filters (`only`: the op; `impls` / `skip`:
regexes on the implementation's name); one whose filters match no implementation in
`benchmarks/impls.py` is skipped with a note, so a slice for rows still being written is one line
here and runs once its rows exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """One step of the check. kind: install | env | build | warm | smoke | bench | tests; options:
    what the kind needs (smoke: backend, shards; bench: only, impls, skip, warm; tests: files, select,
    dry_files, dry_select)."""

    name: str
    kind: str
    estimate_s: tuple[int, int]
    cap_s: int
    note: str
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    background: bool = False
    quiet: bool = False
    retry: bool = False
    dry: bool = True
    options: dict = field(default_factory=dict)


OP_TEST_FILES = ("tests/ops/test_nearest_code.py", "tests/ops/test_topk_codes.py", "tests/ops/test_code_stats.py")
LAYER_TEST_FILES = (
    "tests/ops/test_sample_code.py",
    "tests/ops/test_code_cross_entropy.py",
    "tests/ops/test_functional.py",
    "tests/nn/test_layer.py",
    "tests/nn/test_layer_parity.py",
    "tests/nn/test_residual_vq.py",
    "tests/models/test_prior.py",
    "tests/ops/test_memory.py",
)
DRY_TEST_FILES = ("tests/ops/test_code_stats.py",)


def _slice(name: str, estimate_s: tuple[int, int], cap_s: int, note: str, **options) -> Stage:
    """A benchmark slice (always `quiet`); `needs`, `after` and `retry` go to the stage, the rest to run.py."""
    needs, after, retry = options.pop("needs", ()), options.pop("after", ()), options.pop("retry", False)
    return Stage(
        name, "bench", estimate_s, cap_s, note, needs=needs, after=after, quiet=True, retry=retry, options=options
    )


PLAN: tuple[Stage, ...] = (
    Stage(
        "install",
        "install",
        (3, 10),
        60,
        "vector-quantize-pytorch 1.32.0 and flash-kmeans from the carried wheels (benchmarks/wheels)",
    ),
    Stage(
        "env",
        "env",
        (6, 15),
        45,
        "python3, Python.h, cores, GPU, torch/triton/nvcc, commit, benchmark rows",
        retry=True,
    ),
    Stage(
        "build-cuda", "build", (40, 90), 240, "the CUDA C++ extension (nvcc, MAX_JOBS from the cores)", background=True
    ),
    Stage(
        "warm",
        "warm",
        (40, 90),
        150,
        "Triton compiles of the benchmark slices, into the on-disk cache",
        background=True,
    ),
    Stage(
        "smoke",
        "smoke",
        (35, 75),
        150,
        "every op on backend='triton' against the reference, D 8/64/256, "
        "fp32/bf16, l2/cosine, and a VectorQuantize step",
        retry=True,
        options=dict(backend="triton", shards=4),
    ),
    Stage(
        "smoke-cuda",
        "smoke",
        (15, 30),
        90,
        "the same on backend='cuda' (the CUDA C++ kernels' first run)",
        needs=("build-cuda",),
        dry=False,
        options=dict(backend="cuda", shards=1),
    ),
    _slice(
        "bench-search",
        (50, 90),
        150,
        "TUNING.md's search table: ceilings, dense mm, fastvq-triton, alternatives",
        only="search",
        skip=("cuda", r"compile\("),
        warm=True,
        retry=True,
    ),
    _slice(
        "bench-search-cuda",
        (15, 25),
        60,
        "the search rows of backend='cuda'",
        only="search",
        impls=("cuda",),
        needs=("build-cuda",),
    ),
    _slice(
        "bench-train",
        (40, 70),
        120,
        "the training step against vector-quantize-pytorch",
        only="train",
        warm=True,
        after=("build-cuda",),
    ),
    _slice("bench-residual", (10, 25), 60, "the residual quantizer's training step", only="residual", warm=True),
    # the new quantizers' rows: skipped with a note until benchmarks/impls.py has implementations matching
    _slice("bench-lfq", (15, 30), 45, "LFQ rows", impls=("(?i)lfq",), warm=True),
    _slice("bench-fsq", (15, 30), 45, "FSQ rows", impls=("(?i)fsq",), warm=True),
    _slice("bench-ibq", (15, 30), 45, "IBQ's training step against SEED-Voken's formula", only="ibq", warm=True),
    _slice("bench-simvq", (15, 30), 45, "SimVQ rows", impls=("(?i)simvq",), warm=True),
    _slice("bench-head", (5, 15), 45, "a prior's output head over K codes", only="head", warm=True),
    Stage(
        "tests-cuda",
        "tests",
        (20, 45),
        90,
        "the CUDA C++ backend's tests (-k cuda-cuda) on the op files",
        needs=("build-cuda",),
        options=dict(
            files=OP_TEST_FILES,
            select="cuda-cuda",
            dry_files=DRY_TEST_FILES,
            dry_select="cpu-torch and (collapsed or bitwise)",
        ),
    ),
    Stage(
        "tests-triton",
        "tests",
        (40, 120),
        240,
        "Triton on the GPU: -k cuda-triton without the brute-force "
        "matrix (the smoke covers it), the layers on backend='cuda', offsets past 2^31, peak memory",
        after=("build-cuda",),
        options=dict(
            files=OP_TEST_FILES + LAYER_TEST_FILES,
            select="cuda-triton and not matches_float64_brute_force or cuda-cuda and not "
            "(test_nearest_code or test_topk_codes or test_code_stats) or offsets_past or "
            "peak_cuda_memory",
            dry_files=DRY_TEST_FILES,
            dry_select="cpu-triton and collapsed",
        ),
    ),
    _slice(
        "bench-compile",
        (120, 360),
        600,
        "torch.compile baselines (a cold inductor compile each): optional",
        impls=(r"compile\(",),
    ),
)

DEFAULT_RETRY = tuple(stage.name for stage in PLAN if stage.retry)
"""What `--retry` runs when no --stages are named."""


def stage(name: str) -> Stage:
    """The stage called `name`; ValueError naming the plan's stages otherwise."""
    for candidate in PLAN:
        if candidate.name == name:
            return candidate
    raise ValueError(f"no stage {name!r} in the plan; it has {', '.join(s.name for s in PLAN)}")
