"""sample_code: draws follow softmax(logits / temperature), are reproducible by seed, and are the
oracle's (`fastvq.ops.naive.sample_code` replays the Philox stream of the kernels densely).

Distribution rule: N identical tokens against K = 5 codes give multinomial counts; the chi-square
statistic against N softmax(logit / T) (float64 logits) must stay below 43, the 1 - 1e-8 quantile
of chi-square with 4 degrees of freedom (P(X > x) = exp(-x/2) (1 + x/2)). Seeds are fixed per
test, so a pass is reproducible; a wrong distribution (e.g. the temperature off by 20% at T = 0.5, or
correlated noise) exceeds it by far at this N.
"""

import numpy as np
import pytest
import torch
from conftest import backend_cases

import fastvq.ops.functional as F
from fastvq.ops import naive, philox
from fastvq.ops.common import METRICS

CHI2_LIMIT = 43.0


def _five_codes(heads, d, metric):
    """One token per head and 5 codes at distances 0.2 ... 1.4 (l2), cosines 0.9 ... -0.3
    (cosine) or logits 0.9 ... -0.3 (dot) from it, in random directions: no tiny softmax cell at T
    in [0.5, 2]."""
    token = torch.randn(heads, 1, d)
    direction = torch.nn.functional.normalize(torch.randn(heads, 5, d), dim=-1)
    if metric == "l2":
        return token, token + torch.tensor([0.2, 0.5, 0.8, 1.1, 1.4])[:, None] * direction
    unit = torch.nn.functional.normalize(token, dim=-1)
    across = torch.nn.functional.normalize(direction - (direction * unit).sum(-1, keepdim=True) * unit, dim=-1)
    cosines = torch.tensor([0.9, 0.6, 0.3, 0.0, -0.3])[:, None]
    if metric == "dot":  # x . c = cosine exactly, whatever the orthogonal part
        return token, cosines * unit / token.norm(dim=-1, keepdim=True) + across * torch.rand(heads, 5, 1)
    return token, (cosines * unit + (1 - cosines**2).sqrt() * across) * torch.rand(heads, 5, 1).add(0.5)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric,temperature", [("l2", 0.5), ("l2", 2.0), ("cosine", 0.5)])
def test_frequencies_match_softmax(device, backend, metric, temperature, _seed):
    n = 6000
    token, codebook = _five_codes(2, 3, metric)
    x = token.expand(2, n, 3)
    indices = F.sample_code(
        x.to(device), codebook.to(device), temperature=temperature, metric=metric, seed=_seed, backend=backend
    ).cpu()
    probs = (naive.logits(token, codebook, metric)[:, 0] / temperature).softmax(dim=-1)  # (2, 5)
    assert probs.min() * n > 50, "every cell needs a large expected count"
    for h in range(2):  # one codebook per head: each head follows its own softmax
        counts = torch.bincount(indices[h], minlength=5).double()
        expected = n * probs[h]
        chi2 = ((counts - expected).pow(2) / expected).sum().item()
        assert chi2 < CHI2_LIMIT, f"head {h}: counts {counts.tolist()} vs expected {expected.tolist()}"


@pytest.mark.parametrize("device,backend", backend_cases())
def test_seeds(device, backend):
    """Same seed: same draw; another seed: another draw; seed=None follows torch.manual_seed;
    heads sharing a codebook draw independent noise."""
    x = torch.randn(1, 100, 6, device=device).repeat(2, 1, 1)  # identical heads
    codebook = torch.randn(20, 6, device=device) * 0.3

    def draw(seed):
        return F.sample_code(x, codebook, temperature=1.0, seed=seed, backend=backend)

    assert torch.equal(draw(7), draw(7))
    assert (draw(7) != draw(8)).float().mean() > 0.5
    a = draw(7)
    assert (a[0] != a[1]).float().mean() > 0.5, "heads must not reuse each other's noise"
    torch.manual_seed(3)
    first = draw(None)
    torch.manual_seed(3)
    assert torch.equal(first, draw(None))
    assert (first != draw(None)).any()


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_draws_the_oracles_codes(device, backend, metric):
    """Every backend draws with the Philox stream that the oracle replays densely, so it draws the
    oracle's code for a seed (up to float rounding where two perturbed logits nearly tie)."""
    x, codebook = torch.randn(2, 301, 33), torch.randn(2, 259, 33)
    got = F.sample_code(
        x.to(device), codebook.to(device), temperature=0.7, metric=metric, seed=11, backend=backend
    ).cpu()
    want = naive.sample_code(x, codebook, temperature=0.7, metric=metric, seed=11)
    assert (got == want).float().mean() >= 0.99


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
def test_gumbel_topk_extends_the_single_draw(device, backend, metric):
    """k draws: column 0 is the k=None draw for the seed, the codes are distinct, and they are the k
    best of the same perturbed logits (the same codes on both backends, up to near-ties)."""
    x, codebook = torch.randn(2, 301, 33, device=device), torch.randn(2, 259, 33, device=device)
    single = F.sample_code(x, codebook, temperature=0.7, metric=metric, seed=11, backend=backend)
    got = F.sample_code(x, codebook, temperature=0.7, k=5, metric=metric, seed=11, backend=backend)
    assert got.shape == (2, 301, 5) and got.dtype == torch.int64
    assert torch.equal(got[..., 0], single)
    assert (got.sort(dim=-1).values.diff(dim=-1) > 0).all(), "the k codes must be distinct"
    want = naive.sample_code(x.cpu(), codebook.cpu(), temperature=0.7, k=5, metric=metric, seed=11)
    assert (got.cpu() == want).all(dim=-1).float().mean() >= 0.99
    assert torch.equal(
        F.sample_code(x, codebook, temperature=0.7, k=1, metric=metric, seed=11, backend=backend)[..., 0], single
    )


