"""The C++ CPU search (kernels/cpu/search.cpp) beyond the op contract that test_nearest_code.py and
test_topk_codes.py check on every backend: how it cuts and schedules its work.

The search hands out items of (head, token block, code split) to threads it starts itself; the lists
of a token block's splits are merged in code order, so the answer must not depend on the thread count
or on the split, bit for bit, ties included.
"""

import pytest
import torch

from fastvq.ops.backend import cpu_unavailable_reason
from fastvq.ops.common import METRICS, PRECISIONS

UNAVAILABLE = cpu_unavailable_reason(torch.device("cpu"))
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
    codebook[0, k - 7:] = codebook[0, :7]  # copies in the last split of every split count
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


@pytest.mark.parametrize("precision", PRECISIONS)
def test_any_codebook_dtype_and_strides(search, precision):
    """The search rounds and packs the codebook itself: an fp16 / bf16 / fp64 or strided codebook
    gives the answer of its fp32 contiguous copy."""
    x = torch.randn(2, 50, 12)
    wide = torch.randn(2, 300, 24)
    for codebook in (wide[:, ::3, 1::2], wide[:, :, :12].to(torch.bfloat16), wide[:, :, :12].half(),
                     wide[:, :, :12].double()):
        want = search.search(x, codebook.float().contiguous(), 0, PRECISIONS.index(precision), 3, 2)
        got = search.search(x, codebook, 0, PRECISIONS.index(precision), 3, 2)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
