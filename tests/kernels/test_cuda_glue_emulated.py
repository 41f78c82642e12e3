"""The torch glue of the CUDA backend (kernels/torch_glue.cpp: checks, scratch allocation, argument
wiring to the launchers) built as a CPU torch extension over the emulated kernels
(tests/tools/cuda_emulator/), with its one CUDA-tensor check removed, and called on CPU tensors."""

import pytest
import torch
from host_build import CXX, REPO
from vq_checks import check_nearest

from fastvq.ops import chunked
from fastvq.ops.backend import unavailable_reason
from fastvq.ops.common import METRICS, PRECISIONS, code_bias

DEVICE_CHECK = 'TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");'


def _ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CXX is None or not _ninja_available(), reason="needs a host C++ compiler and ninja (pip install ninja)"
    ),
]


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    from torch.utils import cpp_extension

    folder = tmp_path_factory.mktemp("glue")
    source = (REPO / "kernels" / "torch_glue.cpp").read_text()
    assert source.count(DEVICE_CHECK) == 1, "the glue's device check changed: update this test"
    (folder / "torch_glue_cpu.cpp").write_text(source.replace(DEVICE_CHECK, "(void)name;"))
    return cpp_extension.load(
        name="fastvq_glue_emulated",
        sources=[
            str(folder / "torch_glue_cpu.cpp"),
            str(REPO / "tests" / "tools" / "cuda_emulator" / "emulated_kernels.cpp"),
        ],
        extra_include_paths=[str(REPO / "tests" / "tools" / "cuda_emulator"), str(REPO / "kernels")],
        extra_cflags=["-O1", "-Wno-unknown-pragmas"],
        build_directory=str(folder),
        verbose=False,
    )


@pytest.mark.parametrize(
    "heads,code_heads,n,k,d,dtype,metric,precision,topk",
    [
        (2, 1, 37, 259, 33, torch.float32, "l2", "ieee", 1),
        (2, 2, 20, 130, 8, torch.bfloat16, "cosine", "bf16", 5),
        (1, 1, 9, 40, 70, torch.float16, "l2", "fp16", 16),
        (2, 1, 15, 50, 6, torch.float32, "dot", "tf32", 3),
    ],
)
def test_search_through_the_glue(glue, heads, code_heads, n, k, d, dtype, metric, precision, topk):
    x = torch.randn(heads, n, 2 * d).to(dtype)[..., ::2]
    codebook = torch.randn(code_heads, k, d).to(dtype)
    bias = code_bias(codebook, metric, precision)
    want = chunked.topk_codes(x, codebook, topk, metric=metric, precision=precision)
    for target_blocks in (1, 64):
        indices, distances = glue.search(
            x, codebook, bias, METRICS.index(metric), PRECISIONS.index(precision), topk, target_blocks, 0
        )
        assert indices.shape == distances.shape == (heads, n, topk)
        check_nearest(x, codebook, indices[..., 0], distances[..., 0], metric, precision)
        assert (indices == want[0]).float().mean() > 0.97
        torch.testing.assert_close(distances[indices == want[0]], want[1][indices == want[0]], rtol=1e-5, atol=1e-4)


def test_code_stats_through_the_glue(glue):
    """The glue's sort, scratch and three launches: integer rows give the torch backend's exact sums;
    random rows with runs over one chunk (and a collapsed head) give the Triton backend's bits."""
    import importlib

    x = torch.randint(-8, 9, (2, 9000, 40)).float()
    indices = torch.randint(-1, 300, (2, 9000))
    mask = torch.rand(2, 9000) > 0.3
    for m in (None, mask):
        counts, sums = glue.code_stats(x, indices, m, 300, 0)
        want_counts, want_sums = chunked.code_stats(x, indices, 300, mask=m)
        assert torch.equal(counts, want_counts) and torch.equal(sums, want_sums)
    reason = unavailable_reason("triton", "cpu")
    if reason:
        pytest.skip(reason)
    triton_code_stats = importlib.import_module("fastvq.ops.triton.code_stats")
    x = torch.randn(2, 1000, 2 * 9)[..., ::2].bfloat16()
    indices = torch.where(torch.rand(2, 1000) < 0.8, 3, torch.randint(-1, 50, (2, 1000)))  # code 3: ~560 kept
    indices[1] = 7  # every token of head 1 on one code
    got = glue.code_stats(x, indices, mask[:, :1000], 50, 0)
    want = triton_code_stats.code_stats(x, indices, 50, mask=mask[:, :1000])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][0, 3] > triton_code_stats.CHUNK and got[0][1, 7] > 2 * triton_code_stats.CHUNK