@pytest.mark.parametrize("device,backend", backend_cases())
def test_gumbel_topk_ranks_the_perturbed_logits(device, backend):
    """The k codes are the dense top-k of logit / T + g, with g replayed from the Philox stream."""
    x, codebook = torch.randn(1, 40, 6), torch.randn(1, 30, 6)
    got = F.sample_code(x.to(device), codebook.to(device), temperature=0.5, k=4, seed=3, backend=backend).cpu()
    offsets = torch.arange(40)[:, None] * 30 + torch.arange(30)
    gumbel = -torch.log(-torch.log(philox.uniform(3, offsets))).double()
    perturbed = naive.logits(x, codebook, "l2")[0] / 0.5 + gumbel
    assert (got[0] == perturbed.topk(4, dim=-1).indices).all(dim=-1).float().mean() >= 0.95


@pytest.mark.parametrize("device,backend", backend_cases())
def test_gumbel_top2_frequencies(device, backend, _seed):
    """Gumbel top-2 samples without replacement: P(first = i, second = j) = p_i p_j / (1 - p_i).
    The chi-square over the 20 ordered pairs must stay below 80, beyond the 1 - 1e-8 quantile (75.7)
    of chi-square with 19 degrees of freedom; drawing the pair with replacement, or T off by 20%,
    adds about 200 at this N."""
    n = 20000
    token, codebook = _five_codes(1, 3, "l2")
    got = F.sample_code(
        token.expand(1, n, 3).to(device), codebook.to(device), temperature=1.0, k=2, seed=_seed, backend=backend
    ).cpu()[0]
    p = naive.logits(token, codebook, "l2")[0, 0].softmax(dim=-1)
    pairs = p[:, None] * p[None, :] / (1 - p[:, None])
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    counts = torch.bincount(got[:, 0] * 5 + got[:, 1], minlength=25).view(5, 5).double()
    assert counts.diagonal().sum() == 0
    expected = n * pairs[off_diagonal]
    assert expected.min() > 50, "every cell needs a large expected count"
    chi2 = ((counts[off_diagonal] - expected).pow(2) / expected).sum().item()
    assert chi2 < 80.0, f"counts {counts.tolist()} vs expected {(n * pairs).tolist()}"


@pytest.mark.parametrize("device,backend", backend_cases())
def test_gumbel_topk_edges(device, backend):
    """Non-positive temperature: `topk_codes`; non-finite codes come last as -1; empty and 2-d x."""
    x, codebook = torch.randn(2, 30, 5, device=device), torch.randn(2, 40, 5, device=device)
    assert torch.equal(
        F.sample_code(x, codebook, temperature=0.0, k=3, seed=1, backend=backend),
        F.topk_codes(x, codebook, 3, backend=backend)[0],
    )
    nonfinite = torch.zeros(4, 3, device=device)
    nonfinite[[1, 3], 0] = float("nan")
    got = F.sample_code(torch.randn(50, 3, device=device), nonfinite, k=3, seed=2, backend=backend)
    assert got.shape == (50, 3)
    assert (got[:, 2] == -1).all() and set(got[:, :2].flatten().tolist()) == {0, 2}
    assert F.sample_code(x[:, :0], codebook, k=3, seed=4, backend=backend).shape == (2, 0, 3)


