"""code_stats: per-code counts and sums against the oracle (`fastvq.ops.naive`: a one-hot matrix in float64), every
backend; bitwise determinism; the sorted reduction's order of additions."""

import importlib

import pytest
import torch
from conftest import REFERENCE_ON_CPU, backend_cases

import fastvq
from fastvq.ops import naive
from fastvq.ops.backend import unavailable_reason


def _expected(x, indices, num_codes, mask):
    """The oracle's counts (as fp32: exact integers) and float64 sums on canonical (H, N, D), (H, N), (H, N)."""
    counts, sums = naive.code_stats(x, indices, num_codes, mask=mask)
    return counts.float(), sums


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (7, 3, 3), (301, 259, 33), (300, 5, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_bincount_and_index_add(device, backend, n, k, d, dtype, heads, with_mask):
    x = torch.randn(heads, n, d).to(dtype)
    indices = torch.randint(-1, k, (heads, n))
    mask = torch.rand(heads, n) > 0.3 if with_mask else None
    want_counts, want_sums = _expected(x, indices, k, mask)
    counts, sums = fastvq.code_stats(
        x.to(device), indices.to(device), k, mask=None if mask is None else mask.to(device), backend=backend
    )
    assert counts.shape == (heads, k) and sums.shape == (heads, k, d)
    assert counts.dtype == sums.dtype == torch.float32
    torch.testing.assert_close(counts.cpu(), want_counts, rtol=0, atol=0)
    # fp32 accumulation of at most n terms of magnitude ~4
    torch.testing.assert_close(sums.cpu().double(), want_sums, rtol=1e-5, atol=n * 4 * 2.0**-23)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_two_dimensional_and_non_contiguous(device, backend):
    wide = torch.randn(200, 40, device=device)
    x = wide[::2, 3::3]  # (100, 13), strided both ways
    indices = torch.randint(0, 17, (200,), device=device)[::2]
    mask = (torch.rand(100, 2, device=device) > 0.5)[:, 0]
    counts, sums = fastvq.code_stats(x, indices, 17, mask=mask, backend=backend)
    want_counts, want_sums = _expected(x.cpu()[None], indices.cpu()[None], 17, mask.cpu()[None])
    assert counts.shape == (17,) and sums.shape == (17, 13)
    torch.testing.assert_close(counts.cpu(), want_counts[0], rtol=0, atol=0)
    torch.testing.assert_close(sums.cpu().double(), want_sums[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_skips_unassigned_tokens_from_nearest_code(device, backend):
    """Tokens that nearest_code could not assign (NaN) never reach the statistics."""
    x = torch.randn(50, 6, device=device)
    x[[3, 17]] = float("nan")
    codebook = torch.randn(9, 6, device=device)
    indices, _ = fastvq.nearest_code(x, codebook, backend=backend)
    counts, sums = fastvq.code_stats(x, indices, 9, backend=backend)
    assert counts.sum().item() == 48
    assert torch.isfinite(sums).all()


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_empty_and_unused_codes(device, backend):
    counts, sums = fastvq.code_stats(
        torch.randn(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device), 6, backend=backend
    )
    assert counts.shape == (6,) and sums.shape == (6, 4) and counts.abs().sum() == 0 and sums.abs().sum() == 0
    counts, _ = fastvq.code_stats(
        torch.randn(5, 4, device=device), torch.full((5,), 2, device=device), 6, backend=backend
    )
    assert counts.tolist() == [0, 0, 5, 0, 0, 0]


def test_int32_indices_are_accepted():
    x = torch.randn(10, 3)
    indices = torch.randint(0, 4, (10,), dtype=torch.int32)
    counts, _ = fastvq.code_stats(x, indices, 4)
    assert torch.equal(counts, torch.bincount(indices.long(), minlength=4).float())


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_out_of_range_indices_are_skipped_without_the_check(device, backend):
    """With check_indices=False an index past K (or below -1) is skipped, never written outside the
    outputs; with the check it raises."""
    x = torch.randn(1, 6, 4, device=device)
    indices = torch.tensor([[0, 16, 3, -7, 3, 2**40]], device=device)
    counts, sums = fastvq.code_stats(x, indices, 16, backend=backend, check_indices=False)
    assert counts.sum() == 3 and counts[0, 0] == 1 and counts[0, 3] == 2
    torch.testing.assert_close(sums[0, 3], x[0, 2] + x[0, 4])
    with pytest.raises(ValueError, match=r"indices must be in \[-1, num_codes=16\)"):
        fastvq.code_stats(x, indices, 16, backend=backend)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_zero_width_rows_are_still_counted(device, backend):
    counts, sums = fastvq.code_stats(
        torch.randn(5, 0, device=device), torch.tensor([0, 1, 1, -1, 2], device=device), 4, backend=backend
    )
    assert counts.tolist() == [1.0, 2.0, 1.0, 0.0] and sums.shape == (4, 0)


@pytest.mark.parametrize("device,backend", backend_cases(["cuda"]))
def test_cuda_sums_are_bitwise_the_same_every_run(device, backend):
    """The CUDA code_stats is the Triton backend's sorted segmented reduction (K = 40 codes: runs of
    ~1600 tokens, several chunks each): bitwise the same every run and bitwise the Triton result."""
    x = torch.randn(65536, 24, device=device)
    indices = torch.randint(-1, 40, (65536,), device=device)
    first = fastvq.code_stats(x, indices, 40, backend=backend)
    for _ in range(3):
        again = fastvq.code_stats(x, indices, 40, backend=backend)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    if not unavailable_reason("triton", x.device):
        triton = fastvq.code_stats(x, indices, 40, backend="triton")
        assert torch.equal(first[0], triton[0]) and torch.equal(first[1], triton[1])
    want_counts, want_sums = _expected(x.cpu()[None], indices.cpu()[None], 40, None)
    torch.testing.assert_close(first[0].cpu(), want_counts[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1].cpu().double(), want_sums[0], rtol=1e-5, atol=1e-3)


def test_meta_tensors_give_shapes():
    """As every op: meta inputs (shape inference, torch.compile's fake tensors) give meta outputs."""
    x, indices = torch.randn(5, 3, device="meta"), torch.zeros(5, dtype=torch.int64, device="meta")
    counts, sums = fastvq.code_stats(x, indices, 4)
    assert counts.device.type == sums.device.type == "meta" and counts.shape == (4,) and sums.shape == (4, 3)


def _skewed_batch(heads, n, num_codes, d, device):
    """Most tokens on a few codes (runs longer than the deterministic kernel's CHUNK), some skipped."""
    x = torch.randn(heads, n, d, device=device)
    indices = torch.where(
        torch.rand(heads, n, device=device) < 0.8,
        torch.randint(0, 3, (heads, n), device=device),
        torch.randint(-1, num_codes, (heads, n), device=device),
    )
    return x, indices


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_bitwise_deterministic_across_runs(device, backend):
    """The default is deterministic on every backend: repeated calls give the same bits (on CPU
    also with another thread count)."""
    x, indices = _skewed_batch(2, 1200, 40, 19, device)
    first = fastvq.code_stats(x, indices, 40, backend=backend)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, max(2, threads)):
            torch.set_num_threads(n_threads)
            again = fastvq.code_stats(x, indices, 40, backend=backend)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    finally:
        torch.set_num_threads(threads)
    want_counts, want_sums = _expected(x.cpu(), indices.cpu(), 40, None)
    torch.testing.assert_close(first[0].cpu(), want_counts, rtol=0, atol=0)
    torch.testing.assert_close(first[1].cpu().double(), want_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
def test_sorted_reduction_does_not_depend_on_block_sizes(device, backend):
    """The sorted segmented reduction adds in an order fixed by the data (token order in chunks of
    CHUNK, then chunk order): any block sizes give the same bits, and runs longer than CHUNK are
    split. The atomic variant agrees within rounding."""
    triton_code_stats = importlib.import_module("fastvq.ops.triton.code_stats")  # the module, not the op
    x, indices = _skewed_batch(2, 1200, 40, 19, device)
    assert torch.bincount(indices[0][indices[0] >= 0]).max() > triton_code_stats.CHUNK
    results = [
        triton_code_stats.code_stats(x, indices, 40, block_sizes=sizes) for sizes in [(32, 16), (8, 32), (64, 64)]
    ]
    for counts, sums in results[1:]:
        assert torch.equal(counts, results[0][0]) and torch.equal(sums, results[0][1])
    atomic_counts, atomic_sums = triton_code_stats.code_stats(x, indices, 40, deterministic=False)
    torch.testing.assert_close(atomic_counts, results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(atomic_sums, results[0][1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
def test_sorted_reduction_adds_each_code_in_token_order(device, backend):
    """The order of the additions is part of the result: each code's rows in token order, CHUNK at a
    time, then the chunk sums in chunk order. Rows of mixed magnitudes make fp32 sums depend on that
    order, so the result equals that sequential sum bitwise and differs from the same rows added in
    reverse (a lost stable sort, or chunks taken out of order, would show)."""
    triton_code_stats = importlib.import_module("fastvq.ops.triton.code_stats")  # the module, not the op
    chunk, n = triton_code_stats.CHUNK, 2 * triton_code_stats.CHUNK + 37
    x = torch.randn(1, n, 4) * 10.0 ** torch.randint(-4, 5, (1, n, 4))
    indices = torch.where(torch.rand(1, n) < 0.9, 1, torch.randint(-1, 3, (1, n)))
    counts, sums = triton_code_stats.code_stats(x.to(device), indices.to(device), 3)

    def in_order(rows):
        chunk_sums = []
        for start in range(0, len(rows), chunk):
            total = torch.zeros(4)
            for row in rows[start : start + chunk]:
                total = total + row
            chunk_sums.append(total)
        total = torch.zeros(4)
        for partial in chunk_sums:
            total = total + partial
        return total

    for code in range(3):
        rows = x[0, indices[0] == code]
        assert counts[0, code] == len(rows)
        assert torch.equal(sums[0, code].cpu(), in_order(rows)), f"code {code}"
    reversed_sum = in_order(x[0, indices[0] == 1].flip(0))
    assert not torch.equal(sums[0, 1].cpu(), reversed_sum), "the rows must tell the orders apart"


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_collapsed_batch(device, backend):
    """Every token on one code (codebook collapse): one run of N tokens, spread over N / CHUNK programs
    by the Triton kernel; the sum is that of all rows."""
    x = torch.randn(1, 3000, 24, device=device)
    indices = torch.full((1, 3000), 7, device=device)
    counts, sums = fastvq.code_stats(x, indices, 16, backend=backend)
    assert counts[0].tolist() == [0.0] * 7 + [3000.0] + [0.0] * 8
    assert sums[0, :7].abs().sum() == 0 and sums[0, 8:].abs().sum() == 0
    torch.testing.assert_close(sums[0, 7].cpu().double(), x[0].cpu().double().sum(0), rtol=1e-5, atol=3000 * 2.0**-20)
    again = fastvq.code_stats(x, indices, 16, backend=backend)
    assert torch.equal(sums, again[1])
