"""The CUDA kernels themselves (kernels/*.cu, thread mapping, shared memory, warp shuffles, code
splits, code_stats' chunks), run on the host by tests/tools/cuda_emulator/ and compared with the reference.

The emulation gives each CUDA thread a fiber and implements __syncthreads and the warp shuffles with
barriers, and the WMMA fragments of the tensor-core search (precision tf32, bf16, fp16) as whole
tiles multiplied in fp32 (tests/tools/cuda_emulator/mma.h), so the launchers and kernels run as written,
without a GPU (slowly: keep shapes small). On a GPU the same kernels run through backend="cuda" in
the main test matrix.
"""

import ctypes
import importlib

import pytest
import torch
from conftest import case
from host_build import REPO, build, needs_cxx, pointer
from test_cuda_host_check import host_check_library, host_search
from vq_checks import check_nearest

from fastvq.ops import chunked
from fastvq.ops.backend import unavailable_reason
from fastvq.ops.common import METRICS, PRECISIONS, code_bias

pytestmark = needs_cxx
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
I64 = ctypes.c_int64


class SearchArgs(ctypes.Structure):  # kernels/launchers.h
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("codes", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        *[
            (name, I64)
            for name in (
                "heads",
                "n_tokens",
                "n_codes",
                "dim",
                "x_stride_h",
                "x_stride_n",
                "x_stride_d",
                "code_stride_h",
                "code_stride_k",
                "code_stride_d",
                "bias_stride_h",
            )
        ],
        ("metric", ctypes.c_int),
        ("precision", ctypes.c_int),
        ("k", ctypes.c_int),
    ]


class CodeStatsArgs(ctypes.Structure):  # kernels/launchers.h
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("indices", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        *[
            (name, I64)
            for name in (
                "heads",
                "n_tokens",
                "n_codes",
                "dim",
                "x_stride_h",
                "x_stride_n",
                "x_stride_d",
                "index_stride_h",
                "index_stride_n",
                "mask_stride_h",
                "mask_stride_n",
            )
        ],
    ]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    emulator = REPO / "tests" / "tools" / "cuda_emulator"
    library = build(
        emulator / "emulated_kernels.cpp",
        tmp_path_factory.mktemp("emulated"),
        "-std=c++20",
        "-O1",
        "-Wno-unknown-pragmas",
        "-Wno-unused-parameter",
        f"-I{emulator}",
    )
    library.fastvq_emulated_search_splits.restype = I64
    library.fastvq_emulated_mma_calls.restype = ctypes.c_uint64
    library.fastvq_emulated_set_capability.argtypes = [ctypes.c_int]
    library.fastvq_emulated_code_stats_max_chunks.restype = I64
    return library


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return host_check_library(tmp_path_factory.mktemp("host_check"))


def emulated_search(emu, x, codebook, metric, precision, k, target_blocks):
    """kernels/nearest_code.cu's launch_search, emulated: -> indices, distances (H, N, k), splits."""
    heads, n, d = x.shape
    bias = code_bias(codebook, metric, precision).contiguous()
    shared = codebook.shape[0] == 1
    args = SearchArgs(
        x.data_ptr(),
        codebook.data_ptr(),
        bias.data_ptr(),
        DTYPES[x.dtype],
        heads,
        n,
        codebook.shape[1],
        d,
        *x.stride(),
        0 if shared else codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        0 if shared else bias.stride(0),
        METRICS.index(metric),
        PRECISIONS.index(precision),
        k,
    )
    splits = emu.fastvq_emulated_search_splits(ctypes.byref(args), target_blocks)
    slots = emu.fastvq_emulated_search_list_size(k)
    partial_score = torch.empty(heads, splits, n, slots)
    partial_index = torch.empty(heads, splits, n, slots, dtype=torch.int32)
    indices = torch.empty(heads, n, k, dtype=torch.int64)
    distances = torch.empty(heads, n, k)
    assert (
        emu.fastvq_emulated_search(
            ctypes.byref(args),
            target_blocks,
            pointer(partial_score),
            pointer(partial_index),
            pointer(indices),
            pointer(distances),
        )
        == 0
    )
    return indices, distances, splits


