"""pytest-benchmark suite for the CPU ops and the layer's training step: the effect of a change is one
`--benchmark-compare` away. Not part of the default test run (pytest collects tests/ only):

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-autosave          # before the change
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-compare            # after: against the last save
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-compare --benchmark-compare-fail=median:10%

Shapes are small enough for the whole suite to take about a minute on 2 cores; each benchmark is
grouped by op and shape, so `--benchmark-group-by=group` tables put the backends side by side.
Times depend on what else runs on the machine: compare runs made under the same load.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastvq

SEARCH_SHAPES = [(16384, 4096, 8), (16384, 1024, 64), (2048, 4096, 256)]  # N, K, D
TRAIN_SHAPES = [(8192, 1024, 64), (16384, 4096, 8)]
ROUNDS = 5


def _shape_id(shape):
    return "N{}-K{}-D{}".format(*shape)


def _run(benchmark, group, fn, **info):
    benchmark.group = group
    benchmark.extra_info.update(threads=torch.get_num_threads(), **info)
    return benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)


@pytest.fixture
def inputs(request):
    n, k, d = request.param
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=generator), torch.randn(k, d, generator=generator)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inputs", SEARCH_SHAPES, ids=_shape_id, indirect=True)
def test_nearest_code(benchmark, inputs, dtype, backend):
    x, codebook = (t.to(dtype) for t in inputs)
    indices, _ = _run(
        benchmark,
        f"nearest_code {_shape_id((len(x), len(codebook), x.shape[1]))} {dtype}",
        lambda: fastvq.nearest_code(x, codebook, backend=backend),
        dtype=str(dtype),
    )
    assert (indices >= 0).all()


@pytest.mark.parametrize("inputs", SEARCH_SHAPES[:2], ids=_shape_id, indirect=True)
def test_topk_codes(benchmark, inputs, backend="cpu"):  # the reference's top-k takes 2-12 s a call here
    x, codebook = inputs
    indices, _ = _run(
        benchmark,
        f"topk_codes k=4 {_shape_id((len(x), len(codebook), x.shape[1]))}",
        lambda: fastvq.topk_codes(x, codebook, 4, backend=backend),
    )
    assert (indices >= 0).all()


@pytest.mark.parametrize("inputs", SEARCH_SHAPES[:2], ids=_shape_id, indirect=True)
def test_code_stats(benchmark, inputs):
    x, codebook = inputs
    indices = torch.randint(0, len(codebook), (len(x),), generator=torch.Generator().manual_seed(1))
    counts, _ = _run(
        benchmark,
        f"code_stats {_shape_id((len(x), len(codebook), x.shape[1]))}",
        lambda: fastvq.code_stats(x, indices, len(codebook), check_indices=False),
    )
    assert counts.sum() == len(x)


def _train_step(layer, x, grad):
    quantized, _, loss = layer(x)
    torch.autograd.backward([quantized, loss], [grad, None])


def _layers():
    layers = [pytest.param(lambda d, k: fastvq.VectorQuantize(dim=d, codebook_size=k, decay=0.8), id="fastvq")]
    if importlib.util.find_spec("vector_quantize_pytorch") is not None:
        from vector_quantize_pytorch import VectorQuantize

        layers.append(
            pytest.param(lambda d, k: VectorQuantize(dim=d, codebook_size=k, decay=0.8), id="vector-quantize-pytorch")
        )
    return layers


@pytest.mark.parametrize("make_layer", _layers())
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=_shape_id)
def test_vector_quantize_train_step(benchmark, shape, make_layer):
    """Forward + backward of one EMA VectorQuantize step on x (1, N, D), codebook updated in forward."""
    n, k, d = shape
    torch.manual_seed(0)
    layer = make_layer(d, k).train()
    x = torch.randn(1, n, d, requires_grad=True)
    grad = torch.randn(1, n, d)
    _run(benchmark, f"train step {_shape_id(shape)}", lambda: _train_step(layer, x, grad))
    assert x.grad is not None and torch.isfinite(x.grad).all()
