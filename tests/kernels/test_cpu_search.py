"""The C++ CPU search (kernels/cpu/search.cpp) beyond the op contract that test_nearest_code.py and
test_topk_codes.py check on every backend: how it cuts and schedules its work, and its rules at the
fp32 limit.

The search hands out items of (head, token block, code split) to the caller's thread and the
process's helper threads (kernels/cpu/workers.h); the lists of a token block's splits are merged in
code order, so the answer must not depend on the thread count or on the split, bit for bit, ties
included, nor on other calls running at the same time or on a fork.
"""

import multiprocessing
import os
import threading

import pytest
import torch

import fastvq
from fastvq.ops import naive
from fastvq.ops.backend import unavailable_reason
from fastvq.ops.common import METRICS, PRECISIONS
from fastvq.ops.cpu._extension import vector_unit

UNAVAILABLE = unavailable_reason("cpu", "cpu")
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE or "")


@pytest.fixture(scope="module")
def search():
    from fastvq.ops.cpu import load_extension

    return load_extension()


def _tied_inputs(heads, n, k, d, seed):
    """Small integers (exact products, so many exact ties) and a few duplicated codes far apart."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (heads, n, d), generator=generator).float()
    codebook = torch.randint(-2, 3, (1, k, d), generator=generator).float()
    codebook[0, k - 7 :] = codebook[0, :7]  # copies in the last split of every split count
    return x, codebook


@pytest.mark.parametrize("heads,n,k,d,topk", [(2, 700, 2500, 16, 1), (1, 1301, 2600, 9, 5), (3, 7, 50000, 33, 16)])
@pytest.mark.parametrize("metric", METRICS)
def test_same_answer_for_every_thread_count_and_split(search, heads, n, k, d, topk, metric):
    x, codebook = _tied_inputs(heads, n, k, d, seed=n + k)
    code = METRICS.index(metric)
    want = search.search(x, codebook, code, 0, topk, 1, 1)
    assert (want[0][..., 0] >= 0).all()
    for threads in (1, 2, 3, 7):
        for splits in (0, 2, 3, 5):
            got = search.search(x, codebook, code, 0, topk, threads, splits)
            assert torch.equal(got[0], want[0]), f"threads {threads}, splits {splits}: other indices"
            assert torch.equal(got[1], want[1]), f"threads {threads}, splits {splits}: other distances"


def test_the_plans_of_those_cases_use_threads_and_splits(search):
    """The cases above run on several threads and split the codes (the test is not vacuous)."""
    for heads, n, k, d in [(2, 700, 2500, 16), (1, 1301, 2600, 9), (3, 7, 50000, 33)]:
        assert search.work_plan(heads, n, k, d, 7, 0)[0] == 7
        threads, splits, items = search.work_plan(heads, n, k, d, 3, 5)
        assert threads == 3 and splits in (4, 5) and items == heads * -(-n // 96) * splits
    threads, splits, items = search.work_plan(3, 7, 50000, 33, 7, 0)
    assert splits > 1 and items >= 6 * 7, "a single token block splits its codes by itself"


def test_small_calls_run_on_one_thread(search):
    """A call too small to pay for starting a thread runs on the caller's alone."""
    assert search.work_plan(1, 7, 100, 8, 16, 0)[0] == 1
    assert search.work_plan(1, 16384, 16384, 8, 2, 0)[:2] == (2, 1)


def test_calls_from_several_python_threads_at_once(search):
    """The search releases the GIL, so four Python threads search at the same time: one call holds the
    helper threads, the others run on their callers' threads alone. Every answer is the one-thread one."""
    x, codebook = _tied_inputs(2, 3001, 2500, 16, seed=5)
    want = search.search(x, codebook, 0, 0, 3, 1, 0)
    answers = [None] * 4

    def run(slot):
        answers[slot] = [search.search(x, codebook, 0, 0, 3, 2, 0) for _ in range(3)]

    workers = [threading.Thread(target=run, args=(slot,)) for slot in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for got in (answer for calls in answers for answer in calls):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _search_in_child(connection, x, codebook):
    from fastvq.ops.cpu import load_extension

    connection.send(load_extension().search(x, codebook, 0, 0, 1, 2, 0)[0].tolist())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_helper_threads(search):
    """A child forked after the parent's helper threads started (a DataLoader worker, a fork Pool) has
    none of them: its searches start their own and give the parent's answer (and do not hang)."""
    x, codebook = _tied_inputs(1, 2001, 3000, 8, seed=6)
    want = search.search(x, codebook, 0, 0, 1, 2, 0)[0].tolist()  # the parent's helpers are running now
    receiver, sender = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_search_in_child, args=(sender, x, codebook))
    child.start()
    assert receiver.poll(120), "the forked child's search did not finish"
    assert receiver.recv() == want
    child.join(30)
    assert child.exitcode == 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_the_callers_cpu_affinity_is_left_alone(search):
    """The helpers are bound to cores for a call; the calling thread never is."""
    before = os.sched_getaffinity(0)
    x, codebook = _tied_inputs(1, 4001, 3000, 8, seed=7)
    search.search(x, codebook, 0, 0, 1, 2, 0)
    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("precision", PRECISIONS)
