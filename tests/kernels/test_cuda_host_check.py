"""The CUDA kernels' per-element logic (kernels/vq_tile.cuh), built for the host, against the torch
backend (ops/chunked.py).

CI has no GPU: kernels/host_check.cpp runs the same operand rounding, scores, (score, index) order,
top-k insertion, split merge, exact distance and non-finite rules as the kernels, in plain loops,
and is loaded here with ctypes. Built into a temporary folder with the host C++ compiler.
"""

import ctypes

import pytest
import torch
from conftest import case
from host_build import REPO, build, needs_cxx
from host_build import pointer as _ptr
from vq_checks import check_nearest

from fastvq.ops import chunked
from fastvq.ops.common import METRICS, PRECISIONS, code_bias, round_operand

pytestmark = needs_cxx
I64, PTR = ctypes.c_int64, ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return host_check_library(tmp_path_factory.mktemp("host_check"))


def host_check_library(folder):
    """kernels/host_check.cpp built into `folder` and loaded, with its C signatures."""
    library = build(REPO / "kernels" / "host_check.cpp", folder, "-std=c++17", "-O2")
    library.fastvq_host_round_operand.argtypes = [PTR, PTR, I64, ctypes.c_int]
    library.fastvq_host_search.argtypes = [
        PTR,
        PTR,
        PTR,
        I64,
        I64,
        I64,
        I64,
        I64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        I64,
        PTR,
        PTR,
    ]
    library.fastvq_host_code_stats.argtypes = [PTR, PTR, PTR, I64, I64, I64, I64, I64, PTR, PTR]
    return library


def host_search(lib, x, codebook, metric, precision, k, codes_per_split):
    """The host build of the CUDA search on canonical (H, N, D), (Hc, K, D) -> (H, N, k) twice."""
    heads, n, d = x.shape
    bias = code_bias(codebook, metric, precision).contiguous()
    xf, cf = x.float().contiguous(), codebook.float().contiguous()
    indices = torch.empty(heads, n, k, dtype=torch.int64)
    distances = torch.empty(heads, n, k)
    lib.fastvq_host_search(
        _ptr(xf),
        _ptr(cf),
        _ptr(bias),
        heads,
        codebook.shape[0],
        n,
        codebook.shape[1],
        d,
        METRICS.index(metric),
        PRECISIONS.index(precision),
        k,
        codes_per_split,
        _ptr(indices),
        _ptr(distances),
    )
    return indices, distances


def host_code_stats(lib, x, indices, num_codes, mask=None, splits=1):
    heads, n, d = x.shape
    xf, idx = x.float().contiguous(), indices.contiguous()
    mask_bytes = None if mask is None else mask.to(torch.uint8).contiguous()
    counts, sums = torch.empty(heads, num_codes), torch.empty(heads, num_codes, d)
    lib.fastvq_host_code_stats(
        _ptr(xf), _ptr(idx), _ptr(mask_bytes), heads, n, num_codes, d, splits, _ptr(counts), _ptr(sums)
    )
    return counts, sums


def test_operand_rounding_matches_the_reference(lib):
    """Every precision, on random magnitudes and the edge cases: subnormals, fp16/bf16/tf32
    overflow, halfway points, signed zeros, inf and NaN."""
    values = torch.cat(
        [
            torch.randn(4000) * torch.logspace(-30, 30, 4000),
            torch.randn(1000) * 1e-6,
            torch.rand(1000) * 70000,
            torch.tensor(
                [
                    0.0,
                    -0.0,
                    65504.0,
                    65519.99,
                    65520.0,
                    -65520.0,
                    6.1035e-05,
                    5.96e-08,
                    2.98e-08,
                    2.99e-08,
                    3.4028235e38,
                    -3.4028235e38,
                    3.3961776e38,
                    1.0 + 2**-11,
                    1.0 + 3 * 2**-11,
                    1.0 + 2**-8,
                    float("inf"),
                    float("-inf"),
                    float("nan"),
                ]
            ),
        ]
    ).float()
    for precision in PRECISIONS:
        got = torch.empty_like(values)
        lib.fastvq_host_round_operand(_ptr(values), _ptr(got), values.numel(), PRECISIONS.index(precision))
        want = round_operand(values, precision)
        assert torch.equal(got.isnan(), want.isnan()), precision
        same = got[~want.isnan()].view(torch.int32) == want[~want.isnan()].view(torch.int32)
        assert same.all(), (
            f"{precision}: {values[~want.isnan()][~same][:5].tolist()} -> "
            f"{got[~want.isnan()][~same][:5].tolist()} vs {want[~want.isnan()][~same][:5].tolist()}"
        )


SEARCH_CASES = [
    case(N=n, K=k, D=d, H=h, shared=shared, dtype=dtype, metric=metric)
    for n, k, d, h, shared, dtype, metric in [
        (37, 259, 33, 1, False, torch.float32, "l2"),
        (37, 259, 33, 3, True, torch.float32, "cosine"),
        (20, 130, 3, 2, False, torch.float16, "l2"),
        (20, 130, 64, 2, False, torch.bfloat16, "cosine"),
        (25, 90, 12, 2, True, torch.float32, "dot"),
        (9, 1, 5, 1, False, torch.float32, "l2"),
    ]
]


