"""The oracle itself (`fastvq.ops.naive`): each op against an independent, even plainer computation
(loops, torch's own functions) or a case small enough to work out by hand, so that the oracle every
backend is tested against is itself tested."""

import pytest
import torch
import torch.nn.functional as tF

from fastvq.ops import naive, philox
from fastvq.ops.common import METRICS, round_operand

FLT_MAX = torch.finfo(torch.float32).max


def test_distances_are_the_definitions():
    """Squared L2 by a loop over pairs, 1 - F.cosine_similarity, -(x.c); a shared codebook serves every head."""
    x, codebook = torch.randn(2, 5, 7), torch.randn(1, 4, 7)
    l2 = naive.distances(x, codebook, "l2")
    for h in range(2):
        for n in range(5):
            for k in range(4):
                assert l2[h, n, k] == pytest.approx(
                    (x[h, n].double() - codebook[0, k].double()).pow(2).sum().item(), rel=1e-12
                )
    cosine = 1 - tF.cosine_similarity(x.double().unsqueeze(2), codebook.double().unsqueeze(1), dim=-1)
    torch.testing.assert_close(naive.distances(x, codebook, "cosine"), cosine, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        naive.distances(x, codebook, "dot"), -torch.einsum("hnd,kd->hnk", x.double(), codebook[0].double())
    )


@pytest.mark.parametrize("metric", METRICS)
def test_scores_rank_as_the_distances(metric):
    """A token's scores are its distances less one per-token term (l2: |x|^2; cosine: scaled by |x|)."""
    x, codebook = torch.randn(1, 9, 5), torch.randn(1, 30, 5)
    score, dist = naive.scores(x, codebook, metric), naive.distances(x, codebook, metric)
    torch.testing.assert_close(score.argsort(-1), dist.argsort(-1))
    if metric == "l2":
        torch.testing.assert_close(score + x.double().pow(2).sum(-1, keepdim=True), dist)


def test_nearest_and_topk_by_hand():
    """One dimension, codes at 0, 1, 5, 3: token 0.4 is nearest 0, then 1, then 3; token 2 sits between
    1 and 3 (both at distance 1: the lower index first); a NaN token gets -1 / NaN."""
    codebook = torch.tensor([[[0.0], [1.0], [5.0], [3.0]]])
    x = torch.tensor([[[0.4], [2.0], [float("nan")]]])
    indices, dist = naive.topk_codes(x, codebook, 3)
    assert indices.tolist() == [[[0, 1, 3], [1, 3, 0], [-1, -1, -1]]]
    torch.testing.assert_close(dist[0, :2], torch.tensor([[0.16, 0.36, 6.76], [1.0, 1.0, 4.0]], dtype=torch.float64))
    assert dist[0, 2].isnan().all()
    nearest, nearest_dist = naive.nearest_code(x, codebook)
    assert nearest.tolist() == [[0, 1, -1]] and torch.equal(nearest_dist[0, :2], dist[0, :2, 0])


def test_precision_ranks_the_rounded_operands():
    """bf16: the scores of the operands rounded to bf16; the distances stay those of the inputs."""
    x, codebook = torch.randn(1, 20, 6) * 3, torch.randn(1, 40, 6)
    rounded = naive.scores(round_operand(x, "bf16"), round_operand(codebook, "bf16"), "l2")
    assert torch.equal(naive.scores(x, codebook, "l2", "bf16"), rounded)
    indices, dist = naive.nearest_code(x, codebook, precision="bf16")
    assert torch.equal(indices, rounded.argmin(-1))
    assert torch.equal(dist, naive.distances(x, codebook, "l2").gather(-1, indices[..., None])[..., 0])


def test_codes_and_scores_past_the_fp32_range_are_never_chosen():
    """|c|^2 past the fp32 range (a code at 2e19, or one with inf), or a score past it (x = 2e19 against
    c = 1.5e19: |c|^2 - 2 x.c = -3.75e38), is never chosen; a chosen code whose distance is past the range
    (x = 2e19 against c = 0: 4e38) becomes -1 / NaN, after the valid codes."""
    codebook = torch.tensor([[[0.0], [2e19], [1.5e19], [float("inf")], [2e18]]])
    x = torch.tensor([[[2e19], [1.0]]])
    indices, dist = naive.topk_codes(x, codebook, 5)
    assert indices.tolist() == [[[4, -1, -1, -1, -1], [0, 4, 2, -1, -1]]]
    assert dist[0, 0, 0] == pytest.approx(1.8e19**2) and dist[0, 0, 1:].isnan().all()
    assert torch.isfinite(dist[0, 1, :3]).all() and dist[0, 1, 3:].isnan().all()


def test_code_stats_is_bincount_and_index_add():
    """Counts by bincount, sums by index_add_ in float64, per head; index -1, an index past K and mask
    False are left out."""
    x = torch.randn(2, 300, 6)
    indices = torch.randint(-1, 12, (2, 300))
    mask = torch.rand(2, 300) > 0.3
    counts, sums = naive.code_stats(x, indices, 10, mask=mask)
    for h in range(2):
        keep = (indices[h] >= 0) & (indices[h] < 10) & mask[h]
        torch.testing.assert_close(counts[h], torch.bincount(indices[h][keep], minlength=10).double())
        want = torch.zeros(10, 6, dtype=torch.float64).index_add_(0, indices[h][keep], x[h][keep].double())
        torch.testing.assert_close(sums[h], want)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shared", [False, True])