def test_noise_stream_is_triton_philox():
    """Bit-exact against values of `tl.rand(123, 2**33 + arange(4))` (triton 3.6-3.9)."""
    offsets = torch.arange(4) + 2**33
    expected = torch.tensor([0.154929385, 0.142340347, 0.650659084, 0.846028626])
    torch.testing.assert_close(philox.uniform(123, offsets), expected, rtol=0, atol=1e-9)
    u = philox.uniform(2**40 + 5, torch.arange(200_000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_nearest_code(device, backend, temperature):
    x, codebook = torch.randn(2, 30, 5, device=device), torch.randn(2, 40, 5, device=device)
    got = F.sample_code(x, codebook, temperature=temperature, seed=1, backend=backend)
    assert torch.equal(got, F.nearest_code(x, codebook, backend=backend)[0])


@pytest.mark.parametrize("device,backend", backend_cases())
def test_cold_temperature_picks_the_nearest(device, backend):
    x, codebook = torch.randn(300, 8, device=device), torch.randn(50, 8, device=device)
    nearest = F.nearest_code(x, codebook, backend=backend)[0]
    assert torch.equal(F.sample_code(x, codebook, temperature=1e-4, seed=5, backend=backend), nearest)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_non_finite_inputs(device, backend):
    """Codes with a non-finite entry are never drawn; a token with NaN gets -1."""
    codebook = torch.zeros(4, 3)
    codebook[[1, 3], 0] = torch.tensor([float("nan"), float("inf")])
    x = torch.zeros(500, 3)
    x[7, 1] = float("nan")
    got = F.sample_code(x.to(device), codebook.to(device), temperature=1.0, seed=2, backend=backend).cpu()
    assert got[7] == -1
    rest = torch.cat([got[:7], got[8:]])
    assert set(rest.tolist()) == {0, 2}


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 3])
def test_infinite_tokens_get_no_code(device, backend, metric, k):
    """A token with +inf or -inf gets -1 (k: -1 in every slot), as one with NaN, on every backend:
    a non-finite logit is never drawn, whatever sign its score overflows to."""
    x, codebook = torch.randn(6, 8), torch.randn(16, 8)
    x[1, 2], x[3, 0], x[4] = float("inf"), float("-inf"), float("nan")
    got = F.sample_code(
        x.to(device), codebook.to(device), temperature=0.5, k=k, metric=metric, seed=9, backend=backend
    ).cpu()
    bad = torch.tensor([1, 3, 4])
    assert (got[bad] == -1).all(), got
    assert (torch.cat([got[:1], got[2:3], got[5:]]) >= 0).all()


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("temperature", [1e-39, 1e-37, 1e-30])
def test_tiny_temperature_is_the_nearest_code(device, backend, temperature):
    """T -> 0 is the nearest code: 1 / T overflows fp32 below 3e-39, and logit / T once |logit| > 34
    at T = 1e-37; neither may turn into code 0 or -1."""
    x, codebook = torch.randn(200, 8, device=device) * 30, torch.randn(64, 8, device=device) * 30
    nearest = F.nearest_code(x, codebook, backend=backend)[0]
    got = F.sample_code(x, codebook, temperature=temperature, seed=5, backend=backend)
    assert torch.equal(got, nearest)
    assert torch.equal(F.sample_code(x, codebook, temperature=temperature, k=2, seed=5, backend=backend)[:, 0], nearest)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_non_contiguous_inputs_and_shapes(device, backend):
    wide = torch.randn(2, 50, 66, device=device)
    x = wide[:, ::2, 1::2]
    codebook = torch.randn(33, 70, device=device).t()
    got = F.sample_code(x, codebook, seed=4, backend=backend)
    assert torch.equal(got, F.sample_code(x.contiguous(), codebook.contiguous(), seed=4, backend=backend))
    assert got.shape == (2, 25) and got.dtype == torch.int64
    assert F.sample_code(x[0], codebook, seed=4, backend=backend).shape == (25,)
    assert F.sample_code(x[:, :0], codebook, seed=4, backend=backend).shape == (2, 0)


def test_bad_arguments_are_named():
    x, codebook = torch.randn(4, 3), torch.randn(20, 3)
    with pytest.raises(TypeError, match="temperature"):
        F.sample_code(x, codebook, temperature=torch.tensor(1.0))
    with pytest.raises(ValueError, match="temperature"):
        F.sample_code(x, codebook, temperature=float("inf"))
    for seed in (-1, 2**63):
        with pytest.raises(ValueError, match="seed"):
            F.sample_code(x, codebook, seed=seed)
    for seed in (1.0, True):
        with pytest.raises(TypeError, match="seed"):
            F.sample_code(x, codebook, seed=seed)
    assert torch.equal(F.sample_code(x, codebook, seed=np.int64(3)), F.sample_code(x, codebook, seed=3))
    with pytest.raises(ValueError, match="codebook"):
        F.sample_code(x, torch.randn(20, 4))
    for k in (0, 17, 21):
        with pytest.raises(ValueError, match="k must be"):
            F.sample_code(x, codebook, k=k)
    with pytest.raises(TypeError, match="k must be"):
        F.sample_code(x, codebook, k=2.0)
