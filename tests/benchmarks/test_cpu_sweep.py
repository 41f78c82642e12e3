"""benchmarks/cpu_sweep.py on a tiny grid: both dtypes, idle and with its busy thread; the JSON holds
every point with positive, finite times and ratios and the PNG is an image; --committed reruns
run.py's CPU search shapes."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from fastvq.ops.backend import unavailable_reason

REPO = Path(__file__).resolve().parents[2]
UNAVAILABLE = unavailable_reason("cpu", "cpu")
pytest.importorskip("faiss", reason="the sweep compares with faiss-cpu")
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE or "")


@pytest.fixture
def cpu_sweep():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cpu_sweep

        yield cpu_sweep
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_tiny_sweep_writes_positive_finite_ratios_and_heat_maps(cpu_sweep, tmp_path):
    threads, faiss_threads = torch.get_num_threads(), cpu_sweep.impls.faiss.omp_get_max_threads()
    try:
        out_dir = cpu_sweep.main(
            ["--n", "33,7", "--d", "4,9", "--k", "40", "--repeats", "3", "--threads", "1", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
        cpu_sweep.impls.faiss.omp_set_num_threads(faiss_threads)
    result = json.loads((out_dir / "sweep.json").read_text())
    points = result["points"]
    assert {(p["load"], p["dtype"], p["n"], p["d"]) for p in points} == {
        (load, dtype, n, d)
        for load in ("idle", "busy")
        for dtype in ("float32", "bfloat16")
        for n in (33, 7)
        for d in (4, 9)
    }
    for point in points:
        assert point["k"] == 40 and 3 <= len(point["fastvq_ms"]) == len(point["faiss_ms"])
        assert 0 < point["ratio"] < math.inf and 0 < point["fastvq_median_ms"] < math.inf
        assert point["ratio"] == pytest.approx(point["faiss_median_ms"] / point["fastvq_median_ms"])
    assert result["meta"]["threads"] == 1 and result["meta"]["faiss"]
    assert (out_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_shapes_are_the_cpu_search_rows(cpu_sweep):
    import run

    args = cpu_sweep.parse_args(["--committed"])
    assert cpu_sweep.shapes(args) == [(s.n, s.d, s.k) for s in run.SHAPES["cpu"] if "search" in s.ops and s.default]
    assert len(cpu_sweep.shapes(args)) >= 4