def test_cross_entropy_and_gradients_are_torchs(metric, shared):
    """Loss against F.cross_entropy of vector-quantize-pytorch's logits (written out here), gradients
    against autograd through it; index -1 is ignored."""
    x = torch.randn(2, 30, 7)
    codebook = torch.randn(1 if shared else 2, 50, 7)
    indices = torch.randint(-1, 50, (2, 30))
    grad = torch.randn(2, 30)
    x64, cb64 = x.double().requires_grad_(), codebook.double().requires_grad_()
    cb = cb64.expand(2, -1, -1)
    if metric == "l2":
        logits = -(x64.unsqueeze(2) - cb.unsqueeze(1)).pow(2).sum(-1).clamp_min(1e-8).sqrt()
    elif metric == "dot":
        logits = x64 @ cb.mT
    else:
        logits = tF.normalize(x64, dim=-1) @ tF.normalize(cb, dim=-1).mT
    want = tF.cross_entropy(logits.flatten(0, 1), indices.flatten(), ignore_index=-1, reduction="none").view(2, 30)
    want_grads = torch.autograd.grad((want * grad.double()).sum(), (x64, cb64))
    loss, lse = naive.code_cross_entropy(x, codebook, indices, metric=metric)
    torch.testing.assert_close(loss, want.detach())
    for wrt, want_grad in zip(("x", "codebook"), want_grads):
        got = naive.code_cross_entropy_grad(x, codebook, indices, lse, grad, wrt, metric=metric)
        torch.testing.assert_close(got, want_grad)


def test_sample_code_draws_follow_softmax():
    """The oracle's draws (its replay of the Philox stream): 20000 copies of a token against 4 codes
    give counts within a chi-square of 40 of N softmax(logit / T) (the 1 - 1e-8 quantile with 3 degrees of
    freedom is 40.7); column 0 of a top-k draw is the single draw; T -> 0 is the nearest code."""
    n = 20000
    token, codebook = torch.zeros(1, 1, 2), torch.tensor([[[0.3, 0.0], [0.0, 0.6], [-0.9, 0.0], [0.0, -1.2]]])
    x = token.expand(1, n, 2)
    drawn = naive.sample_code(x, codebook, temperature=0.5, seed=17)
    probs = (naive.logits(token, codebook, "l2")[0, 0] / 0.5).softmax(-1)
    counts = torch.bincount(drawn[0], minlength=4).double()
    assert ((counts - n * probs).pow(2) / (n * probs)).sum() < 40
    top2 = naive.sample_code(x, codebook, temperature=0.5, seed=17, k=2)
    assert torch.equal(top2[..., 0], drawn) and (top2[..., 0] != top2[..., 1]).all()
    assert (naive.sample_code(x[:, :50], codebook, temperature=1e-30, seed=3) == 0).all()


def test_sample_code_replays_the_noise_of_each_counter():
    """The draw is argmax(logit / T - log(-log(u))) with u at counter (h N + n) K + k of the stream."""
    x, codebook = torch.randn(2, 7, 3), torch.randn(2, 5, 3)
    drawn = naive.sample_code(x, codebook, temperature=0.8, seed=5)
    u = philox.uniform(5, torch.arange(2 * 7 * 5).view(2, 7, 5)).double()
    assert torch.equal(drawn, (naive.logits(x, codebook, "l2") / 0.8 - (-u.log()).log()).argmax(-1))


def test_sample_code_never_draws_a_non_finite_code():
    codebook = torch.tensor([[[0.0, 0.0], [float("nan"), 0.0], [1.0, 1.0], [3e19, 0.0]]])
    x = torch.randn(1, 400, 2) * 0.1
    x[0, 5, 0] = float("inf")
    drawn = naive.sample_code(x, codebook, temperature=2.0, seed=1, k=3)
    assert set(drawn[0, :, :2].flatten().tolist()) - {-1} == {0, 2} and (drawn[0, :, 2] == -1).all()
    assert (drawn[0, 5] == -1).all()


def test_no_tokens_give_empty_results():
    """N = 0 (as the ops promise): every op of the oracle answers with empty results of the right shapes
    (the sampler once failed to shape its empty counter tensor)."""
    x, codebook, indices = torch.randn(2, 0, 3), torch.randn(2, 5, 3), torch.zeros(2, 0, dtype=torch.int64)
    assert naive.sample_code(x, codebook, temperature=1.0, seed=1).shape == (2, 0)
    assert naive.sample_code(x, codebook, temperature=1.0, seed=1, k=3).shape == (2, 0, 3)
    assert [t.shape for t in naive.topk_codes(x, codebook, 2)] == [(2, 0, 2)] * 2
    assert [t.shape for t in naive.nearest_code(x, codebook)] == [(2, 0)] * 2
    assert [t.shape for t in naive.code_cross_entropy(x, codebook, indices)] == [(2, 0)] * 2
    counts, sums = naive.code_stats(x, indices, 5)
    assert counts.shape == (2, 5) and sums.shape == (2, 5, 3) and counts.abs().sum() == sums.abs().sum() == 0