@pytest.mark.parametrize("N,K,D,H,shared,dtype,metric", SEARCH_CASES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_nearest_matches_the_float64_brute_force(lib, N, K, D, H, shared, dtype, metric, precision):
    x = torch.randn(H, N, D).to(dtype)
    codebook = torch.randn(1 if shared else H, K, D).to(dtype)
    indices, distances = host_search(lib, x, codebook, metric, precision, 1, 64)
    check_nearest(x, codebook, indices[..., 0], distances[..., 0], metric, precision)
    ref_indices, ref_distances = chunked.nearest_code(x, codebook, metric=metric, precision=precision)
    assert (indices[..., 0] == ref_indices).float().mean() > 0.97  # differ only at near-ties (summation order)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", [1, 3, 16])
def test_exact_data_gives_the_reference_answer_bitwise(lib, metric, precision, k):
    """Small integers make every product and norm exact in every precision, so the host search must
    equal the reference exactly: indices (ties to the lowest index, duplicated codes across code
    splits), order of the top-k, distances, and the -1 / NaN slots."""
    n_codes, d = 150, 5
    codebook = torch.randint(-3, 4, (1, n_codes, d)).float()
    codebook[codebook.abs().sum(-1) == 0] = 1.0  # no zero code: its cosine is undefined
    codebook[0, 140] = codebook[0, 3]  # twins in different code splits
    codebook[0, 65] = codebook[0, 64]
    x = torch.randint(-3, 4, (1, 23, d)).float()
    x[0, :4] = codebook[0, [3, 64, 3, 64]]
    want = chunked.topk_codes(x, codebook, k, metric=metric, precision=precision)
    for codes_per_split in (64, 128, n_codes):
        got = host_search(lib, x, codebook, metric, precision, k, codes_per_split)
        assert torch.equal(got[0], want[0]), codes_per_split
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    if metric != "dot":  # a token on a code is nearest to it (dot: a longer code can win)
        assert got[0][0, 0, 0] == 3 and got[0][0, 1, 0] == 64


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_non_finite_rules(lib, metric):
    """NaN/inf tokens get -1 and NaN in every slot; codes with a non-finite entry are never chosen;
    slots past the finite codes get -1 / NaN."""
    x = torch.randn(1, 6, 7)
    x[0, 1, 2] = float("nan")
    x[0, 4, 0] = float("-inf")
    codebook = torch.randn(1, 5, 7)
    codebook[0, 0, 3] = float("nan")
    codebook[0, 2, 1] = float("inf")
    indices, distances = host_search(lib, x, codebook, metric, "ieee", 4, 64)
    want_indices, want_distances = chunked.topk_codes(x, codebook, 4, metric=metric)
    assert torch.equal(indices, want_indices)
    assert torch.equal(distances.isnan(), want_distances.isnan())
    assert (indices[0, [1, 4]] == -1).all() and (indices[0, [0, 2, 3, 5], 3] == -1).all()
    assert not set(indices.flatten().tolist()) & {0, 2}
    torch.testing.assert_close(distances[~distances.isnan()], want_distances[~want_distances.isnan()])


@pytest.mark.parametrize("splits", [1, 3])
def test_code_stats_matches_the_reference(lib, splits):
    """Integer-valued rows make the sums exact in any order: equal to the reference bitwise, with a
    mask, index -1 and out-of-range indices skipped; splitting the tokens changes nothing."""
    heads, n, k, d = 2, 301, 37, 6
    x = torch.randint(-8, 9, (heads, n, d)).to(torch.bfloat16)
    indices = torch.randint(-1, k + 2, (heads, n))
    mask = torch.rand(heads, n) > 0.3
    for m in (None, mask):
        counts, sums = host_code_stats(lib, x, indices, k, m, splits)
        want_counts, want_sums = chunked.code_stats(x, indices, k, mask=m)
        assert torch.equal(counts, want_counts) and torch.equal(sums, want_sums)


def test_overflowing_scores_never_win(lib):
    """A finite token whose product with a finite code overflows (score -inf) must not take that
    code, and a chosen code whose distance overflows gives -1 / NaN, as in the reference."""
    x = torch.tensor([[[1.9e19]]])
    codebook = torch.tensor([[[1.8e19], [0.0]]])  # |c0|^2 is finite, x.c0 overflows; |x - c1|^2 overflows
    indices, distances = host_search(lib, x, codebook, "l2", "ieee", 2, 64)
    want_indices, want_distances = chunked.topk_codes(x, codebook, 2)
    assert torch.equal(indices, want_indices) and indices.tolist() == [[[-1, -1]]]
    assert distances.isnan().all() and want_distances.isnan().all()
