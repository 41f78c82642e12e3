"""Property-based tests of the op contract (docs/ops.md, docs/backends.md) on every backend that runs here.

Hypothesis draws the case (`tests/strategies.py`: N from 0, K, D, heads shared or per head, fp32 /
fp16 / bf16, metric, precision, contiguous or strided, planted exact ties, planted NaN / inf, values
near the fp32 limit); each result is checked against the dense float64 oracle (`fastvq.ops.naive`)
with the error-derived tolerances of `vq_checks`, and against the rules the docs state: lowest index
on ties, -1 and NaN for a token with no finite answer, valid entries before -1 in a top-k list, the
exact fp32 distance of the chosen code, a regret within the bound of the precision used, outputs of
the documented shapes, dtypes and device, and no input modified. Examples per property: the
hypothesis profile (tests/conftest.py; HYPOTHESIS_PROFILE=long for a long run, docs/testing.md).
"""

import contextlib

import pytest
import torch
from conftest import REFERENCE_ON_CPU, backend_cases
from hypothesis import assume
from hypothesis import strategies as st
from strategies import (
    PRECISIONS,
    SearchCase,
    backend_property,
    near_limit_cases,
    search_cases,
    seeds,
    stats_cases,
    topk_ks,
)
from test_fp32_limits import _assert_valid_first, _check_against_oracle, assert_unambiguous
from test_topk_codes import check_topk
from vq_checks import UNIT_ROUNDOFF, check_nearest, tolerance

import fastvq
from fastvq.ops import naive, philox
from fastvq.ops.functional import resolve_precision
from fastvq.ops.triton._launch import interpreted_precision

ALL_BACKENDS = backend_cases()
REFERENCE_BACKENDS = backend_cases(REFERENCE_ON_CPU)  # the ops that the "cpu" backend runs with "torch"


def used_precision(case: SearchCase, precision: str | None, backend: str) -> str:
    """The precision the backend ranks with (the interpreter ranks tf32 and bf16 in exact fp32)."""
    used = resolve_precision(precision, case.x.dtype, case.codebook.dtype)
    return interpreted_precision(used) if backend == "triton" else used


@contextlib.contextmanager
def inputs_kept(*tensors):
    """Asserts that every tensor holds the same values (NaN included) after the block as before it."""
    before = [t.clone() for t in tensors]
    yield
    for index, (tensor, kept) in enumerate(zip(tensors, before)):
        torch.testing.assert_close(tensor, kept, rtol=0, atol=0, equal_nan=True, msg=f"input {index} was modified")


def with_heads(t: torch.Tensor, case: SearchCase) -> torch.Tensor:
    """An op's output shaped x.shape[:-1] (+ (k,)) as (H, N) (+ (k,))."""
    return t if case.x.dim() == 3 else t.unsqueeze(0)


def output_on_cpu(t: torch.Tensor, case: SearchCase, device: str, dtype: torch.dtype, *trailing: int) -> torch.Tensor:
    """Asserts that an op's output is shaped x.shape[:-1] (+ trailing), of `dtype`, on `device`; returns it
    on the CPU."""
    assert t.shape == (*case.x.shape[:-1], *trailing), f"shape {tuple(t.shape)} for x {tuple(case.x.shape)}"
    assert t.dtype == dtype and t.device.type == torch.device(device).type, f"{t.dtype} on {t.device}"
    return t.cpu()


def usable_tokens(x3: torch.Tensor) -> torch.Tensor:
    """(H, N): tokens without a NaN or inf entry."""
    return torch.isfinite(x3).all(-1)


def usable_codes(codebook3: torch.Tensor) -> torch.Tensor:
    """(Hc, K): codes whose |c|^2 is finite in fp32 (which a code with a NaN or inf entry's is not)."""
    return torch.isfinite(codebook3.double().square().sum(-1).float())


