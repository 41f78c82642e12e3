"""The ibq benchmark slice: both rows time the same training step (fastvq.IBQ and SEED-Voken's dense
formula give the same outputs, loss and gradients on the same codebook and tokens), the GPU matrix aims
at 8x IBQ's per-GPU batch (8192 tokens, K up to 262,144, D = 256), where the dense formula's N x K tables
need most of an H100, and the GPU check's bench-ibq slot selects the rows."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_plan
        import impls
        import run

        yield impls, run, gpu_plan
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _rows(impls, shape):
    """{name: the training-step callable} of the ibq rows that run on CPU, set up for `shape`."""
    rows = [i for i in impls.IMPLS if i.op == "ibq" and not i.why_not(torch.device("cpu"))]
    return {i.name: i.setup(shape, torch.float32, torch.device("cpu")) for i in rows}


def test_fastvq_and_the_dense_formula_time_the_same_step(bench):
    """One step of each row on the same tokens: the layers' outputs, losses and gradients (to the
    tokens and to the codebook) agree, so the slice compares like with like."""
    impls, _, _ = bench
    shape = impls.Shape("odd-ibq", 37, 203, 11, ops=("ibq",))
    results = {}
    for name, step in _rows(impls, shape).items():
        layer = step.args[0]
        (x, grad), *_ = impls.make_inputs("ibq", shape, torch.float32, torch.device("cpu"), 1)
        quantized, indices, loss = layer(x)
        torch.autograd.backward([quantized, loss], [grad, None])
        results[name] = (quantized.detach(), indices, loss.detach(), x.grad, layer.embedding.weight.grad)
    assert {"fastvq-ibq[torch]", "seed-voken-ibq"} <= results.keys()
    expected = results.pop("seed-voken-ibq")
    for name, actual in results.items():
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5, msg=f"{name} output")
        assert torch.equal(actual[1], expected[1]), f"{name} indices"
        for what, a, e in zip(("loss", "token grad", "codebook grad"), actual[2:], expected[2:]):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=f"{name} {what}")


def test_a_training_step_moves_the_codebook(bench):
    impls, _, _ = bench
    shape = impls.Shape("tiny-ibq", 16, 64, 8, ops=("ibq",))
    for name, step in _rows(impls, shape).items():
        layer = step.args[0]
        before = layer.embedding.weight.detach().clone()
        assert torch.equal(before, impls.initial_codebook(shape, torch.device("cpu"))), name
        step(*impls.make_inputs("ibq", shape, torch.float32, torch.device("cpu"), 1)[0])
        assert not torch.equal(layer.embedding.weight.detach(), before), f"{name}: Adam did not step"


def test_gpu_shapes_aim_at_8x_ibq_batch_where_the_dense_formula_fills_an_h100(bench):
    impls, run, gpu_plan = bench
    shapes = {s.name: s for s in run.SHAPES["cuda"] if "ibq" in s.ops}
    assert {(s.n, s.k, s.d) for s in shapes.values()} == {(8192, k, 256) for k in (16384, 65536, 262144)}
    assert all(s.default and torch.bfloat16 in s.dtypes for s in shapes.values())
    dense = next(i for i in impls.IMPLS if i.name == "seed-voken-ibq")
    h100 = 80 << 30  # the dense formula needs most of an H100 at K = 262,144 (and runs out of memory on less)
    assert 0.75 * h100 < impls.estimate_bytes(dense, shapes["ibq-256k"], torch.float32, 1)
    assert impls.estimate_bytes(dense, shapes["ibq-16k"], torch.float32, 1) < h100 // 8
    fastvq_rows = [i for i in impls.IMPLS if i.op == "ibq" and i.role == "fastvq"]
    assert all(impls.estimate_bytes(i, shapes["ibq-256k"], torch.bfloat16, 1) < 2 << 30 for i in fastvq_rows)

    stage = gpu_plan.stage("bench-ibq")
    assert stage.options["only"] == "ibq"
    planned = run.plan("cuda", list(shapes.values()), stage.options["only"], ceilings=False)
    names = {impl.name for impl, _, _ in planned}
    assert names == {"fastvq-ibq[triton]", "fastvq-ibq[cuda]", "fastvq-ibq[cpu]", "fastvq-ibq[torch]", "seed-voken-ibq"}
    assert {(s.name, d) for i, s, d in planned if i.name == "seed-voken-ibq"} == {
        (name, torch.float32) for name in shapes
    }


def test_the_cpu_and_quick_matrices_have_ibq_shapes(bench):
    _, run, _ = bench
    cpu = [s for s in run.SHAPES["cpu"] if "ibq" in s.ops]
    assert sorted(s.k for s in cpu) == [16384, 65536, 262144] and all(s.dtypes == (torch.float32,) for s in cpu)
    assert [s.name for s in run.SHAPES["quick"] if "ibq" in s.ops] == ["tiny-ibq"]
    assert run.parse_args(["--only", "ibq"]).only == "ibq"
