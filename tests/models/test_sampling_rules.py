"""Sampling of the generative models: the CodeHead's top-k draw and the DDIM step with eta > 0
against their formulas (two places a planted-bug run found unguarded), the one rule for a prior's
temperature, top-k and seed, the ranges of a diffusion sample's guidance and eta, and diffusion on
the smallest latents (1x1, 2x2) with a batch of one."""

import math

import pytest
import torch
from conftest import backend_cases

from fastvq.models import CodePrior, LatentDiffusion
from fastvq.models.diffusion import Denoiser, NoiseSchedule
from fastvq.nn import CodeHead

pytestmark = pytest.mark.usefixtures("one_thread")

TOPK_CHI2_LIMIT = 40.13
"""The 1 - 1e-8 quantile of chi-square with 3 degrees of freedom (4 cells)."""


@pytest.mark.parametrize("device,backend", backend_cases(("torch", "cuda", "cpu")))
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_code_head_top_k_draws_follow_the_softmax_of_the_k_best_logits_over_t(device, backend, temperature):
    """N identical rows whose logits are 2.4, 1.8, 1.2, 0.6 for the top 4 of 6 codes: the counts
    must follow N softmax(logit / T) over those 4 (chi-square below its 1 - 1e-8 quantile) and never
    leave them. T off by 20 % adds 60-500 to the statistic at this N; no temperature, 1700-8000."""
    n, logits = 20000, torch.tensor([-3.0, 1.2, 2.4, -4.0, 0.6, 1.8])
    head = CodeHead(3, 6, backend=backend)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, 0] = logits  # h = e_0: h W^T + b = logits, exactly
        head.bias.zero_()
    hidden = torch.zeros(n, 3)
    hidden[:, 0] = 1.0
    head, hidden = head.to(device), hidden.to(device)
    draws = head.sample(hidden, temperature=temperature, top_k=4, seed=7).cpu()
    top = logits.topk(4).indices
    assert torch.isin(draws, top).all(), "a draw left the 4 most likely codes"
    counts = torch.bincount(draws, minlength=6)[top].double()
    expected = n * (logits[top].double() / temperature).softmax(0)
    chi2 = ((counts - expected).pow(2) / expected).sum().item()
    assert chi2 < TOPK_CHI2_LIMIT, f"counts {counts.tolist()} vs expected {expected.tolist()}"


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_step_with_eta_adds_the_stated_noise(kind, eta):
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, s = eta sqrt((1 - a_prev) /
    (1 - a_t)) sqrt(1 - a_t / a_prev), written out in float64 from the schedule; at t_prev = -1 the
    step lands on x0 whatever eta."""
    schedule = NoiseSchedule(200, kind)
    x_t, eps, z = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    t, t_prev = torch.tensor([150, 80, 10]), torch.tensor([100, 20, -1])
    got = schedule.ddim_step(x_t, eps, t, t_prev, eta=eta, noise=z)
    acp = schedule.alphas_cumprod.double()
    for i in range(3):
        a = acp[t[i]]
        a_prev = acp[t_prev[i]] if t_prev[i] >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x_t[i].double() - (1 - a).sqrt() * eps[i].double()) / a.sqrt()
        s = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        want = a_prev.sqrt() * x0 + (1 - a_prev - s**2).sqrt() * eps[i].double() + s * z[i].double()
        assert (s > 0.05) == (t_prev[i] >= 0)
        torch.testing.assert_close(got[i].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_with_the_true_noise_keeps_the_forward_marginal_for_any_eta(eta):
    """With x_t from the forward process and its true noise, r = x_prev - sqrt(a_prev) x0 has
    variance 1 - a_prev for every eta, shared between the noise of x_t (correlation
    sqrt(1 - s^2 / (1 - a_prev))) and fresh noise (s^2): over 200000 draws, within 1 %."""
    schedule = NoiseSchedule(100, "linear")
    n = 200000
    x0, noise = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    t, t_prev = torch.full((n,), 60), torch.full((n,), 30)
    stepped = schedule.ddim_step(schedule.add_noise(x0, noise, t), noise, t, t_prev, eta=eta)
    a, a_prev = float(schedule.alphas_cumprod[60]), float(schedule.alphas_cumprod[30])
    residual = stepped - math.sqrt(a_prev) * x0
    assert abs(float(residual.var()) / (1 - a_prev) - 1) < 0.01
    s2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    correlation = float(torch.corrcoef(torch.stack([residual, noise]))[0, 1])
    assert abs(correlation - math.sqrt(1 - s2 / (1 - a_prev))) < 0.01


def _prior(num_codes=8):
    torch.manual_seed(0)
    return CodePrior(num_codes, (2, 3), dim=16, depth=1, heads=2, backend="torch")


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), float("-inf"), 1e-40, 1e-4, -1.0, "1"])
@pytest.mark.parametrize("top_k", [None, 4])
def test_one_temperature_rule_with_and_without_top_k(temperature, top_k):
    """0 takes the most likely code; otherwise a finite temperature >= 1e-3, whether or not top_k
    is given (nan and 1e-40 crashed with top_k, inf passed with top_k and not without)."""
    with pytest.raises(ValueError, match=r"^temperature must be a finite number >= 0.001, got"):
        _prior().sample(2, temperature=temperature, top_k=top_k, seed=0)


def test_prior_sampling_ranges_and_what_they_allow():
    prior = _prior(num_codes=8)
    for top_k, limit in ((0, 8), (9, 8), (17, 8), (2.5, 8)):
        with pytest.raises(ValueError, match=rf"^top_k must be an int in \[1, {limit}\], got"):
            prior.sample(2, top_k=top_k)
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 9223372036854775807\], got"):
            prior.sample(2, seed=seed)
    with pytest.raises(ValueError, match=r"^num must be an int >= 1, got 0"):
        prior.sample(0)
    big = CodePrior(40, (2, 3), dim=16, depth=1, heads=2, backend="torch")
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 16\]"):
        big.sample(1, top_k=17)
    greedy = prior.sample(2, temperature=0, seed=2**63 - 1)
    assert torch.equal(greedy[0], greedy[1])
    assert prior.sample(3, temperature=1e-3, top_k=8, seed=1).shape == (3, 2, 3)


def _diffusion():
    torch.manual_seed(0)
    model = LatentDiffusion(2, width=8, num_classes=3, steps=20).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("eta", float("nan"), r"eta must be a finite number in \[0, 1\], got nan"),
        ("eta", -1.0, r"eta must be a finite number in \[0, 1\], got -1.0"),
        ("eta", 1.5, r"eta must be a finite number in \[0, 1\], got 1.5"),
        ("guidance", float("nan"), r"guidance must be a finite number in \[0, 100\], got nan"),
        ("guidance", float("inf"), r"guidance must be a finite number in \[0, 100\], got inf"),
        ("guidance", 1e30, r"guidance must be a finite number in \[0, 100\], got 1e\+30"),
        ("guidance", -2.0, r"guidance must be a finite number in \[0, 100\], got -2.0"),
        ("steps", 0, r"steps must be an int in \[1, 20\], got 0"),
        ("seed", -3, r"seed must be an int in \[0, 9223372036854775807\], got -3"),
    ],
)
def test_diffusion_sampling_options_out_of_range_are_refused(option, value, message):
    """nan eta or guidance, or guidance 1e30, gave all-NaN latents (black images) with no error."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        _diffusion().sample(2, (2, 2), labels=torch.tensor([0, 1]), **{"steps": 4, option: value})