def lower_twins(codebook3: torch.Tensor, metric: str) -> torch.Tensor:
    """(Hc, K, K) bool, [h, j, i]: i < j and code i ties code j exactly for every token (the same row;
    for cosine also one row twice the other, whose cosines are the same bits)."""
    c = codebook3.float()
    twin = (c[:, :, None] == c[:, None]).all(-1)
    if metric == "cosine":
        twin |= (c[:, :, None] == 2 * c[:, None]).all(-1) | (2 * c[:, :, None] == c[:, None]).all(-1)
    n_codes = c.shape[1]
    return twin & (torch.arange(n_codes)[None, :] < torch.arange(n_codes)[:, None])


def assert_lowest_index_on_ties(case: SearchCase, indices: torch.Tensor) -> None:
    """indices (H, N, k): every chosen code's lower-index twins come before it in its list."""
    lower = lower_twins(case.codebook3, case.metric)
    heads = torch.arange(indices.shape[0]) % lower.shape[0]
    chosen = indices.clamp_min(0)
    needed = lower[heads[:, None, None], chosen] & (indices >= 0).unsqueeze(-1)  # (H, N, k, K)
    listed = torch.nn.functional.one_hot(chosen, lower.shape[1]).bool() & (indices >= 0).unsqueeze(-1)
    before = (listed.long().cumsum(2) - listed.long()).bool()
    missing = needed & ~before
    assert not missing.any(), f"a code came before its lower-index twin at {missing.nonzero()[0].tolist()}"


def per_head_subsets(case: SearchCase):
    """For each head with usable tokens: (head, codebook head, its usable tokens (N,) bool, its usable
    codes (K',) int64, position of each code among them (K,), -1 for the others)."""
    good_tokens, good_codes = usable_tokens(case.x3), usable_codes(case.codebook3)
    for head in range(case.x3.shape[0]):
        code_head = head % case.codebook3.shape[0]
        codes = good_codes[code_head].nonzero().flatten()
        position = torch.full((good_codes.shape[1],), -1, dtype=torch.int64)
        position[codes] = torch.arange(codes.numel())
        if good_tokens[head].any():
            yield head, code_head, good_tokens[head], codes, position


def check_search(case: SearchCase, indices: torch.Tensor, distances: torch.Tensor, precision: str) -> None:
    """Top-k lists (H, N, k) (nearest_code: k = 1) against the rules and the oracle: no answer for an
    unusable token; min(k, usable codes) valid entries, then -1 / NaN; never an unusable code;
    `check_topk` (regret bound, the clear set and order, exact fp32 distances) on the usable tokens
    and codes; lowest index on ties; in the "ties" regime (exact integers) l2 and dot give exactly
    the oracle's lists."""
    k = indices.shape[-1]
    _assert_valid_first(indices, distances)
    bad = ~usable_tokens(case.x3)
    assert (indices[bad] == -1).all(), "a token with a NaN or inf entry got a code"
    for head, code_head, tokens, codes, position in per_head_subsets(case):
        got, got_distances = indices[head, tokens], distances[head, tokens]
        valid = min(k, codes.numel())
        assert (got[:, :valid] >= 0).all() and (got[:, valid:] == -1).all(), f"head {head}: {got.tolist()}"
        if valid:
            assert (position[got[:, :valid]] >= 0).all(), "a code with a non-finite |c|^2 was chosen"
            check_topk(
                case.x3[head : head + 1, tokens],
                case.codebook3[code_head : code_head + 1, codes],
                position[got[:, :valid]][None],
                got_distances[None, :, :valid],
                valid,
                case.metric,
                precision,
            )
    assert_lowest_index_on_ties(case, indices)
    if case.regime == "ties" and case.metric != "cosine":
        want, want_distances = naive.topk_codes(case.x3, case.codebook3, k, metric=case.metric, precision=precision)
        assert torch.equal(indices, want), f"got {indices.tolist()}, want {want.tolist()}"
        torch.testing.assert_close(distances, want_distances.float(), rtol=0, atol=0, equal_nan=True)


