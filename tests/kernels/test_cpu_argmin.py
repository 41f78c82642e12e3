"""The C++ CPU search's k = 1 path (kernels/cpu/tile.h `sub_tile_argmin`, `lane_argmin`): each token
keeps a running minimum per lane of W = 16 codes and the pair of code vectors it came from, reduced once
per work item to the lowest code among the lanes' equal minima, the vector of the pair resolved by
scoring the first again. It must give the answer of the list path (k = 2's first
column), bit for bit: ties to the lowest index across lanes, sub-tiles of 256 codes, L2 tiles (one
`sub_tile_argmin` call each) and code splits,
-inf / NaN / overflowing scores never chosen wherever they fall, at every D (the dot product's length
is fixed at compile time for 2, 4, 8 and 16 steps: D = 4, 8, 16 in fp32, D = 3-4, 7-8, 15-16, 31-32
in bf16 pairs) and for K not a multiple of 16.

The checks take the extension module as an argument, so that test_cpu_vector_units.py runs them on the
narrower vector-unit builds too.
"""

import pytest
import torch

from fastvq.ops.backend import unavailable_reason
from fastvq.ops.common import METRICS, PRECISIONS

UNAVAILABLE = unavailable_reason("cpu", "cpu")
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE or "")

L2, IEEE, BF16 = METRICS.index("l2"), PRECISIONS.index("ieee"), PRECISIONS.index("bf16")
NEVER, ALWAYS = 0, 2  # the search's prefilter argument: never, where it pays (default), always
PLANS = [(1, 1), (2, 0), (3, 3), (2, 5)]  # (threads, code splits; 0: the search's choice)


@pytest.fixture(scope="module")
def search():
    from fastvq.ops.cpu import load_extension

    return load_extension()


def _integers(shape, generator, low=-2, high=3):
    return torch.randint(low, high, shape, generator=generator).float()


def _lowest_l2(x, codebook):
    """(1, N): each token's index of the lowest |c|^2 - 2 x.c in float64 (exact for small integers), the
    first on ties (as torch.argmin)."""
    xd, cd = x.double(), codebook.double()
    return (cd.square().sum(-1)[:, None] - 2 * xd @ cd.mT).argmin(-1)


def _same_for_every_plan(search, x, codebook, metric, precision, prefilter=NEVER):
    """The k = 1 indices (1, N), checked equal to k = 2's first column under every plan in PLANS."""
    want = search.search(x, codebook, metric, precision, 2, 1, 1, prefilter)
    for threads, splits in PLANS:
        got = search.search(x, codebook, metric, precision, 1, threads, splits, prefilter)
        assert torch.equal(got[0][..., 0], want[0][..., 0]), f"threads {threads}, splits {splits}: other indices"
        assert torch.equal(got[1][..., 0].nan_to_num(-7.0), want[1][..., 0].nan_to_num(-7.0)), "other distances"
    return got[0][..., 0]


def check_every_d_and_odd_k(search):
    """Integer tokens and codes (exact scores, many ties) at D around each fixed length, K around 16 and 256."""
    generator = torch.Generator().manual_seed(11)
    for d in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33):
        for k in (1, 17, 31, 33, 257, 700):
            x, codebook = _integers((1, 53, d), generator), _integers((1, k, d), generator)
            for precision in (IEEE, BF16):
                for dtype in (torch.float32, torch.bfloat16):  # bf16 inputs with precision bf16: bf16 pairs
                    got = _same_for_every_plan(search, x.to(dtype), codebook.to(dtype), L2, precision)
                    assert torch.equal(got, _lowest_l2(x, codebook)), f"D {d}, K {k}: not the lowest index"


def check_ties_across_lanes_sub_tiles_and_splits(search):
    """Every token's nearest code has copies in other lanes, sub-tiles (256 codes) and splits, before
    and after it: the lowest index wins, for every metric."""
    generator = torch.Generator().manual_seed(12)
    d, k = 6, 1500
    codebook = _integers((1, k, d), generator) + 10.0  # no code near the tokens except the copies below
    x = _integers((1, 40, d), generator)
    for t in range(40):
        first = (37 * t + 5) % 1200
        codebook[0, first] = x[0, t]
        for copy in (first + 1, first + 16, first + 33, first + 256, first + 259):  # lanes, vectors, sub-tiles
            codebook[0, copy % k] = x[0, t]
    for metric in range(len(METRICS)):
        got = _same_for_every_plan(search, x, codebook, metric, IEEE)
        if METRICS[metric] == "l2":
            assert torch.equal(got, _lowest_l2(x, codebook))


def check_ties_and_minus_inf_across_l2_tiles(search):
    """D = 40, K = 5000: four L2 tiles of 1536 codes (each taken in one `sub_tile_argmin` call) and, with one
    split, a run of 5000 codes. Every token's nearest code has copies in later tiles (the lowest index
    wins); with dot, a code scoring -inf in a later tile, in the lane of the best code, is never chosen."""
    generator = torch.Generator().manual_seed(17)
    d, k, n = 40, 5000, 30
    codebook = _integers((1, k, d), generator) + 10.0
    x = _integers((1, n, d), generator)
    for t in range(n):
        first = 13 * t + 3
        for copy in (first, first + 1536, first + 2 * 1536 + 16, first + 3 * 1536 + 1):
            codebook[0, copy] = x[0, t]
    got = _same_for_every_plan(search, x, codebook, L2, IEEE)
    assert torch.equal(got, _lowest_l2(x, codebook))
    assert got.tolist() == [[13 * t + 3 for t in range(n)]]
    dot = METRICS.index("dot")
    x = torch.zeros(1, 5, d)
    x[0, :, 0] = torch.tensor([3e19, 2.5e19, 1e20, 4e19, 3e19])
    codebook = torch.randn(1, k, d, generator=generator)
    best, bad = 100, 100 + 2 * 1536 + 32
    codebook[0, best, 0] = 10.0
    codebook[0, bad, 0] = 1.5e19
    assert _same_for_every_plan(search, x, codebook, dot, IEEE).tolist() == [[best] * 5]