SEARCH_CASES = [
    case(N=n, K=k, D=d, H=h, shared=shared, dtype=dtype, metric=metric, precision=precision, k=topk)
    for n, k, d, h, shared, dtype, metric, precision, topk in [
        (37, 259, 33, 1, False, torch.float32, "l2", "ieee", 1),
        (25, 90, 12, 2, True, torch.float32, "dot", "ieee", 2),
        # tensor cores (tf32, bf16, fp16): N over one 128-token block, D < 16, D > 32 in
        # two chunks, D not a multiple of the fragment depth (8 tf32, 16 bf16/fp16)
        (70, 130, 8, 2, True, torch.float32, "cosine", "tf32", 1),
        (37, 259, 33, 1, False, torch.float32, "l2", "tf32", 1),
        (20, 150, 40, 1, False, torch.float32, "l2", "tf32", 2),  # a second chunk of exactly one fragment depth
        (25, 90, 6, 2, True, torch.float16, "dot", "tf32", 2),
        (20, 200, 5, 2, False, torch.float16, "l2", "fp16", 3),
        (130, 70, 12, 2, False, torch.float16, "cosine", "fp16", 1),
        (9, 140, 40, 1, False, torch.float32, "cosine", "fp16", 16),
        (9, 140, 40, 1, False, torch.bfloat16, "cosine", "bf16", 16),
        (17, 70, 3, 1, False, torch.float32, "l2", "bf16", 8),
        (20, 200, 24, 2, True, torch.bfloat16, "dot", "bf16", 4),
    ]
]


@pytest.mark.parametrize("N,K,D,H,shared,dtype,metric,precision,k", SEARCH_CASES)
def test_search_kernel_matches_the_host_check_and_the_reference(
    emu, host_lib, N, K, D, H, shared, dtype, metric, precision, k
):
    """Same indices as the host build of the per-element logic (the same fp32 sums in the same
    order: the emulated tensor cores sum D ascending too), whatever the split of the codes;
    distances to fp32 rounding; nearest within the regret bound of the float64 brute force (what
    holds on real tensor cores, which sum in another order); non-contiguous x. tf32, bf16 and fp16
    run the tensor-core kernel (its mma_sync calls counted), ieee the CUDA-core one."""
    wide = torch.randn(H, N, 2 * D).to(dtype)
    x = wide[..., ::2]  # strided in D
    codebook = torch.randn(1 if shared else H, K, D).to(dtype)
    want_indices, want_distances = host_search(host_lib, x, codebook, metric, precision, k, 64)
    answers = []
    for target_blocks in (1, 64):  # one split, then as many as there are code tiles
        mma_calls = emu.fastvq_emulated_mma_calls()
        indices, distances, splits = emulated_search(emu, x, codebook, metric, precision, k, target_blocks)
        assert (emu.fastvq_emulated_mma_calls() > mma_calls) == (precision != "ieee")
        answers.append((indices, distances, splits))
        assert torch.equal(indices, want_indices)
        torch.testing.assert_close(distances, want_distances, rtol=1e-5, atol=1e-5)
    assert answers[0][2] == 1 and answers[1][2] > 1
    assert torch.equal(answers[0][0], answers[1][0]) and torch.equal(answers[0][1], answers[1][1])
    check_nearest(x, codebook, answers[0][0][..., 0], answers[0][1][..., 0], metric, precision)