def test_any_codebook_dtype_and_strides(search, precision):
    """The search rounds and packs the codebook itself: an fp16 / bf16 / fp64 or strided codebook
    gives the answer of its fp32 contiguous copy."""
    x = torch.randn(2, 50, 12)
    wide = torch.randn(2, 300, 24)
    for codebook in (
        wide[:, ::3, 1::2],
        wide[:, :, :12].to(torch.bfloat16),
        wide[:, :, :12].half(),
        wide[:, :, :12].double(),
    ):
        want = search.search(x, codebook.float().contiguous(), 0, PRECISIONS.index(precision), 3, 2)
        got = search.search(x, codebook, 0, PRECISIONS.index(precision), 3, 2)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# the bf16 prefilter (AVX512-BF16 builds, precisions other than bf16): codes ranked first by bf16
# pairs, then the candidates within the error bound of a token's k-th fp32 score scored in fp32:
# the answer is the fp32 ranking's, bit for bit
# ---------------------------------------------------------------------------------------------


def _prefilter_cases():
    """(name, x, codebook): near ties below bf16's resolution, wide magnitudes, entries past the bound's
    limit (2^50: the prefilter gives way), clustered codes (many candidates per token)."""
    generator = torch.Generator().manual_seed(27)
    x, codebook = torch.randn(2, 301, 12, generator=generator), torch.randn(1, 3000, 12, generator=generator)
    near = codebook.clone()
    near[0, 1::2] = near[0, ::2][:, :] + 1e-4 * torch.randn(1500, 12, generator=generator)  # pairs 1e-4 apart
    wide = codebook * torch.logspace(-12, 12, 3000)[None, :, None]
    past = codebook.clone()
    past[0, 5, 3] = 2.0**51
    cluster = 1.0 + 1e-3 * torch.randn(1, 2048, 12, generator=generator)
    return [
        ("random", x, codebook),
        ("near ties", x, near),
        ("wide magnitudes", x * 1e3, wide),
        ("past the limit", x, past),
        ("clustered", 1.0 + 1e-3 * x, cluster),
        ("tied integers", *_tied_inputs(1, 97, 700, 16, seed=5)),
    ]


@pytest.mark.parametrize("topk", [1, 7])
@pytest.mark.parametrize("precision", ["ieee", "tf32", "fp16"])
@pytest.mark.parametrize("metric", METRICS)
def test_prefilter_gives_the_fp32_ranking_bit_for_bit(search, metric, precision, topk):
    for name, x, codebook in _prefilter_cases():
        args = (x, codebook, METRICS.index(metric), PRECISIONS.index(precision), topk, 2)
        want = search.search(*args, 0, 0)  # prefilter never
        got = search.search(*args, 0, 2)  # always (k = 1 on these short rows: not where it pays)
        assert torch.equal(got[0], want[0]), f"{name}: the prefilter chose other codes"
        assert torch.equal(got[1].nan_to_num(-7.0), want[1].nan_to_num(-7.0)), f"{name}: other distances"