def test_diffusion_sampling_at_the_ends_of_the_ranges_is_finite():
    model = _diffusion()
    labels = torch.tensor([0, 2])
    for guidance, eta in ((0.0, 0.0), (100.0, 1.0), (1.0, 0.5)):
        latents = model.sample(2, (3, 2), steps=4, labels=labels, guidance=guidance, eta=eta, seed=1)
        assert latents.shape == (2, 2, 3, 2) and torch.isfinite(latents).all()
    with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
        model.sample(1, (2,))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("width", [8, 16])
def test_diffusion_on_the_smallest_latents_and_a_batch_of_one(batch, side, width):
    """Width 8 puts one channel in each of the 8 groups of a group norm; at 1x1 latents (2x2 halve
    to 1x1) a batch of one then holds one value per group, which torch's group norm refused: `sample
    --num 1`, or a last evaluation batch of one item, crashed. A lone value normalises to 0: the
    output of such a norm is its bias, and a batch of one matches the same item in a batch of two."""
    torch.manual_seed(0)
    model = LatentDiffusion(2, width=width, num_classes=2, steps=20)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    latents, labels = torch.randn(batch, 2, side, side), torch.arange(batch) % 2
    model.train()
    loss = model.loss(latents, labels)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    sampled = model.sample(batch, (side, side), steps=3, labels=labels, guidance=2.0, eta=0.5, seed=3)
    assert sampled.shape == (batch, 2, side, side) and torch.isfinite(sampled).all()
    net = Denoiser(2, width=width, num_classes=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 2, side, side), torch.tensor([5, 9])
    pair = net(x, t, torch.tensor([0, 1]))
    single = net(x[:1], t[:1], torch.tensor([0]))
    torch.testing.assert_close(single, pair[:1], rtol=1e-5, atol=1e-6)
