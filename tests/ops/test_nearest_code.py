"""nearest_code: every backend against the dense float64 oracle (`fastvq.ops.naive`).

The Triton backend runs on CPU under TRITON_INTERPRET=1 (set by conftest.py) and on CUDA natively.
"""

import importlib
import itertools

import pytest
import torch
from conftest import backend_cases, case
from vq_checks import check_nearest

import fastvq
from fastvq.ops import naive
from fastvq.ops.backend import unavailable_reason
from fastvq.ops.common import METRICS
from fastvq.ops.functional import resolve_precision
from fastvq.ops.triton import _launch
from fastvq.ops.triton._launch import interpreted_precision

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = list(itertools.product([1, 7, 301], [1, 3, 259], [1, 3, 8, 33, 256]))  # N, K, D


def _inputs(heads, n, k, d, dtype, device, shared=False, offset=0.0):
    x = (torch.randn(heads, n, d) + offset).to(dtype).to(device)
    codebook = (torch.randn(1 if shared else heads, k, d) + offset).to(dtype).to(device)
    return x, codebook


def _run(x, codebook, metric, backend, precision=None):
    """nearest_code on canonical inputs; the rounding unit the checks should assume."""
    indices, distances = fastvq.nearest_code(x, codebook, metric=metric, backend=backend, precision=precision)
    used = resolve_precision(precision, x.dtype, codebook.dtype)
    if backend == "triton":
        used = interpreted_precision(used)  # what the kernel really used (the interpreter: exact fp32)
    return indices, distances, used