def test_search_before_ampere_uses_cuda_cores(emu, host_lib):
    """On a GPU without WMMA tf32 / bf16 (capability < 8) the launcher picks the CUDA-core kernel
    for every precision (no mma_sync call), with the host check's answer."""
    x, codebook = torch.randn(1, 40, 20), torch.randn(1, 100, 20)
    previous = emu.fastvq_emulated_set_capability(7)
    try:
        for precision in ("tf32", "bf16", "fp16"):
            mma_calls = emu.fastvq_emulated_mma_calls()
            indices, distances, _ = emulated_search(emu, x, codebook, "l2", precision, 2, 64)
            assert emu.fastvq_emulated_mma_calls() == mma_calls
            want_indices, want_distances = host_search(host_lib, x, codebook, "l2", precision, 2, 64)
            assert torch.equal(indices, want_indices)
            torch.testing.assert_close(distances, want_distances, rtol=1e-5, atol=1e-5)
    finally:
        emu.fastvq_emulated_set_capability(previous)
    assert previous == 9


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_search_kernel_ties_and_non_finite_values(emu, metric, precision):
    """Integer data, exact in every precision: the reference's exact answer (ties to the lowest
    index across code tiles and splits) on both kernels; NaN/inf tokens get -1 / NaN; codes with a
    non-finite entry are never chosen."""
    codebook = torch.randint(-3, 4, (1, 150, 5)).float()
    codebook[codebook.abs().sum(-1) == 0] = 1.0
    codebook[0, 140] = codebook[0, 3]
    codebook[0, 65] = codebook[0, 64]
    codebook[0, 7, 2] = float("nan")
    codebook[0, 9, 0] = float("-inf")
    x = torch.randint(-3, 4, (1, 23, 5)).float()
    x[0, :4] = codebook[0, [3, 64, 3, 64]]
    x[0, 5, 1] = float("nan")
    x[0, 6, 4] = float("inf")
    want = chunked.topk_codes(x, codebook, 4, metric=metric, precision=precision)
    for target_blocks in (1, 64):
        indices, distances, _ = emulated_search(emu, x, codebook, metric, precision, 4, target_blocks)
        assert torch.equal(indices, want[0])
        torch.testing.assert_close(distances, want[1], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert (indices[0, [5, 6]] == -1).all()
    if metric == "l2":  # a token on a code is nearest to its first copy (cosine: multiples tie too; dot: longer wins)
        first_copy = [int((codebook[0] == codebook[0, c]).all(-1).nonzero()[0]) for c in (3, 64)]
        assert indices[0, :2, 0].tolist() == first_copy
    assert not set(indices.flatten().tolist()) & {7, 9}


def emulated_code_stats(emu, x, indices, num_codes, mask):
    """kernels/code_stats.cu's three launchers, emulated, with the glue's torch steps between them
    (a stable sort of the keys, a prefix sum of the chunk counts): -> counts (H, K), sums (H, K, D)."""
    heads, n, d = x.shape
    mask_bytes = None if mask is None else mask.view(torch.uint8)
    args = CodeStatsArgs(
        x.data_ptr(),
        DTYPES[x.dtype],
        indices.data_ptr(),
        None if mask is None else mask_bytes.data_ptr(),
        heads,
        n,
        num_codes,
        d,
        *x.stride(),
        *indices.stride(),
        *(mask_bytes.stride() if mask is not None else (0, 0)),
    )
    keys = torch.empty(heads * n, dtype=torch.int64)
    assert emu.fastvq_emulated_code_stats_keys(ctypes.byref(args), pointer(keys)) == 0
    sorted_keys, order = torch.sort(keys, stable=True)
    run_start, run_end = (
        torch.zeros(heads * num_codes, dtype=torch.int64),
        torch.zeros(heads * num_codes, dtype=torch.int64),
    )
    run_chunks = torch.empty(heads * num_codes, dtype=torch.int64)
    counts, sums = torch.empty(heads, num_codes), torch.empty(heads, num_codes, d)
    assert (
        emu.fastvq_emulated_code_stats_runs(
            ctypes.byref(args),
            pointer(sorted_keys),
            pointer(order),
            pointer(run_start),
            pointer(run_end),
            pointer(run_chunks),
            pointer(counts),
            pointer(sums),
        )
        == 0
    )
    chunk_end = run_chunks.cumsum(0)
    partial = torch.empty(emu.fastvq_emulated_code_stats_max_chunks(ctypes.byref(args)), d)
    assert (
        emu.fastvq_emulated_code_stats_long_runs(
            ctypes.byref(args),
            pointer(order),
            pointer(run_start),
            pointer(run_end),
            pointer(run_chunks),
            pointer(chunk_end),
            pointer(partial),
            pointer(sums),
        )
        == 0
    )
    return counts, sums


@pytest.fixture(scope="module")
def triton_code_stats():
    """The Triton backend's code_stats module (its deterministic sorted reduction), run by Triton's
    interpreter on CPU."""
    reason = unavailable_reason("triton", "cpu")
    if reason:
        pytest.skip(reason)
    return importlib.import_module("fastvq.ops.triton.code_stats")


def skewed_indices(heads, n, num_codes, on_few):
    """Indices with a fraction `on_few` of the tokens on codes 0 and 1 (runs longer than a chunk), the
    rest spread over [-1, num_codes + 2) (index -1 and past K: skipped)."""
    spread = torch.randint(-1, num_codes + 2, (heads, n))
    return torch.where(torch.rand(heads, n) < on_few, torch.randint(0, 2, (heads, n)), spread)


CODE_STATS_CASES = [
    case(N=n, K=k, D=d, H=h, dtype=dtype, masked=masked, on_few=on_few)
    for n, k, d, h, dtype, masked, on_few in [
        (900, 40, 33, 2, torch.float32, True, 0.9),  # runs of 2 chunks, 2 column blocks
        (700, 30, 5, 1, torch.float16, False, 0.9),  # 8 columns per code
        (1000, 20, 12, 2, torch.bfloat16, True, 0.8),
        (50, 1000, 7, 2, torch.float32, False, 0.0),  # K > N: most codes empty
        (800, 9, 0, 2, torch.float32, True, 0.9),
    ]
]  # D = 0: counts only


@pytest.mark.parametrize("N,K,D,H,dtype,masked,on_few", CODE_STATS_CASES)
def test_code_stats_kernel_is_bitwise_the_triton_result(emu, triton_code_stats, N, K, D, H, dtype, masked, on_few):
    """Random rows (the order of the fp32 additions shows in the bits): bitwise equal to the Triton
    backend's deterministic result (same sort, chunks and addition order) and to a rerun, within fp32
    rounding of the reference; strided x, index -1 and past K, mask, heads, runs over one chunk."""
    x = torch.randn(H, N, 2 * D + 1).to(dtype)[..., 1::2]
    indices = skewed_indices(H, N, K, on_few)
    mask = torch.rand(H, N) > 0.2 if masked else None
    counts, sums = emulated_code_stats(emu, x, indices, K, mask)
    want_counts, want_sums = triton_code_stats.code_stats(x, indices, K, mask=mask)
    assert torch.equal(counts, want_counts) and torch.equal(sums, want_sums)
    again = emulated_code_stats(emu, x, indices, K, mask)
    assert torch.equal(again[0], counts) and torch.equal(again[1], sums)
    ref_counts, ref_sums = chunked.code_stats(x, indices, K, mask=mask)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=N * 4 * 2.0**-23)
    if on_few:
        assert counts.max() > triton_code_stats.CHUNK  # the long-run path ran


