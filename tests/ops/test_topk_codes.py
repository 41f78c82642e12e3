"""topk_codes: every backend against the dense float64 oracle (a stable sort of `fastvq.ops.naive.distances`).

Tolerance rule: as `vq_checks` (a score's rounding error is at most `tolerance`), so the j-th
returned distance is within 2 tolerances of the true j-th smallest, the returned set is exact
wherever the k-th and (k+1)-th true distances are farther apart than that, and the order is exact
wherever every consecutive gap is.
"""

import pytest
import torch
from conftest import backend_cases, case
from vq_checks import distance_scale, tolerance

import fastvq.ops.functional as F
from fastvq.ops import naive
from fastvq.ops.common import METRICS
from fastvq.ops.triton import _launch
from fastvq.ops.triton._launch import interpreted_precision

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(7, 3, 8, 3), (301, 259, 33, 16), (1, 130, 200, 5), (33, 300, 20, 7), (64, 70, 1, 2)]  # N, K, D, k


def _run(x, codebook, k, metric, backend, precision=None):
    indices, distances = F.topk_codes(x, codebook, k, metric=metric, backend=backend, precision=precision)
    used = F.resolve_precision(precision, x.dtype, codebook.dtype)
    return indices, distances, interpreted_precision(used) if backend == "triton" else used


def check_topk(x, codebook, indices, distances, k, metric, precision):
    """Assert (H, N, k) indices/distances are a correct top-k answer for canonical inputs."""
    x, codebook, indices, distances = x.cpu(), codebook.cpu(), indices.cpu(), distances.cpu()
    dense = naive.distances(x, codebook, metric)
    tol = 2 * tolerance(x, codebook, metric, precision)[..., None]
    true_sorted, true_index = dense.sort(dim=-1, stable=True)
    assert indices.shape == distances.shape == (*x.shape[:2], k)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert ((indices >= 0) & (indices < codebook.shape[1])).all(), "index out of range"
    assert (indices.sort(dim=-1).values.diff(dim=-1) != 0).all(), "a code chosen twice"
    chosen = dense.gather(-1, indices)
    off = (chosen - true_sorted[..., :k]).abs()
    assert (off <= tol).all(), f"slot distance off by {off.max().item():.3g}"
    if k < codebook.shape[1]:
        clear_set = (true_sorted[..., k] - true_sorted[..., k - 1]) > tol[..., 0]
        assert torch.equal(indices.sort(-1).values[clear_set], true_index[..., :k].sort(-1).values[clear_set])
    clear_order = (true_sorted[..., : k + 1].diff(dim=-1) > tol).all(dim=-1)
    assert torch.equal(indices[clear_order], true_index[..., :k][clear_order])
    scale = distance_scale(x, codebook, metric)
    dist_tol = 1e-5 * (1 + chosen.abs()) + 8 * x.shape[-1] * 2.0**-24 * scale[..., None]
    assert ((distances.double() - chosen).abs() <= dist_tol).all(), "distances are not exact fp32"


