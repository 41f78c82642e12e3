"""Values near the fp32 limit (3e38), on every backend that runs here, against the oracle's rule
(`fastvq.ops.naive`): a code whose score or |c|^2 is not finite in fp32 (NaN, inf, overflow) is never
chosen; a chosen code whose distance is not finite becomes -1 / NaN, after the valid codes of a
top-k list (valid ones in ascending score, ties to the lower index); identical tokens get identical
answers.

Backends add up x.c in fp32, each in its own order, so where a partial sum overflows although the exact
score would not, whether that code counts is the backend's business. The exact cases below leave no
such room (`assert_unambiguous` checks it); the property cases draw anything near the limit and check
only what holds in any order.
"""

import pytest
import torch
from conftest import backend_cases

import fastvq
from fastvq.ops import naive
from fastvq.ops.common import METRICS

FLT_MAX = torch.finfo(torch.float32).max
MARGIN = 0.02
"""Exact values within this relative distance of the fp32 limit could round either way."""


def assert_unambiguous(x, codebook, metric):
    """Every exact quantity a backend computes in fp32 (|c|^2, x.c and its double, the score, the distance)
    is either clearly inside the fp32 range or clearly past it, a score that fits never needs an
    intermediate that does not, and two scores in the range are equal or further apart than fp32 rounding
    can move them; with D = 1 there is no order of additions to differ in."""
    assert x.shape[-1] == 1, "one dimension: no order of additions"
    xd, cd = x.double(), codebook.double().expand(x.shape[0], -1, -1)
    dot = xd @ cd.mT
    code_sq = cd.square().sum(-1).unsqueeze(1)
    score = {"l2": code_sq - 2 * dot, "dot": -dot, "cosine": -dot / code_sq.sqrt()}[metric]
    product = 2 * dot if metric == "l2" else dot  # what the backends compute before the score
    for name, value in (
        ("|c|^2", code_sq),
        ("product", product),
        ("score", score),
        ("distance", naive.distances(x, codebook, metric)),
    ):
        near = ((value.abs() / FLT_MAX - 1).abs() < MARGIN) & value.isfinite()
        assert not near.any(), f"{name} too near the fp32 limit: {value[near].tolist()}"
    fits = (score.abs() < FLT_MAX) & (code_sq < FLT_MAX)
    assert not (fits & (product.abs() > FLT_MAX)).any(), "a score in the range needs a product past it"
    rounding = 2.0**-22 * {"l2": code_sq + product.abs(), "dot": product.abs(), "cosine": score.abs()}[metric]
    ordered, order = score.masked_fill(~fits, float("inf")).sort(dim=-1)
    bound = rounding.expand_as(score).gather(-1, order)
    gap = ordered.diff(dim=-1)
    near_tie = (gap > 0) & (gap <= bound[..., 1:] + bound[..., :-1]) & ordered[..., 1:].isfinite()
    assert not near_tie.any(), f"two scores within fp32 rounding of each other: {ordered[..., 1:][near_tie].tolist()}"


def _run(x, codebook, metric, backend, device, k):
    indices, distances = fastvq.topk_codes(x.to(device), codebook.to(device), k, metric=metric, backend=backend)
    nearest, nearest_distances = fastvq.nearest_code(x.to(device), codebook.to(device), metric=metric, backend=backend)
    return indices.cpu(), distances.cpu(), nearest.cpu(), nearest_distances.cpu()