@backend_property(ALL_BACKENDS, case=search_cases(), precision=st.sampled_from(PRECISIONS))
def test_nearest_code(device, backend, case, precision):
    """nearest_code: `check_search` with k = 1 and vq_checks' nearest-code rule on the usable tokens and codes."""
    on_device = case.on(device)
    with inputs_kept(on_device.x, on_device.codebook):
        indices, distances = fastvq.nearest_code(
            on_device.x, on_device.codebook, metric=case.metric, precision=precision, backend=backend
        )
    indices = output_on_cpu(indices, case, device, torch.int64)
    distances = output_on_cpu(distances, case, device, torch.float32)
    used = used_precision(case, precision, backend)
    indices, distances = with_heads(indices, case), with_heads(distances, case)
    check_search(case, indices[..., None], distances[..., None], used)
    for head, code_head, tokens, codes, position in per_head_subsets(case):
        if codes.numel():
            check_nearest(
                case.x3[head : head + 1, tokens],
                case.codebook3[code_head : code_head + 1, codes],
                position[indices[head, tokens]][None],
                distances[head, tokens][None],
                case.metric,
                used,
            )


@backend_property(ALL_BACKENDS, data=st.data(), case=search_cases(), precision=st.sampled_from(PRECISIONS))
def test_topk_codes(device, backend, data, case, precision):
    """topk_codes: `check_search`, and the first slot is nearest_code's answer, bit for bit."""
    k, on_device = data.draw(topk_ks(case), label="k"), case.on(device)
    with inputs_kept(on_device.x, on_device.codebook):
        indices, distances = fastvq.topk_codes(
            on_device.x, on_device.codebook, k, metric=case.metric, precision=precision, backend=backend
        )
        nearest, nearest_distances = fastvq.nearest_code(
            on_device.x, on_device.codebook, metric=case.metric, precision=precision, backend=backend
        )
    indices, nearest = output_on_cpu(indices, case, device, torch.int64, k), nearest.cpu()
    distances, nearest_distances = output_on_cpu(distances, case, device, torch.float32, k), nearest_distances.cpu()
    check_search(case, with_heads(indices, case), with_heads(distances, case), used_precision(case, precision, backend))
    assert torch.equal(indices[..., 0], nearest), "the first slot is not nearest_code's answer"
    torch.testing.assert_close(distances[..., 0], nearest_distances, rtol=0, atol=0, equal_nan=True)


@backend_property(ALL_BACKENDS, data=near_limit_cases(), k=st.integers(1, 12))
def test_near_the_fp32_limit(device, backend, data, k):
    """Values up to 3e38: the rules that hold in any order of the additions (tests/ops/test_fp32_limits.py):
    identical tokens get identical answers, -1 entries (only they NaN) after the valid ones, never a
    code whose |c|^2 overflows, nearest_code's valid answer first in the top-k list."""
    x, codebook, metric = data
    k, x_on_device, codebook_on_device = min(k, codebook.shape[0]), x.to(device), codebook.to(device)
    with inputs_kept(x_on_device, codebook_on_device):
        answers = (
            *fastvq.topk_codes(x_on_device, codebook_on_device, k, metric=metric, backend=backend),
            *fastvq.nearest_code(x_on_device, codebook_on_device, metric=metric, backend=backend),
        )
    indices, distances, nearest, nearest_distances = (answer.cpu() for answer in answers)
    first = (x[:, None] == x[None]).all(-1).long().argmax(1)  # the first row equal to each row
    for got in (indices, distances, nearest, nearest_distances):
        torch.testing.assert_close(
            got, got[first], rtol=0, atol=0, equal_nan=True, msg=lambda m: f"identical tokens differ: {m}"
        )
    _assert_valid_first(indices, distances)
    _assert_valid_first(nearest[:, None], nearest_distances[:, None])
    assert usable_codes(codebook[None])[0][indices[indices >= 0]].all(), "a code whose |c|^2 overflows was chosen"
    found = nearest >= 0
    assert torch.equal(indices[found, 0], nearest[found])
    assert torch.equal(distances[found, 0], nearest_distances[found])


@backend_property(ALL_BACKENDS, data=near_limit_cases(max_dim=1, exact=True))
def test_near_the_fp32_limit_exactly(device, backend, data):
    """One dimension (no order of additions to differ in), values whose products are exact in fp32 (so
    are the ties), every quantity clearly inside or past the fp32 range: exactly the oracle's top-k
    lists (test_fp32_limits' rule, on drawn cases)."""
    x, codebook, metric = data
    try:
        assert_unambiguous(x[None], codebook[None], metric)
    except AssertionError:
        assume(False)
    _check_against_oracle(x, codebook, metric, device, backend)