def test_code_stats_kernel_on_a_collapsed_batch(emu, triton_code_stats):
    """Every token on one code: one run of several chunks, spread over one group per chunk, then
    its chunk sums added in order: the Triton result's bits; integer rows: the exact sum."""
    n, k, d = 5 * triton_code_stats.CHUNK + 37, 16, 24
    x = torch.randn(1, n, d)
    indices = torch.full((1, n), 7)
    counts, sums = emulated_code_stats(emu, x, indices, k, None)
    want_counts, want_sums = triton_code_stats.code_stats(x, indices, k)
    assert torch.equal(counts, want_counts) and torch.equal(sums, want_sums)
    assert counts[0].tolist() == [0.0] * 7 + [float(n)] + [0.0] * 8
    whole = torch.randint(-8, 9, (1, n, d)).float()
    assert torch.equal(emulated_code_stats(emu, whole, indices, k, None)[1][0, 7], whole[0].sum(0))


def test_code_stats_launchers_refuse_sizes_past_the_grid(emu):
    """The launchers check the sizes before any work: up to 2^31 - 1 blocks of 256 tokens or codes
    and 65535 blocks of 32 columns are accepted, one more is cudaErrorInvalidValue (1). Without tokens
    nothing is launched, so the largest accepted sizes run on no data."""
    most_items, most_dim = (2**31 - 1) * 256, 65535 * 32

    def keys_status(heads, n_codes, dim):
        args = CodeStatsArgs(None, DTYPES[torch.float32], None, None, heads, 0, n_codes, dim, *[0] * 7)
        return emu.fastvq_emulated_code_stats_keys(ctypes.byref(args), None)

    assert keys_status(1, most_items, most_dim) == 0 and keys_status(2, most_items // 2, 0) == 0
    assert keys_status(1, most_items + 1, 0) == 1 and keys_status(2, most_items // 2 + 1, 0) == 1
    assert keys_status(1, 10, most_dim + 1) == 1
    assert keys_status(1, 0, 4) == 1 and keys_status(-1, 10, 4) == 1 and keys_status(1, 10, -1) == 1


def test_search_launcher_refuses_bad_sizes_before_any_work(emu):
    """k outside [1, 16], more than 65535 heads or 2^31 - 1 codes: cudaErrorInvalidValue (1), with no
    data read (every pointer is null); k = 1 and k = 16 are accepted (the cases above)."""

    def status(heads=1, n_codes=10, k=1):
        args = SearchArgs(None, None, None, DTYPES[torch.float32], heads, 1, n_codes, 4, *[0] * 7, 0, 0, k)
        return emu.fastvq_emulated_search(ctypes.byref(args), 1, None, None, None, None)

    assert status(k=0) == 1 and status(k=-1) == 1 and status(k=17) == 1
    assert status(heads=65536) == 1 and status(n_codes=2**31 - 1) == 1


def test_code_stats_kernel_with_more_columns_than_a_block_has_threads(emu):
    """D = 300 > 256 threads per block: the columns go to groups of 32 over several column blocks (a
    group wider than a block would leave no item per block); counts exact, sums within fp32 rounding."""
    x = torch.randn(1, 40, 300)
    indices = torch.randint(0, 5, (1, 40))
    counts, sums = emulated_code_stats(emu, x, indices, 5, None)
    want_counts, want_sums = chunked.code_stats(x, indices, 5)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)