@pytest.mark.skipif(vector_unit() != "AVX512_BF16", reason="the prefilter runs in AVX512-BF16 builds only")
def test_prefilter_runs_and_gives_way_where_it_should(search):
    """On random codes it filters every work item and scores few candidates in fp32; with an entry
    past 2^50 (its error bound's limit), for precision bf16 (ranked by bf16 pairs already), or for k = 1
    on a short split (D x codes per split <= 65536: it costs more there) it is not used; for k > 1 it is."""
    generator = torch.Generator().manual_seed(3)
    x, codebook = torch.randn(1, 960, 64, generator=generator), torch.randn(1, 4096, 64, generator=generator)
    items, left, evaluations = search.prefilter_stats(x, codebook, 0, 0, 1, 2)
    assert items >= 1 and left == 0 and 0 < evaluations < 0.05 * 960 * 4096
    assert search.prefilter_stats(x[..., :16], codebook[..., :16], 0, 0, 1, 2)[0] == 0
    assert search.prefilter_stats(x[..., :16], codebook[..., :16], 0, 0, 2, 2)[0] >= 1
    codebook[0, 9, 0] = 2.0**51
    assert search.prefilter_stats(x, codebook, 0, 0, 1, 2)[2] == 0
    assert search.prefilter_stats(x, codebook[:, :4000], 0, PRECISIONS.index("bf16"), 1, 2)[0] == 0


# ---------------------------------------------------------------------------------------------
# values near the fp32 limit (issue 24 item 12): a code whose score is not finite in fp32 is never
# chosen; a chosen code whose distance is not finite gives way (-1 / NaN after the valid codes)
# ---------------------------------------------------------------------------------------------


def _search_cpu(x, codebook, k, metric):
    nearest = fastvq.nearest_code(x, codebook, metric=metric, backend="cpu")
    return nearest, fastvq.topk_codes(x, codebook, k, metric=metric, backend="cpu")


def test_l2_score_overflowing_to_minus_inf_is_never_chosen():
    """x = 1.9e19: code 0 (1.8e19) is the nearest (distance 1e36), but its score |c|^2 - 2 x.c = -3.6e38
    is past the fp32 range, -inf in fp32; code 1 (1e18: score -3.7e37, distance 3.24e38) is chosen. Codes
    2 (0) and 3 (-1) come next by score, but their distances (3.61e38) are past the range: -1 after it. A
    search that let -inf win would answer code 0."""
    x = torch.tensor([[1.9e19], [1.0]])
    codebook = torch.tensor([[1.8e19], [1e18], [0.0], [-1.0]])
    (nearest, nearest_distance), (indices, distances) = _search_cpu(x, codebook, 4, "l2")
    assert nearest.tolist() == [1, 2]
    assert torch.equal(nearest_distance, (x[:, 0].double() - codebook[[1, 2], 0].double()).square().float())
    assert indices.tolist() == [[1, -1, -1, -1], [2, 3, 1, 0]]
    assert distances[0, 1:].isnan().all() and torch.equal(distances[:, 0], nearest_distance)


def test_cosine_score_overflowing_to_minus_inf_is_never_chosen():
    """x = 3e38: x.c overflows for code 0 (10: score -inf) and code 2 (-10: score +inf); code 1 (1e-3:
    x.c = 3e35, score -3e38) is the only one with a finite score, although code 0's distance (0, in
    fp64) is finite too. A search that let -inf win would answer code 0."""
    x = torch.tensor([[3e38]])
    codebook = torch.tensor([[10.0], [1e-3], [-10.0]])
    (nearest, nearest_distance), (indices, distances) = _search_cpu(x, codebook, 3, "cosine")
    assert nearest.tolist() == [1] and nearest_distance.tolist() == [0.0]
    assert indices.tolist() == [[1, -1, -1]] and distances[0, 1:].isnan().all()


def test_dot_score_overflowing_to_minus_inf_is_never_chosen():
    """x = 3e19: code 0 (1.5e19, |c|^2 = 2.25e38 in range) has score -4.5e38, -inf in fp32; code 1 (1e18,
    score -3e37) is the nearest, then code 2 (-1). A search that let -inf win would answer code 0, then
    drop it (its distance is not finite either): -1 for the nearest code."""
    x = torch.tensor([[3e19]])
    codebook = torch.tensor([[1.5e19], [1e18], [-1.0]])
    (nearest, nearest_distance), (indices, distances) = _search_cpu(x, codebook, 3, "dot")
    exact = -(x.double() * codebook.double().T).float()  # the distances -(x.c), rounded once
    assert nearest.tolist() == [1] and torch.equal(nearest_distance, exact[:, 1])
    assert indices.tolist() == [[1, 2, -1]] and torch.equal(distances[0, :2], exact[0, 1:])