def perturbed_logits(case: SearchCase, temperature: float, seed: int, precision: str) -> torch.Tensor:
    """(H, N, K) float64: logit / T + the Philox Gumbel noise of each (token, code), as the oracle draws."""
    heads, n_tokens, _ = case.x3.shape
    n_codes = case.codebook3.shape[1]
    counters = torch.arange(heads * n_tokens * n_codes).view(heads, n_tokens, n_codes)
    gumbel = -torch.log(-torch.log(philox.uniform(seed, counters).double()))
    return naive.logits(case.x3, case.codebook3, case.metric, precision) / temperature + gumbel


def clear_draws(case: SearchCase, temperature: float, seed: int, precision: str, k: int) -> torch.Tensor:
    """(H, N) bool: tokens whose k + 1 best perturbed logits are further apart than fp32 rounding of the
    logits (`vq_checks.tolerance` of the distances, through the square root for l2) can move them."""
    tol = tolerance(case.x3.float(), case.codebook3.float(), case.metric, precision)
    tol = (tol.sqrt() if case.metric == "l2" else tol) / temperature + 1e-4
    top = perturbed_logits(case, temperature, seed, precision).topk(min(k + 1, case.codebook3.shape[1]), dim=-1)
    return (-top.values.diff(dim=-1) > 4 * tol[..., None]).all(-1)


@backend_property(
    REFERENCE_BACKENDS,
    data=st.data(),
    case=search_cases(),
    precision=st.sampled_from(PRECISIONS),
    seed=st.integers(0, 2**63 - 1),
    temperature=st.sampled_from((1.0, 0.3, 3.0, 0.01, 0.0, -1.0)),
    with_k=st.booleans(),
)
def test_sample_code(device, backend, data, case, precision, seed, temperature, with_k):
    """sample_code: the oracle's draw (it replays the Philox stream) wherever fp32 rounding cannot reorder
    the perturbed logits; -1 exactly where the oracle has no code; with k, distinct codes, valid ones
    first, the first one the k=None draw; temperature <= 0: topk_codes' codes."""
    k, on_device = data.draw(topk_ks(case), label="k") if with_k else None, case.on(device)
    with inputs_kept(on_device.x, on_device.codebook):
        got = fastvq.sample_code(
            on_device.x,
            on_device.codebook,
            temperature=temperature,
            k=k,
            metric=case.metric,
            seed=seed,
            precision=precision,
            backend=backend,
        )
        single = fastvq.sample_code(
            on_device.x,
            on_device.codebook,
            temperature=temperature,
            metric=case.metric,
            seed=seed,
            precision=precision,
            backend=backend,
        )
    got = output_on_cpu(got, case, device, torch.int64, *([k] if k else []))
    got = with_heads(got, case).reshape(*case.x3.shape[:2], k or 1)
    assert torch.equal(got[..., 0], with_heads(single.cpu(), case)), "the first of the k draws is not the k=None draw"
    _assert_valid_first(got, torch.where(got >= 0, 0.0, float("nan")))
    ordered = got.sort(dim=-1).values
    assert not ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(), "a code drawn twice"
    used = used_precision(case, precision, backend)
    if temperature <= 0:
        want, _ = fastvq.topk_codes(
            on_device.x, on_device.codebook, k or 1, metric=case.metric, precision=precision, backend=backend
        )
        assert torch.equal(got, with_heads(want.cpu(), case))
        return
    want = naive.sample_code(
        case.x3, case.codebook3, temperature=temperature, seed=seed, k=k or 1, metric=case.metric, precision=used
    )
    assert torch.equal(got < 0, want < 0), f"-1 where the oracle has a code, or the reverse: {got} vs {want}"
    clear = clear_draws(case, temperature, seed, used, k or 1) | (want[..., 0] < 0)
    assert torch.equal(got[clear], want[clear]), f"{int((got != want)[clear].any(-1).sum())} clear draws differ"