def _brute_force_cases():
    """Every (N, K, D) with every metric; heads, shared codebooks and dtypes rotate over the cases."""
    cases = []
    for i in range(len(SHAPES) * len(METRICS)):
        (n, k, d), metric = SHAPES[i // len(METRICS)], METRICS[i % len(METRICS)]
        heads, shared = [(1, False), (3, False), (3, True)][i % 3]
        cases.append(case(N=n, K=k, D=d, H=heads, shared=shared, dtype=DTYPES[(i // 3) % 3], metric=metric))
    return cases


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("N,K,D,H,shared,dtype,metric", _brute_force_cases())
def test_matches_float64_brute_force(device, backend, N, K, D, H, shared, dtype, metric):
    x, codebook = _inputs(H, N, K, D, dtype, device, shared)
    indices, distances, used = _run(x, codebook, metric, backend)
    check_nearest(x, codebook, indices, distances, metric, used)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [1, 3])
def test_agrees_with_the_oracle(device, backend, metric, dtype, heads):
    """The oracle's answer (ranking operands rounded as the backend rounded them) at an odd shape:
    the same index wherever the oracle's two lowest scores are clearly apart, its distance to 1e-5."""
    x, codebook = _inputs(heads, 301, 259, 33, dtype, device)
    indices, distances, used = _run(x, codebook, metric, backend)
    check_nearest(x, codebook, indices, distances, metric, used)
    want_indices, want_distances = naive.nearest_code(x.cpu(), codebook.cpu(), metric=metric, precision=used)
    top2 = naive.scores(x.cpu(), codebook.cpu(), metric, used).topk(2, dim=-1, largest=False).values
    clear = (top2[..., 1] - top2[..., 0]) > 1e-3
    assert clear.float().mean() > 0.9, "the test must compare most tokens"
    assert torch.equal(indices.cpu()[clear], want_indices[clear])
    torch.testing.assert_close(distances.cpu()[clear].double(), want_distances[clear], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_precision_modes_bound_regret(device, backend, precision, offset):
    """Rounded-operand modes may pick another code only within the stated regret tolerance, also
    when the data share a large offset (the regime where low precision flips most codes)."""
    x, codebook = _inputs(1, 301, 259, 8, torch.float32, device, offset=offset)
    indices, distances, used = _run(x, codebook, "l2", backend, precision)
    check_nearest(x, codebook, indices, distances, "l2", used)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,k", [(7, 259), (301, 259), (33, 1100)])
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_exact_ties_go_to_lowest_index(device, backend, metric, n, k, precision):
    """Integer-valued data make every product exact, so duplicated codes tie exactly; the lowest
    index must win, also when the copies fall in different code tiles and code splits (K = 1100
    puts twins 1000 codes apart: different tiles of the reference's 512 codes too), and in bf16
    (exact for these integers; the C++ CPU search takes its bf16 operands two dimensions at a time)."""
    d = 5
    codebook = torch.randint(-3, 4, (1, k, d)).float()
    codebook[codebook.abs().sum(-1) == 0] = 1.0  # no zero code: its cosine is undefined
    x = torch.randint(-3, 4, (1, n, d)).float()
    twins = [(3, k - 59), (64, 65), (10, k - 1), (127, 128)]
    for axis, (low, high) in enumerate(twins):  # cosine: a copy scaled by 2 has exactly the same cosine
        if metric == "dot":  # twins along distinct axes, longer than any other code: a token on one prefers it
            codebook[0, low] = 10 * torch.eye(d)[axis]
        codebook[0, high] = codebook[0, low] * (2.0 if metric == "cosine" else 1.0)
    for i in range(n):  # each token sits exactly on (a multiple of) one twin pair
        low, _ = twins[i % len(twins)]
        x[0, i] = codebook[0, low] * (1 + i % 2)
    if metric != "cosine":
        dense = naive.distances(x, codebook, metric)  # exact: integers
    else:  # a score with the cosine ranking, exact for a copy scaled by 2
        cd = codebook.double()
        dense = -(x.double() @ cd.transpose(1, 2)) / cd.norm(dim=-1).unsqueeze(1)
    expected = dense.argmin(-1)  # first index among exact minima
    for i in range(0, n, 2):  # the test is not vacuous: these tokens tie exactly on their twins
        low, high = twins[i % len(twins)]
        assert dense[0, i, low] == dense[0, i, high] == dense[0, i].min()
    indices, _, _ = _run(x.to(device), codebook.to(device), metric, backend, precision)
    assert torch.equal(indices.cpu(), expected)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_equidistant_codes_tie_to_lowest_index(device, backend):
    """A token exactly between distinct codes: x = 0 against +e_j / -e_j all at distance 1."""
    d = 4
    codebook = torch.cat([torch.eye(d) * 2, -torch.eye(d), torch.eye(d)])  # ties among the last 2d rows
    x = torch.zeros(3, d)
    indices, distances, _ = _run(x.to(device), codebook.to(device), "l2", backend)
    assert indices.tolist() == [d] * 3
    assert distances.tolist() == [1.0] * 3


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
def test_code_splits_do_not_change_the_answer(device, backend, monkeypatch):
    """Splitting the codes over programs (small N) gives bitwise the same result as one program."""
    x, codebook = _inputs(2, 7, 1000, 24, torch.float32, device)
    config = _launch.search_config(7, 1000, 24, 2, "ieee", x.device)
    assert config["splits"] > 1, "this shape must exercise the split path"
    split = fastvq.nearest_code(x, codebook, backend=backend)
    monkeypatch.setattr(_launch, "target_programs", lambda device: 1)
    assert _launch.search_config(7, 1000, 24, 2, "ieee", x.device)["splits"] == 1
    whole = fastvq.nearest_code(x, codebook, backend=backend)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])


@pytest.mark.parametrize("device,backend", backend_cases(["cuda"]))
@pytest.mark.parametrize("k", [1, 5])
def test_cuda_code_splits_do_not_change_the_answer(device, backend, k, monkeypatch):
    """The CUDA search splits the codes over blocks for small N; the (score, index) merge gives
    bitwise the same indices and distances as one block per token tile."""
    cuda_search = importlib.import_module("fastvq.ops.cuda.nearest_code")  # the module, not the function
    x, codebook = _inputs(2, 7, 1000, 24, torch.float32, device)
    split = fastvq.topk_codes(x, codebook, k, backend=backend)
    monkeypatch.setattr(cuda_search, "target_programs", lambda device: 1)  # one split
    whole = fastvq.topk_codes(x, codebook, k, backend=backend)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])
    assert torch.equal(fastvq.nearest_code(x, codebook, backend=backend)[0], whole[0][..., 0])


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_non_finite_inputs(device, backend, metric):
    """Tokens with NaN/inf get index -1 and NaN distance; codes with NaN/inf are never chosen."""
    x = torch.randn(6, 9)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    codebook = torch.randn(40, 9)
    nearest_plain = naive.distances(x[None, [0, 2, 3, 5]], codebook[None], metric).argmin(-1)[0]
    codebook[nearest_plain[0]] = float("nan")  # the best code of token 0 becomes unusable
    codebook[nearest_plain[1], 2] = float("-inf")
    indices, distances, _ = _run(x.to(device), codebook.to(device), metric, backend)
    indices, distances = indices.cpu(), distances.cpu()
    assert indices[1] == -1 and indices[4] == -1
    assert distances[1].isnan() and distances[4].isnan()
    finite_tokens = [0, 2, 3, 5]
    assert (indices[finite_tokens] >= 0).all()
    bad_codes = {nearest_plain[0].item(), nearest_plain[1].item()}
    assert not bad_codes & set(indices[finite_tokens].tolist())
    good = [k for k in range(40) if k not in bad_codes]
    check_nearest(
        x[None, finite_tokens],
        codebook[None, good],
        torch.tensor([[good.index(i) for i in indices[finite_tokens].tolist()]]),
        distances[None, finite_tokens],
        metric,
        "ieee",
    )


@pytest.mark.parametrize("device,backend", backend_cases())
def test_all_codes_non_finite(device, backend):
    codebook = torch.full((5, 3), float("nan"))
    indices, distances, _ = _run(torch.randn(4, 3).to(device), codebook.to(device), "l2", backend)
    assert indices.tolist() == [-1] * 4 and distances.isnan().all()


@pytest.mark.parametrize("device,backend", backend_cases())
def test_non_contiguous_inputs(device, backend):
    wide = torch.randn(2, 50, 66, device=device)
    x = wide[:, ::2, 1::2]  # strided in N and D
    codebook = torch.randn(33, 70, device=device).t()  # (70, 33), column-major
    assert not x.is_contiguous() and not codebook.is_contiguous()
    got = fastvq.nearest_code(x, codebook, backend=backend)
    want = fastvq.nearest_code(x.contiguous(), codebook.contiguous(), backend=backend)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("device,backend", backend_cases())
def test_empty_x_and_output_shapes(device, backend):
    codebook = torch.randn(5, 4, device=device)
    indices, distances = fastvq.nearest_code(torch.randn(0, 4, device=device), codebook, backend=backend)
    assert indices.shape == (0,) and indices.dtype == torch.int64 and distances.dtype == torch.float32
    indices, distances = fastvq.nearest_code(torch.randn(2, 0, 4, device=device), codebook, backend=backend)
    assert indices.shape == (2, 0) and distances.shape == (2, 0)
    indices, distances = fastvq.nearest_code(torch.randn(3, 4, device=device), codebook, backend=backend)
    assert indices.shape == (3,) and distances.shape == (3,)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_inputs_are_not_modified(device, backend):
    x = torch.randn(2, 9, 5, device=device)
    codebook = torch.randn(2, 11, 5, device=device)
    x_before, codebook_before = x.clone(), codebook.clone()
    fastvq.nearest_code(x, codebook, metric="cosine", backend=backend)
    assert torch.equal(x, x_before) and torch.equal(codebook, codebook_before)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_large_dim(device, backend, metric):
    """D = 1024 (and a non-power-of-two D above one tile) stream the D axis in tiles."""
    for d in (1024, 1000):
        x, codebook = _inputs(1, 33, 40, d, torch.float32, device)
        indices, distances, used = _run(x, codebook, metric, backend)
        check_nearest(x, codebook, indices, distances, metric, used)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with > 8 GiB free")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_offsets_past_two_to_the_31(backend):
    """x with more than 2^31 elements: the last tokens must be answered like the first."""
    if backend not in fastvq.available_backends("cuda"):
        pytest.skip(unavailable_reason(backend, "cuda", build=False))
    n, d = (1 << 21) + 3, 1040  # 2.18e9 bf16 elements, 4.4 GB
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    codebook = torch.randn(64, d, device="cuda", dtype=torch.bfloat16)
    indices, distances = fastvq.nearest_code(x, codebook, backend=backend)
    tail = slice(n - 1000, n)
    want_indices, want_distances = fastvq.nearest_code(x[tail].clone(), codebook, backend="torch")
    check_nearest(x[None, tail].cpu(), codebook[None].cpu(), indices[None, tail], distances[None, tail], "l2", "bf16")
    assert (indices[tail] == want_indices).float().mean() > 0.99