def test_glue_rejects_mismatched_shapes(glue):
    x = torch.randn(1, 5, 4)
    with pytest.raises(RuntimeError, match=r"shapes do not match"):
        glue.search(x, torch.randn(1, 6, 3), torch.zeros(1, 6), False, 0, 1, 1, 0)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, min\(16, K\)\]"):
        glue.search(x, torch.randn(1, 6, 4), torch.zeros(1, 6), False, 0, 7, 1, 0)


@pytest.fixture
def emulated_cuda_backend(glue, monkeypatch, fresh_backends):
    """backend="cuda" on CPU tensors: the public ops, the dispatch, the launchers of fastvq/ops/cuda and
    the glue run as written; only the extension (the emulated build), the record's devices and reason,
    the device guard, the stream and the SM count are stand-ins."""
    import contextlib
    import dataclasses
    import importlib

    registry = fresh_backends.REGISTRY
    monkeypatch.setitem(
        registry, "cuda", dataclasses.replace(registry["cuda"], devices=None, why_not=lambda device, build: "")
    )
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for name in ("nearest_code", "code_stats"):
        launcher = importlib.import_module(f"fastvq.ops.cuda.{name}")
        monkeypatch.setattr(launcher, "load_extension", lambda: glue)
        monkeypatch.setattr(launcher, "current_stream", lambda device: 0)
    monkeypatch.setattr(importlib.import_module("fastvq.ops.cuda.nearest_code"), "target_programs", lambda device: 16)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_public_ops_on_the_cuda_backend(emulated_cuda_backend, metric):
    """The public ops with backend="cuda" (2-D and 3-D x, shared and per-head codebooks, strided
    and mixed-dtype inputs, no tokens) give the torch backend's answers."""
    import fastvq

    x = torch.randn(3, 41, 2 * 19)[..., ::2]
    for codebook in (torch.randn(77, 19), torch.randn(3, 77, 19).bfloat16()):
        got, want = (fastvq.nearest_code(x, codebook, metric=metric, backend=b) for b in ("cuda", "torch"))
        assert (got[0] == want[0]).float().mean() > 0.97
        torch.testing.assert_close(got[1][got[0] == want[0]], want[1][got[0] == want[0]], rtol=1e-5, atol=1e-5)
        got, want = (fastvq.topk_codes(x, codebook, 4, metric=metric, backend=b) for b in ("cuda", "torch"))
        assert got[0].shape == want[0].shape == (3, 41, 4) and (got[0] == want[0]).float().mean() > 0.97
    indices, distances = fastvq.nearest_code(x[0], torch.randn(77, 19).double(), metric=metric, backend="cuda")
    assert indices.shape == distances.shape == (41,)
    assert fastvq.nearest_code(torch.randn(0, 19), torch.randn(5, 19), backend="cuda")[0].shape == (0,)
    counts, sums = fastvq.code_stats(x, indices.expand(3, -1), 77, backend="cuda")
    want_counts, want_sums = fastvq.code_stats(x, indices.expand(3, -1), 77, backend="torch")
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)


def test_vector_quantize_training_step_on_the_cuda_backend(emulated_cuda_backend):
    """One VectorQuantize training step (search, EMA statistics, straight-through and codebook
    gradients) with backend="cuda" matches the same step on the torch backend."""
    import fastvq

    results = []
    for backend in ("cuda", "torch"):
        torch.manual_seed(0)
        layer = fastvq.VectorQuantize(dim=12, codebook_size=70, decay=0.8, backend=backend).train()
        x = torch.randn(2, 50, 12, requires_grad=True)
        quantized, indices, loss = layer(x)
        (quantized.square().sum() + loss).backward()
        results.append((indices, quantized.detach(), x.grad, layer.codebook.detach().clone()))
    (indices, quantized, grad, codebook), (want_indices, want_quantized, want_grad, want_codebook) = results
    assert torch.equal(indices, want_indices)
    for got, want in ((quantized, want_quantized), (grad, want_grad), (codebook, want_codebook)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_compile_keeps_the_cuda_ops_in_one_graph(emulated_cuda_backend):
    """fullgraph=True: the backend choice (run once while tracing) and the custom ops trace."""
    import fastvq

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x, codebook):
        quantized, indices, distances = fastvq.quantize(x, codebook, backend="cuda")
        counts, sums = fastvq.code_stats(x.detach(), indices, codebook.shape[0], backend="cuda", check_indices=False)
        return (quantized - x).pow(2).mean() + distances.mean(), counts, sums

    x = torch.randn(20, 8, requires_grad=True)
    codebook = torch.randn(12, 8, requires_grad=True)
    loss, counts, sums = step(x, codebook)
    loss.backward()
    assert counts.sum() == 20 and x.grad is not None and codebook.grad is not None
    want = fastvq.quantize(x, codebook, backend="torch")
    torch.testing.assert_close(loss, (want[0] - x).pow(2).mean() + want[2].mean())
