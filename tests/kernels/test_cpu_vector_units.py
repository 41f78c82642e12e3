"""The C++ CPU search built for the narrower vector units this CPU also runs, held to the checks of the
native build: AVX512 without BF16 (bf16 precision as fp32 FMAs, as on CPUs without AVX512-BF16), AVX2
and DEFAULT (GCC's generic vectors, 2 tokens per register tile), so that machines without this CPU's
vector unit run tested code. Each unit is a separate build (about 30 s, cached like the native one).
"""

import importlib

import pytest
import test_cpu_argmin as argmin_tests  # tests/kernels, this file's folder
from ops import test_nearest_code as nearest_tests  # tests/ops, a namespace package on pytest's path
from ops import test_topk_codes as topk_tests

from fastvq.ops.backend import unavailable_reason
from fastvq.ops.common import METRICS
from fastvq.ops.cpu._extension import load_extension, vector_unit

NARROWER = {"AVX512_BF16": ["AVX512", "AVX2", "DEFAULT"], "AVX512": ["AVX2", "DEFAULT"], "AVX2": ["DEFAULT"]}
"""Vector units a CPU with the key's unit also runs; torch names the plainest one DEFAULT."""

CPU = ("cpu", "cpu")  # (device, backend) of the tests borrowed from test_nearest_code / test_topk_codes
UNAVAILABLE = unavailable_reason("cpu", "cpu")
UNITS = [] if UNAVAILABLE else NARROWER.get(vector_unit(), [])


@pytest.fixture(
    params=UNITS
    or [
        pytest.param(
            None,
            marks=pytest.mark.skip(
                reason=UNAVAILABLE or f"this CPU's vector unit ({vector_unit()}) is the plainest one"
            ),
        )
    ]
)
def unit_build(request, monkeypatch):
    """The `cpu` backend runs the build for `request.param` while the test runs; the list of calls shows it did."""
    build, calls = load_extension(request.param), []
    assert build.__name__.startswith(f"fastvq_cpu_search_{request.param.lower()}_")
    search_module = importlib.import_module("fastvq.ops.cpu.nearest_code")

    def load_unit_build():
        calls.append(request.param)
        return build

    monkeypatch.setattr(search_module, "load_extension", load_unit_build)
    return calls


def test_matches_float64_brute_force(unit_build):
    cases = nearest_tests._brute_force_cases()
    for params in cases[::5]:  # every metric, dtype and head layout, a fifth of the shapes
        nearest_tests.test_matches_float64_brute_force(*CPU, *params.values)
    for params in topk_tests._brute_force_cases()[::3]:
        topk_tests.test_matches_float64_brute_force(*CPU, *params.values)
    assert len(unit_build) >= len(cases) // 5


@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_and_non_finite_rules(unit_build, metric):
    for precision in ("ieee", "bf16"):
        nearest_tests.test_exact_ties_go_to_lowest_index(*CPU, metric, 33, 1100, precision)
    topk_tests.test_exact_ties_go_to_lowest_index(*CPU, metric, 259)
    nearest_tests.test_non_finite_inputs(*CPU, metric)
    nearest_tests.test_equidistant_codes_tie_to_lowest_index(*CPU)
    nearest_tests.test_all_codes_non_finite(*CPU)
    topk_tests.test_non_finite_inputs(*CPU)
    nearest_tests.test_non_contiguous_inputs(*CPU)
    assert unit_build


def test_k1_path(unit_build):
    """The register argmin of k = 1 (test_cpu_argmin.py's checks: ties, non-finite scores, every D)."""
    build = importlib.import_module("fastvq.ops.cpu.nearest_code").load_extension()  # the unit's build
    for check in argmin_tests.CHECKS:
        check(build)
    assert unit_build