def check_which_vector_of_a_pair(search):
    """Per token, its exact copy (distance 0) sits in lane l of a pair of code vectors (codes 32 p + l and
    32 p + 16 + l), every other code far away: in the first with a second copy in the second; in the
    second with a near decoy or a NaN code in the first; in the second with a copy in the next pair's
    first. The lowest index of an exact copy wins."""
    generator = torch.Generator().manual_seed(15)
    d, k, n = 5, 600, 64
    codebook = _integers((1, k, d), generator) + 20.0
    x = _integers((1, n, d), generator)
    want = []
    for t in range(n):
        first = 32 * (t % 18) + t % 16
        second = first + 16
        case = t % 4
        codebook[0, second] = x[0, t]
        if case == 0:
            codebook[0, first] = x[0, t]
        elif case == 1:
            codebook[0, first] = x[0, t] + 1.0
        elif case == 2:
            codebook[0, first, 0] = float("nan")
        else:
            codebook[0, second + 16] = x[0, t]
        want.append(first if case == 0 else second)
    got = _same_for_every_plan(search, x, codebook, L2, IEEE)
    assert got.tolist() == [want]
    assert got.tolist() == _lowest_l2(x, codebook.nan_to_num(1e6)).tolist()


def check_non_finite_scores_at_every_lane(search):
    """dot, tokens (x0 >= 2.5e19, 0, 0, 0) against codes (c0, ...): the score -(x.c) is lowest for the
    largest c0, but codes with c0 = 1.5e19 score -inf (overflow; |c|^2 = 2.25e38 is finite) and codes
    with a NaN entry score NaN: neither is ever chosen, wherever it falls (every lane, before and after
    the best code in its lane, other sub-tiles); when every code is such a code the answer is -1 / NaN."""
    generator = torch.Generator().manual_seed(13)
    x = torch.zeros(1, 7, 4)
    x[0, :, 0] = torch.tensor([3e19, 2.5e19, 1e20, 4e19, 3e19, 1e21, 3e19])
    dot = METRICS.index("dot")
    for k in (40, 600):
        codebook = torch.randn(1, k, 4, generator=generator)
        best = int(codebook[0, :, 0].argmax())
        for lane in range(16):
            for bad in (lane, best - 16 + lane, best + 16 + lane, best + 272 + lane):
                if 0 <= bad < k and bad != best:
                    codebook[0, bad, 0] = 1.5e19 if lane % 3 else float("nan")
        assert (codebook[0, :, 0] == 1.5e19).sum() >= 10
        got = _same_for_every_plan(search, x, codebook, dot, IEEE)
        assert got.tolist() == [[best] * 7], f"K {k}: a non-finite score was chosen"
    codebook[0, :, 0] = 1.5e19
    indices, distances = search.search(x, codebook, dot, IEEE, 1, 2, 0, NEVER)
    assert (indices == -1).all() and distances.isnan().all()


def check_the_prefilter_choice_does_not_change_the_answer(search):
    """k = 1 with the prefilter never, where it pays and always: the same bits (fp32 ranking)."""
    generator = torch.Generator().manual_seed(14)
    for d, k in [(4, 3000), (8, 300), (33, 2100)]:
        x, codebook = torch.randn(1, 211, d, generator=generator), torch.randn(1, k, d, generator=generator)
        want = search.search(x, codebook, L2, IEEE, 1, 2, 0, NEVER)
        for prefilter in (1, ALWAYS):
            got = search.search(x, codebook, L2, IEEE, 1, 2, 0, prefilter)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"D {d}, K {k}, {prefilter}"


def check_minus_inf_after_the_minimum_in_its_lane(search):
    """dot: each token's best code (largest c0) sits early; a code scoring -inf (c0 = 1.5e19, an overflow)
    sits in the same lane of a later sub-tile or pair, where no code beats the best. The sub-tile with
    -inf is taken twice (`sub_tile_argmin` without, then with the -inf rule): the pair numbers that the
    first pass stored must not survive, or the answer would point at the -inf code's pair."""
    generator = torch.Generator().manual_seed(16)
    dot = METRICS.index("dot")
    x = torch.zeros(1, 5, 4)
    x[0, :, 0] = torch.tensor([3e19, 2.5e19, 1e20, 4e19, 3e19])
    for best, bad in [(5, 5 + 256), (37, 37 + 288), (300, 300 + 32), (17, 17 + 512 + 16)]:
        codebook = torch.randn(1, 700, 4, generator=generator)
        codebook[0, best, 0] = 10.0
        codebook[0, bad, 0] = 1.5e19
        got = _same_for_every_plan(search, x, codebook, dot, IEEE)
        assert got.tolist() == [[best] * 5], f"best {best}, -inf at {bad}"


CHECKS = [
    check_every_d_and_odd_k,
    check_ties_across_lanes_sub_tiles_and_splits,
    check_ties_and_minus_inf_across_l2_tiles,
    check_which_vector_of_a_pair,
    check_non_finite_scores_at_every_lane,
    check_minus_inf_after_the_minimum_in_its_lane,
    check_the_prefilter_choice_does_not_change_the_answer,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_k1_path(search, check):
    check(search)
