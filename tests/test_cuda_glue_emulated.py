"""The torch glue of the CUDA backend (kernels/torch_glue.cpp: checks, scratch allocation, argument
wiring to the launchers) built as a CPU torch extension over the emulated kernels
(tests/cuda_emulator/), with its one CUDA-tensor check removed, and called on CPU tensors."""

import pytest
import torch
from host_build import CXX, REPO
from vq_checks import check_nearest

from fastvq.ops import reference
from fastvq.ops.common import PRECISIONS, code_bias

DEVICE_CHECK = 'TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");'


def _ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CXX is None or not _ninja_available(),
                                 reason="needs a host C++ compiler and ninja (pip install ninja)")]


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    from torch.utils import cpp_extension

    folder = tmp_path_factory.mktemp("glue")
    source = (REPO / "kernels" / "torch_glue.cpp").read_text()
    assert source.count(DEVICE_CHECK) == 1, "the glue's device check changed: update this test"
    (folder / "torch_glue_cpu.cpp").write_text(source.replace(DEVICE_CHECK, "(void)name;"))
    return cpp_extension.load(
        name="fastvq_glue_emulated", sources=[str(folder / "torch_glue_cpu.cpp"),
                                              str(REPO / "tests" / "cuda_emulator" / "emulated_kernels.cpp")],
        extra_include_paths=[str(REPO / "tests" / "cuda_emulator"), str(REPO / "kernels")],
        extra_cflags=["-O1", "-Wno-unknown-pragmas"], build_directory=str(folder), verbose=False)


@pytest.mark.parametrize("heads,code_heads,n,k,d,dtype,metric,precision,topk", [
    (2, 1, 37, 259, 33, torch.float32, "l2", "ieee", 1),
    (2, 2, 20, 130, 8, torch.bfloat16, "cosine", "bf16", 5),
    (1, 1, 9, 40, 70, torch.float16, "l2", "fp16", 16)])
def test_search_through_the_glue(glue, heads, code_heads, n, k, d, dtype, metric, precision, topk):
    x = torch.randn(heads, n, 2 * d).to(dtype)[..., ::2]
    codebook = torch.randn(code_heads, k, d).to(dtype)
    bias = code_bias(codebook, metric, precision)
    want = reference.topk_codes(x, codebook, topk, metric=metric, precision=precision)
    for target_blocks in (1, 64):
        indices, distances = glue.search(x, codebook, bias, metric == "cosine", PRECISIONS.index(precision), topk,
                                         target_blocks, 0)
        assert indices.shape == distances.shape == (heads, n, topk)
        check_nearest(x, codebook, indices[..., 0], distances[..., 0], metric, precision)
        assert (indices == want[0]).float().mean() > 0.97
        torch.testing.assert_close(distances[indices == want[0]], want[1][indices == want[0]], rtol=1e-5, atol=1e-4)


def test_code_stats_through_the_glue(glue):
    x = torch.randint(-8, 9, (2, 9000, 40)).float()
    indices = torch.randint(-1, 300, (2, 9000))
    mask = torch.rand(2, 9000) > 0.3
    for m in (None, mask):
        for target_blocks in (1, 64):
            counts, sums = glue.code_stats(x, indices, m, 300, target_blocks, 0)
            want_counts, want_sums = reference.code_stats(x, indices, 300, mask=m)
            assert torch.equal(counts, want_counts) and torch.equal(sums, want_sums)


def test_glue_rejects_mismatched_shapes(glue):
    x = torch.randn(1, 5, 4)
    with pytest.raises(RuntimeError, match=r"shapes do not match"):
        glue.search(x, torch.randn(1, 6, 3), torch.zeros(1, 6), False, 0, 1, 1, 0)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, min\(16, K\)\]"):
        glue.search(x, torch.randn(1, 6, 4), torch.zeros(1, 6), False, 0, 7, 1, 0)
