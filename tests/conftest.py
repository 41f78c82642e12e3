"""Test setup: Triton runs on CPU through its interpreter when there is no GPU.

TRITON_INTERPRET must be set before fastvq's Triton kernels are imported (triton decides at
decoration time), so it is set here, before any test module imports fastvq.
"""

import importlib.util
import os
import signal
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastvq import available_backends  # noqa: E402  (after TRITON_INTERPRET)
from fastvq.ops import backend as backend_choice  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
"""The property suites in CI: few examples, the same ones every run (derived from each test's code)."""
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
"""HYPOTHESIS_PROFILE=long: fresh random examples, 80 times as many (docs/testing.md records a run)."""
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

needs_vqp = pytest.mark.skipif(
    importlib.util.find_spec("vector_quantize_pytorch") is None,
    reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]'; the GPU check "
    "installs it from the wheels it carries)",
)
"""Marks a test that compares with, or runs, vector-quantize-pytorch 1.32.0."""

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


REFERENCE_ON_CPU = ("torch", "triton", "cuda")
"""Backends to test for an op that the "cpu" backend runs with the torch backend's (code_stats,
cross-entropy): testing "cpu" there would rerun the "torch" cases."""


def pytest_collection_modifyitems(items):
    """Mark the tests that run Triton code (`-m triton`): the cases of the Triton backend (ids with
    "triton") and the sm_90 / sm_80 compile check. CI runs them under each supported triton."""
    for item in items:
        if "triton" in item.name or item.path.name == "test_gpu_compile.py":
            item.add_marker(pytest.mark.triton)


def backend_cases(backends=("torch", "triton", "cuda", "cpu")):
    """(device, backend) pairs ("cuda", the CUDA C++ backend, only on CUDA tensors; "cpu", the C++
    CPU backend, only on CPU tensors); a pair that cannot run here is a skip with the reason."""
    cases = []
    for device in ["cpu", "cuda"]:
        for backend in backends:
            if (backend == "cpu") != (device == "cpu") and backend in ("cpu", "cuda"):
                continue
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="needs a CUDA GPU (the GPU run of this matrix)"))
            elif backend not in available_backends(device):
                marks.append(
                    pytest.mark.skip(
                        reason=f"{backend} backend unavailable on {device} in this process: "
                        + _unavailable_reason(backend, device)
                    )
                )
            cases.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return cases


def _unavailable_reason(backend: str, device: str) -> str:
    reason = backend_choice.unavailable_reason(backend, device, build=device == "cpu")  # as available_backends
    if backend == "triton" and device == "cpu":
        reason += " (CPU needs TRITON_INTERPRET=1 at start-up; the GPU runs it without)"
    return reason


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def case(**fields):
    """pytest.param of the fields' values, with an id that says the case, e.g.
    N301-K259-D33-H3-shared-bf16-cosine: ints as name + value, bools as the name when true, dtypes
    by short name, strings as they are. Use the field names as the test's argument names."""
    parts = []
    for name, value in fields.items():
        if isinstance(value, bool):
            parts += [name] if value else []
        elif isinstance(value, int):
            parts.append(f"{name}{value}")
        else:
            parts.append(DTYPE_NAMES.get(value, str(value)))
    return pytest.param(*fields.values(), id="-".join(parts))


@pytest.fixture
def fresh_backends(monkeypatch):
    """For a test that sets FASTVQ_BACKEND or swaps a record of `fastvq.ops.backend.REGISTRY` (with
    monkeypatch.setitem): the backend choices are forgotten before and after it, so that none leaks."""
    backend_choice.clear_cache()
    yield backend_choice
    backend_choice.clear_cache()


@pytest.fixture(autouse=True)
def _seed(request):
    """A reproducible seed per test, derived from its id (so inputs differ between tests) and from
    FASTVQ_TEST_SEED (set it to draw fresh inputs everywhere); printed when a test fails."""
    seed = zlib.crc32(f"{os.environ.get('FASTVQ_TEST_SEED', '0')}:{request.node.nodeid}".encode())
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far more steadily on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PEAK_RSS_SOURCE = '''
def peak_rss():
    """Peak resident set of this process since it was started, in bytes: /proc's VmHWM. Not
    ru_maxrss, which keeps across exec the high-water mark of the process it was forked from (a
    pytest that has grown to 1.4 GiB makes every child report at least that)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
'''
"""Source of ``peak_rss()`` for the scripts that memory tests run in a fresh process."""


@pytest.fixture
def sigint_delivered():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal, even when the test run
    inherited SIGINT ignored (a background job of a non-interactive shell)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def default_sigint() -> None:
    """``preexec_fn`` of a child that must be stoppable by SIGINT whatever the test run inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