def _check_against_oracle(x, codebook, metric, device, backend):
    assert_unambiguous(x[None], codebook[None], metric)
    k = codebook.shape[0]
    indices, distances, nearest, nearest_distances = _run(x, codebook, metric, backend, device, k)
    want, want_distances = naive.topk_codes(x[None], codebook[None], k, metric=metric)
    assert torch.equal(indices, want[0]), f"got {indices.tolist()}, want {want[0].tolist()}"
    torch.testing.assert_close(distances.double(), want_distances[0], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(nearest, want[0, :, 0])
    torch.testing.assert_close(nearest_distances, distances[:, 0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_a_score_past_the_range_is_never_chosen(device, backend):
    """l2, x = 2e19: the code at 1.5e19 is the nearest (distance 2.5e37) but its score |c|^2 - 2 x.c =
    -3.75e38 is past the fp32 range, so the code at 2e18 (score -7.6e37, distance 3.24e38) is chosen; the
    code at 0 (distance 4e38, past the range) and the one at -1 become -1 after it. A backend that lets a
    score overflow to -inf win picks 1.5e19."""
    x = torch.tensor([[2e19], [1.0], [-2e19]])
    codebook = torch.tensor([[0.0], [1.5e19], [2e18], [-1.0]])
    _check_against_oracle(x, codebook, "l2", device, backend)
    assert fastvq.nearest_code(x[:1].to(device), codebook.to(device), backend=backend)[0].tolist() == [2]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_codes_past_the_range_are_never_chosen(device, backend, metric):
    """Codes whose |c|^2 overflows (2^65, -2^127) or that hold inf are never chosen, whatever the metric,
    even where they would be the nearest; the others rank as the oracle ranks them. (Powers of two: the
    cosine scores of one dimension, +-|x|, are then exact in fp32 too, and their ties are exact.)"""
    x = torch.tensor([[0.5], [-0.25], [3.0], [1e18], [-1e18], [0.0]])
    codebook = torch.tensor([[2.0**65], [0.5], [-(2.0**127)], [-1.0], [float("inf")], [2.0**56], [-4.0]])
    _check_against_oracle(x, codebook, metric, device, backend)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_huge_tokens_against_the_oracle(device, backend, metric):
    """Tokens up to 3e38 against codes up to 1e19: scores and distances past the range give no code,
    or -1 entries after the valid ones."""
    x = torch.tensor([[3e38], [-3e38], [3e19], [-1e19], [1e19], [2e18], [1.0]])
    codebook = torch.tensor([[1e19], [-1.0], [0.5], [3e18], [-4e18], [0.0]])
    _check_against_oracle(x, codebook, metric, device, backend)


ORDER_SENSITIVE_TOKENS = [[0.0, 1e38, -1e38, 0.0, -3e38], [0.0, -2.4e38, 1e38, 0.0, 3e38]]
"""Tokens whose product with a code of ones fits fp32 (-3e38, 1.6e38) but overflows when the additions
pair the terms another way (-1e38 - 3e38, 1e38 + 3e38 first)."""


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_identical_tokens_get_identical_answers(device, backend, metric):
    """Twelve copies of a token whose x.c overflows in some orders of the additions, against 9 codes (a
    shape at which MKL's sgemm adds every fourth row in another order): one answer for every copy."""
    codebook = torch.cat([torch.ones(1, 5), torch.randn(8, 5)])
    for token in ORDER_SENSITIVE_TOKENS:
        x = torch.tensor(token).expand(12, 5).contiguous()
        indices, distances, nearest, nearest_distances = _run(x, codebook, metric, backend, device, 9)
        for got in (indices, distances, nearest, nearest_distances):
            torch.testing.assert_close(got, got[:1].expand_as(got), rtol=0, atol=0, equal_nan=True)


def _assert_valid_first(indices, distances):
    """-1 entries, and only they, have NaN distances, and none comes before a valid entry."""
    valid = indices >= 0
    assert torch.equal(valid, ~distances.isnan()) and distances[valid].isfinite().all()
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), f"a -1 entry before a valid one: {indices.tolist()}"


@pytest.mark.parametrize("device,backend", backend_cases())
def test_a_chosen_code_whose_distance_overflows_comes_after_the_valid_ones(device, backend):
    """dot: the token's product with the code of ones is -2.61e38 added left to right, but overflows when
    3e38 and 6.1e37 meet first; a backend whose search adds one way and whose distance the other finds
    that code nearest, then no finite distance: its -1 goes after the two valid codes, not before."""
    x = torch.tensor([0.0, 6.1e37, -1e38, 0.0, 3e38]).expand(12, 5).contiguous()
    codebook = torch.stack([torch.ones(5), torch.zeros(5), torch.full((5,), -1e-3)])
    indices, distances, nearest, _ = _run(x, codebook, "dot", backend, device, 3)
    _assert_valid_first(indices, distances)
    assert indices[0].tolist() in ([1, 2, -1], [0, 1, 2])  # code 0 dropped last, or kept first


def _near_limit_batch(seed: int, dim: int):
    """Tokens and codes of magnitudes from 1 to 3e38, both signs, some zero; every token twice, 12 rows apart."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.tensor([0.0, 1.0, 2.5, 1e19, 1.5e19, 1e38, 2e38, 3e38])

    def draw(rows):
        picked = magnitudes[torch.randint(0, len(magnitudes), (rows, dim), generator=generator)]
        signs = torch.where(torch.rand(rows, dim, generator=generator) < 0.5, -1.0, 1.0)
        return picked * signs * torch.where(torch.rand(rows, dim, generator=generator) < 0.5, 1.0, 0.37)

    x = draw(12)
    return torch.cat([x, x]), draw(9)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [2, 3, 5])
def test_rules_that_hold_in_any_order(device, backend, metric, dim):
    """On random batches near the limit: identical tokens get identical indices and distances (bitwise),
    -1 entries (and only they) have NaN distances and come after every valid entry, a valid entry has a
    finite distance and never a code whose |c|^2 overflows, and where the nearest code is valid it is the
    first of the top-k (where its distance is not, the top-k list starts with the next valid code)."""
    for seed in range(8):
        x, codebook = _near_limit_batch(seed * 10 + dim, dim)
        indices, distances, nearest, nearest_distances = _run(x, codebook, metric, backend, device, 4)
        half = x.shape[0] // 2
        for got in (indices, distances, nearest, nearest_distances):
            torch.testing.assert_close(
                got[:half],
                got[half:],
                rtol=0,
                atol=0,
                equal_nan=True,
                msg=lambda m: f"seed {seed}: identical tokens differ: {m}",
            )
        _assert_valid_first(indices, distances)
        valid = indices >= 0
        overflowing = ~torch.isfinite(codebook.double().square().sum(-1).float())
        assert not overflowing[indices[valid]].any(), f"seed {seed}: a code whose |c|^2 overflows was chosen"
        found = nearest >= 0
        assert torch.equal(indices[found, 0], nearest[found]), f"seed {seed}"
        assert torch.equal(distances[found, 0], nearest_distances[found]), f"seed {seed}"