def _brute_force_cases():
    """Every shape with every metric; heads, shared codebooks and dtypes rotate over the cases."""
    cases = []
    for i in range(len(CASES) * len(METRICS)):
        (n, n_codes, d, k), metric = CASES[i // len(METRICS)], METRICS[i % len(METRICS)]
        heads, shared = [(1, False), (3, False), (2, True)][i % 3]
        cases.append(case(N=n, K=n_codes, D=d, k=k, H=heads, shared=shared, dtype=DTYPES[(i // 2) % 3], metric=metric))
    return cases


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("N,K,D,k,H,shared,dtype,metric", _brute_force_cases())
def test_matches_float64_brute_force(device, backend, N, K, D, k, H, shared, dtype, metric):
    x = torch.randn(H, N, D).to(dtype).to(device)
    codebook = torch.randn(1 if shared else H, K, D).to(dtype).to(device)
    indices, distances, used = _run(x, codebook, k, metric, backend)
    check_topk(x, codebook, indices, distances, k, metric, used)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_first_slot_is_nearest_code(device, backend, metric):
    x, codebook = torch.randn(2, 301, 33, device=device), torch.randn(259, 33, device=device)
    indices, distances = F.topk_codes(x, codebook, 4, metric=metric, backend=backend)
    nearest, nearest_distances = F.nearest_code(x, codebook, metric=metric, backend=backend)
    assert torch.equal(indices[..., 0], nearest)
    assert torch.equal(distances[..., 0], nearest_distances)
    one, _ = F.topk_codes(x, codebook, 1, metric=metric, backend=backend)
    assert torch.equal(one[..., 0], nearest)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n_codes", [259, 1100])
def test_exact_ties_go_to_lowest_index(device, backend, metric, n_codes):
    """Integer-valued data make every product exact; duplicated codes (also in different code tiles
    and splits: K = 1100 spans three of the reference's 512-code tiles) and equidistant codes must
    come out in index order."""
    d = 5
    codebook = torch.randint(-2, 3, (n_codes, d)).float()
    x = torch.randint(-2, 3, (40, d)).float()
    for low, high in [(3, n_codes - 59), (64, 65), (10, n_codes - 1), (127, 128), (0, 1)]:
        codebook[high] = codebook[low] * (2.0 if metric == "cosine" else 1.0)  # same cosine when scaled
    x[::2] = codebook[[3, 64, 10, 127, 0]].repeat(4, 1)  # tokens sitting on the twins
    if metric != "cosine":
        score = naive.distances(x[None], codebook[None], metric)[0]  # exact: integers
    else:  # a score with the cosine ranking, exact for a copy scaled by 2
        score = -(x.double() @ codebook.double().T) / codebook.double().norm(dim=-1).clamp_min(1e-12)
    expected = score.sort(dim=-1, stable=True).indices[:, :9]
    assert (score.sort(dim=-1).values[:, :9].diff(dim=-1) == 0).any(), "the test must contain ties"
    indices, _ = F.topk_codes(x.to(device), codebook.to(device), 9, metric=metric, backend=backend)
    assert torch.equal(indices.cpu(), expected)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
def test_code_splits_do_not_change_the_answer(device, backend, monkeypatch):
    """Splitting the codes over programs (small N) merges to bitwise the same lists as one program."""
    x, codebook = torch.randn(2, 7, 24, device=device), torch.randn(2, 1000, 24, device=device)
    assert _launch.search_config(7, 1000, 24, 2, "ieee", x.device, 8)["splits"] > 1
    split = F.topk_codes(x, codebook, 8, backend=backend)
    monkeypatch.setattr(_launch, "target_programs", lambda device: 1)
    assert _launch.search_config(7, 1000, 24, 2, "ieee", x.device, 8)["splits"] == 1
    whole = F.topk_codes(x, codebook, 8, backend=backend)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])


@pytest.mark.parametrize("device,backend", backend_cases())
def test_non_finite_inputs(device, backend):
    """Codes with NaN/inf are never chosen; slots past the finite codes get -1 / NaN; NaN tokens
    get -1 everywhere."""
    codebook = torch.randn(6, 4)
    codebook[[1, 4], 2] = torch.tensor([float("nan"), float("inf")])
    x = torch.randn(5, 4)
    x[3, 0] = float("nan")
    indices, distances = F.topk_codes(x.to(device), codebook.to(device), 6, backend=backend)
    indices, distances = indices.cpu(), distances.cpu()
    finite = [0, 1, 2, 4]
    assert (indices[finite, 4:] == -1).all() and distances[finite, 4:].isnan().all()
    assert (indices[3] == -1).all() and distances[3].isnan().all()
    good = torch.tensor([0, 2, 3, 5])
    dense = naive.distances(x[None, finite], codebook[None, good], "l2")[0]
    assert torch.equal(indices[finite, :4], good[dense.sort(dim=-1, stable=True).indices])


@pytest.mark.parametrize("device,backend", backend_cases())
def test_non_contiguous_inputs_and_shapes(device, backend):
    wide = torch.randn(2, 50, 66, device=device)
    x = wide[:, ::2, 1::2]
    codebook = torch.randn(33, 70, device=device).t()
    got = F.topk_codes(x, codebook, 3, backend=backend)
    want = F.topk_codes(x.contiguous(), codebook.contiguous(), 3, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    indices, distances = F.topk_codes(x[0], codebook, 3, backend=backend)
    assert indices.shape == distances.shape == (25, 3)
    indices, distances = F.topk_codes(x[:, :0], codebook, 3, backend=backend)
    assert indices.shape == (2, 0, 3) and distances.dtype == torch.float32


def test_bad_arguments_are_named():
    x, codebook = torch.randn(4, 3), torch.randn(20, 3)
    for k in (0, 17, -1):
        with pytest.raises(ValueError, match="k must be in"):
            F.topk_codes(x, codebook, k)
    with pytest.raises(ValueError, match="K=5"):
        F.topk_codes(x, codebook[:5], 6)
    for k in (2.0, True):
        with pytest.raises(TypeError, match="k must be an int"):
            F.topk_codes(x, codebook, k)
    with pytest.raises(ValueError, match="x must have shape"):
        F.topk_codes(x[0], codebook, 2)
    with pytest.raises(ValueError, match="metric"):
        F.topk_codes(x, codebook, 2, metric="hamming")