def cross_entropy_rounding_bounds(
    case: SearchCase, indices3: torch.Tensor, grad3: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bounds (float64) on the error that fp32 rounding of the logits causes in code_cross_entropy, of
    the loss (H, N), the x gradient (H, N, 1) and the codebook gradient (Hc, K, 1), where a
    scale-relative tolerance does not cover it: near a code (l2) and where the softmax weights cancel
    against a large shared mean. With unit roundoff u and fp32 sums of D terms (`vq_checks`' rule),
    x.c is off by up to e = 4 (D + 2) u |x| |c| (cosine: e / (|x| |c|)), |x - c|^2 by up to
    4 (D + 2) u (|x|^2 + |c|^2), which moves the l2 logit -|x - c| = -d by min(e / 2d, sqrt(e)) and
    the direction (x - c) / d of its gradient by min(e / 2d^2, 2); the softmax weights p move by up
    to twice the largest logit move. A logit's gradient is at most 1 (l2), |c| or |x| (dot), 2 / |x|
    or 2 / |c| (cosine) in x and in c."""
    heads, n_tokens, dim = case.x3.shape
    logit = naive.logits(case.x3, case.codebook3, case.metric, precision)
    p = (logit - logit.logsumexp(-1, keepdim=True)).exp()
    g = torch.where(indices3 < 0, 0.0, grad3.double()).abs().unsqueeze(-1)  # (H, N, 1)
    sq_x = case.x3.double().square().sum(-1).unsqueeze(-1)  # (H, N, 1)
    sq_c = case.codebook3.double().square().sum(-1)[torch.arange(heads) % case.codebook3.shape[0]][:, None]  # (H, 1, K)
    u = 4 * (dim + 2) * UNIT_ROUNDOFF[precision]
    direction_move = torch.zeros_like(logit)
    if case.metric == "l2":
        e, distance = u * (sq_x + sq_c), -logit  # distance: sqrt(max(d^2, L2_LOGIT_EPS))
        logit_move = torch.minimum(e / (2 * distance), e.sqrt())
        direction_move = (e / (2 * distance.square())).clamp_max(2)
        slope_x, slope_c = torch.ones_like(logit), torch.ones_like(logit)
    elif case.metric == "dot":
        logit_move = u * (sq_x * sq_c).sqrt()
        slope_x, slope_c = sq_c.sqrt().expand_as(logit), sq_x.sqrt().expand_as(logit)
    else:
        logit_move = torch.full_like(logit, u)
        slope_x = (2 / sq_x.sqrt().clamp_min(1e-12)).expand_as(logit)
        slope_c = (2 / sq_c.sqrt().clamp_min(1e-12)).expand_as(logit)
    weight_move = (2 * logit_move.amax(-1, keepdim=True)).clamp_max(2)
    w = (p - torch.nn.functional.one_hot(indices3.clamp_min(0), logit.shape[-1])).abs()
    loss = torch.where(indices3 < 0, 0.0, 2 * logit_move.amax(-1))
    x_grad = (g * (w * direction_move + p * weight_move) * slope_x).sum(-1, keepdim=True)
    per_code = (g * (w * direction_move + p * weight_move) * slope_c).sum(1)  # (H, K), then over heads sharing a code
    codebook_grad = torch.zeros(case.codebook3.shape[:2], dtype=torch.float64).index_add_(
        0, torch.arange(heads) % case.codebook3.shape[0], per_code
    )
    return loss, x_grad, codebook_grad.unsqueeze(-1)


def assert_within(got: torch.Tensor, want: torch.Tensor, rel: float, bound: torch.Tensor) -> None:
    """|got - want| <= rel (max|want| + 1) + bound, elementwise (bound broadcast to want); NaN fails."""
    scale = want.abs().max().item() if want.numel() else 0.0
    error = (got.double() - want).abs()
    outside = ~(error <= rel * (scale + 1) + bound)
    assert not outside.any(), (
        f"{int(outside.sum())} of {outside.numel()} off, first at "
        f"{outside.nonzero()[0].tolist()}: {error[outside][0].item():.3g} (scale {scale:.3g})"
    )


@backend_property(
    REFERENCE_BACKENDS,
    case=search_cases(regimes=("random",), max_tokens=24, max_codes=30, max_dim=24),
    precision=st.sampled_from(PRECISIONS),
    codebook_grad=st.booleans(),
    seed=seeds,
)
def test_code_cross_entropy(device, backend, case, precision, codebook_grad, seed):
    """code_cross_entropy: loss and both gradients against the oracle (2e-5 of their scale in fp32, 1e-2
    where an input is 16-bit, whose gradient comes back rounded to it; plus the bound of
    `cross_entropy_rounding_bounds` where the logits' rounding is amplified); index -1 gives 0; gradients in the inputs'
    dtypes, shapes and device; no codebook gradient unless it requires one."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, case.codebook3.shape[1], case.x.shape[:-1], generator=generator)
    grad = torch.randn(case.x.shape[:-1], generator=generator)
    on_device = case.on(device)
    x, codebook = on_device.x.detach().requires_grad_(), on_device.codebook.detach().requires_grad_(codebook_grad)
    indices_on_device = indices.to(device)
    with inputs_kept(on_device.x, on_device.codebook, indices_on_device):
        loss = fastvq.code_cross_entropy(
            x, codebook, indices_on_device, metric=case.metric, precision=precision, backend=backend
        )
        (loss * grad.to(device)).sum().backward()
    loss = output_on_cpu(loss.detach(), case, device, torch.float32)
    assert (loss[indices < 0] == 0).all()
    used = used_precision(case, precision, backend)
    indices3, grad3 = with_heads(indices, case), with_heads(grad, case)
    want_loss, lse = naive.code_cross_entropy(case.x3, case.codebook3, indices3, metric=case.metric, precision=used)
    rel = 2e-5 if case.x.dtype == case.codebook.dtype == torch.float32 else 1e-2
    loss_bound, x_bound, codebook_bound = cross_entropy_rounding_bounds(case, indices3, grad3, used)
    assert_within(with_heads(loss, case), want_loss, rel, loss_bound)
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape and x.grad.device == x.device
    want_x = naive.code_cross_entropy_grad(
        case.x3, case.codebook3, indices3, lse, grad3, "x", metric=case.metric, precision=used
    )
    assert_within(with_heads(x.grad.cpu(), case), want_x, rel, x_bound)
    if not codebook_grad:
        assert codebook.grad is None
        return
    assert codebook.grad.dtype == codebook.dtype and codebook.grad.shape == codebook.shape
    assert codebook.grad.device == codebook.device
    want_codebook = naive.code_cross_entropy_grad(
        case.x3, case.codebook3, indices3, lse, grad3, "codebook", metric=case.metric, precision=used
    )
    assert_within(codebook.grad.cpu().reshape(case.codebook3.shape), want_codebook, rel, codebook_bound)


def assert_sums_close(
    got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, terms: int, dtype: torch.dtype = torch.float32
) -> None:
    """Per-code sums added up in fp32 (then rounded to `dtype`) against float64 ones: within terms * 2^-23
    of the sum of the magnitudes of the terms (`magnitude`), plus one rounding to `dtype`."""
    bound = magnitude * terms * 2.0**-23 + want.abs() * torch.finfo(dtype).eps
    error = (got.double() - want).abs()
    assert (error <= bound).all(), f"sum off by {(error - bound).max().item():.3g} beyond its bound"


@backend_property(REFERENCE_BACKENDS, case=stats_cases())
def test_code_stats(device, backend, case):
    """code_stats: the oracle's counts exactly and its sums within the fp32 bound, with index -1, mask
    False and (check_indices=False) indices out of range left out, also where such tokens hold NaN or
    inf; bitwise the same on a second call; with the check, an index out of range raises naming it."""
    on_device = case.on(device)
    arguments = dict(
        x=on_device.x, indices=on_device.indices, num_codes=case.num_codes, mask=on_device.mask, backend=backend
    )
    if ((case.indices < -1) | (case.indices >= case.num_codes)).any():
        with pytest.raises(ValueError, match=r"indices must be in \[-1, num_codes="):
            fastvq.code_stats(**arguments)
    with inputs_kept(*[t for t in (on_device.x, on_device.indices, on_device.mask) if t is not None]):
        counts, sums = fastvq.code_stats(**arguments, check_indices=case.check_indices)
        again = fastvq.code_stats(**arguments, check_indices=case.check_indices)
    heads = case.x.shape[:-2]
    assert counts.shape == (*heads, case.num_codes) and sums.shape == (*heads, case.num_codes, case.x.shape[-1])
    assert counts.dtype == sums.dtype == torch.float32 and counts.device == sums.device == on_device.x.device
    assert torch.equal(counts, again[0]) and torch.equal(sums, again[1]), "a second call gave other bits"
    counts, sums = counts.cpu(), sums.cpu()
    x3 = case.x if case.x.dim() == 3 else case.x[None]
    indices3 = (case.indices if case.indices.dim() == 2 else case.indices[None]).long()
    mask3 = None if case.mask is None else case.mask.view(indices3.shape)
    kept = x3.masked_fill(case.skipped().view(indices3.shape).unsqueeze(-1), 0)
    want_counts, want_sums = naive.code_stats(kept, indices3, case.num_codes, mask=mask3)
    torch.testing.assert_close(counts.view(want_counts.shape), want_counts.float(), rtol=0, atol=0)
    magnitude = naive.code_stats(kept.abs(), indices3, case.num_codes, mask=mask3)[1]
    assert_sums_close(sums.view(want_sums.shape), want_sums, magnitude, x3.shape[1])


@backend_property(
    ALL_BACKENDS,
    case=search_cases(max_tokens=24, max_codes=24, max_dim=24),
    precision=st.sampled_from(PRECISIONS),
    seed=seeds,
)
def test_quantize_and_lookup_codes(device, backend, case, precision, seed):
    """quantize = nearest_code then lookup_codes: nearest_code's indices and distances; the chosen codes
    in x's dtype, and x itself (bit for bit, NaN included) where the index is -1; backward: the output
    gradient straight through to x, and to each code the sum of the gradients of the tokens that chose
    it (over every head for a shared codebook), in the codebook's dtype."""
    on_device = case.on(device)
    x, codebook = on_device.x.detach().requires_grad_(), on_device.codebook.detach().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    with inputs_kept(on_device.x, on_device.codebook):
        quantized, indices, distances = fastvq.quantize(
            x, codebook, metric=case.metric, precision=precision, backend=backend
        )
        nearest, nearest_distances = fastvq.nearest_code(
            on_device.x, on_device.codebook, metric=case.metric, precision=precision, backend=backend
        )
        quantized.backward(grad.to(device))
    assert torch.equal(indices, nearest)
    torch.testing.assert_close(distances, nearest_distances, rtol=0, atol=0, equal_nan=True)
    assert quantized.shape == x.shape and quantized.dtype == x.dtype and quantized.device == x.device
    assert x.grad.device == x.device and codebook.grad.device == codebook.device
    indices, quantized = indices.cpu(), quantized.detach().cpu()
    indices3, codebook3 = with_heads(indices, case), case.codebook3.detach()
    heads = torch.arange(indices3.shape[0])[:, None] % codebook3.shape[0]
    codes = codebook3[heads, indices3.clamp_min(0)].to(x.dtype)
    torch.testing.assert_close(
        with_heads(quantized, case),
        torch.where(indices3.unsqueeze(-1) < 0, case.x3, codes),
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    assert torch.equal(x.grad.cpu(), grad), "the gradient to x is not the output gradient"
    per_code = codebook3.shape[:1] + (-1, x.shape[-1])  # a shared codebook adds up the tokens of every head
    grad3, chosen = with_heads(grad, case).reshape(per_code), indices3.reshape(per_code[:2])
    want = naive.code_stats(grad3, chosen, codebook3.shape[1])[1]
    magnitude = naive.code_stats(grad3.abs(), chosen, codebook3.shape[1])[1]
    assert codebook.grad.dtype == codebook.dtype and codebook.grad.shape == codebook.shape
    assert_sums_close(codebook.grad.cpu().reshape(want.shape), want, magnitude, grad3.shape[1], codebook.dtype)