def test_a_chosen_code_without_a_finite_distance_gives_way():
    """l2, x = 1.1e19 against two neighbouring fp32 codes near -7.36e18 whose scores round to the same
    fp32 value (-1.6e38), so the lower index (code 0) ranks first; its distance (x - c)^2 is past the
    fp32 range by less than an ulp, code 1's is not. The top-3 list is code 2, then code 1, then -1:
    the code without a finite distance gives way instead of leaving -1 between valid codes; the
    nearest-code list of one holds only code 2."""
    x = torch.tensor([[1.1085426864330637e19]])
    codebook = torch.tensor([[-7.361317209378914e18], [-7.3613166596231e18], [0.5]])
    exact = (x.double() - codebook.double().T).square()
    assert not exact[0, 0].float().isfinite() and exact[0, 1].float().isfinite()
    (nearest, _), (indices, distances) = _search_cpu(x, codebook, 3, "l2")
    assert indices.tolist() == [[2, 1, -1]] and nearest.tolist() == [2]
    assert torch.equal(distances[0, :2], exact[0, [2, 1]].float()) and distances[0, 2].isnan()


def _near_limit_batch(generator, rows, dim):
    """Entries of magnitudes from 0 to 3e38, both signs."""
    magnitudes = torch.tensor([0.0, 1.0, 2.5, 1e18, 1e19, 1.5e19, 1e38, 2e38, 3e38])
    picked = magnitudes[torch.randint(0, len(magnitudes), (rows, dim), generator=generator)]
    signs = torch.where(torch.rand(rows, dim, generator=generator) < 0.5, -1.0, 1.0)
    return picked * signs * torch.where(torch.rand(rows, dim, generator=generator) < 0.5, 1.0, 0.37)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_values_near_the_fp32_limit(metric, dim):
    """Random tokens and codes near 3e38 against float64: every listed code has an |c|^2 and a score
    within the fp32 range and its distance rounded from the exact one; the listed codes' exact scores
    ascend (up to fp32 rounding); -1 / NaN entries only after the valid ones; identical tokens (every
    token twice, 40 rows apart: other register tiles and blocks) get identical answers."""
    generator = torch.Generator().manual_seed(dim * 10 + METRICS.index(metric))
    flt_max = torch.finfo(torch.float32).max
    for _ in range(8):
        half = _near_limit_batch(generator, 40, dim)
        x, codebook = torch.cat([half, half]), _near_limit_batch(generator, 9, dim)
        (nearest, nearest_distance), (indices, distances) = _search_cpu(x, codebook, 4, metric)
        for got in (nearest, nearest_distance, indices, distances):
            torch.testing.assert_close(got[:40], got[40:], rtol=0, atol=0, equal_nan=True)  # bitwise
        valid = indices >= 0
        assert torch.equal(valid, ~distances.isnan()) and distances[valid].isfinite().all()
        assert not (valid[:, 1:] & ~valid[:, :-1]).any(), "a -1 entry before a valid one"
        assert torch.equal(indices[:, 0], nearest)
        torch.testing.assert_close(distances[:, 0], nearest_distance, rtol=0, atol=0, equal_nan=True)
        xd, cd = x.double(), codebook.double()
        code_sq = cd.square().sum(-1)
        dot = xd @ cd.T
        score = {"l2": code_sq - 2 * dot, "dot": -dot, "cosine": -dot / code_sq.sqrt().clamp_min(1e-12)}[metric]
        exact = naive.distances(x[None], codebook[None], metric)[0]
        rows, slots = valid.nonzero(as_tuple=True)
        chosen = indices[rows, slots]
        assert (code_sq[chosen] <= flt_max).all(), "a code whose |c|^2 overflows was chosen"
        assert (score[rows, chosen].abs() <= flt_max * (1 + 1e-6)).all(), "a code with an overflowing score was chosen"
        torch.testing.assert_close(distances[rows, slots].double(), exact[rows, chosen], rtol=1e-6, atol=0)
        listed = score.gather(1, indices.clamp_min(0)).masked_fill(~valid, float("inf"))
        slack = (
            2.0**-21
            * {
                "l2": code_sq[indices.clamp_min(0)] + 2 * dot.gather(1, indices.clamp_min(0)).abs(),
                "dot": dot.gather(1, indices.clamp_min(0)).abs(),
                "cosine": listed.abs(),
            }[metric]
        )
        step = listed.diff(dim=1)
        assert ((step >= -slack[:, 1:]) | ~valid[:, 1:]).all(), "valid codes out of score order"
