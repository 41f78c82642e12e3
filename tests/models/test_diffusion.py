"""LatentDiffusion: the cosine schedule and the DDIM step against closed forms, the denoiser on odd
latent sizes, a tiny training run, seeded sampling and guidance, and decoding through a tokenizer
with and without its quantizer."""

import math

import pytest
import torch

from fastvq.models import VQVAE, LatentDiffusion
from fastvq.models.diffusion import (
    Denoiser,
    NoiseSchedule,
    cosine_alphas_cumprod,
    decode_latents,
    linear_alphas_cumprod,
)


def test_cosine_schedule_is_the_closed_form():
    steps, s = 100, 0.008
    f = [math.cos(((t / steps) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(steps + 1)]
    acp = cosine_alphas_cumprod(steps)
    # betas only clip at the very end; before that alpha_bar_t telescopes to f(t + 1) / f(0)
    torch.testing.assert_close(acp[:-1], torch.tensor(f[1:-1], dtype=torch.float64) / f[0])
    assert (acp.diff() < 0).all() and 0 < acp[-1] < 1e-4
    assert (1 - acp[1:] / acp[:-1]).max() <= 0.999 + 1e-12


@pytest.mark.parametrize("steps", [1000, 100])
def test_linear_schedule_is_ldms_and_noises_as_far_for_any_step_count(steps):
    scale = 1000 / steps
    betas = [
        ((0.00085 * scale) ** 0.5 + i / (steps - 1) * ((0.012 * scale) ** 0.5 - (0.00085 * scale) ** 0.5)) ** 2
        for i in range(steps)
    ]
    expected = torch.tensor([math.prod(1 - b for b in betas[: t + 1]) for t in range(steps)], dtype=torch.float64)
    torch.testing.assert_close(linear_alphas_cumprod(steps), expected)
    assert 0.003 < float(expected[-1]) < 0.008  # LDM's 1000-step schedule ends at alpha_bar ~0.0047
    with pytest.raises(ValueError, match="schedule must be one of"):
        NoiseSchedule(10, "quadratic")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_with_the_true_noise_walks_the_forward_process_back(kind):
    """Deterministic DDIM given the exact noise of x_t lands on the forward process at t_prev, and
    on x_0 itself at t_prev = -1."""
    schedule = NoiseSchedule(200, kind)
    x0, noise = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    t, t_prev = torch.tensor([150, 80, 10]), torch.tensor([100, 20, -1])
    x_t = schedule.add_noise(x0, noise, t)
    stepped = schedule.ddim_step(x_t, noise, t, t_prev)
    torch.testing.assert_close(stepped[:2], schedule.add_noise(x0, noise, t_prev)[:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepped[2], x0[2], rtol=1e-4, atol=1e-4)
    a = schedule.alphas_cumprod[150]
    torch.testing.assert_close(x_t[0], a.sqrt() * x0[0] + (1 - a).sqrt() * noise[0])


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (7, 7), (8, 6)])
@pytest.mark.parametrize("num_classes", [0, 4])
def test_denoiser_keeps_odd_latent_shapes(size, num_classes):
    net = Denoiser(3, width=16, num_classes=num_classes)
    x = torch.randn(2, 3, *size)
    labels = torch.tensor([0, 3]) if num_classes else None
    out = net(x, torch.tensor([5, 900]), labels)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_training_lowers_the_loss_and_fit_scale_normalises():
    torch.manual_seed(0)
    model = LatentDiffusion(2, width=16, steps=100)
    data = torch.randn(8, 2, 4, 4) * 3 + torch.linspace(-1, 1, 4)
    scale = model.fit_scale(data)
    assert (data * scale).std().item() == pytest.approx(1.0, rel=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        loss = model.loss(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_sampling_is_seeded_and_guidance_matters():
    torch.manual_seed(0)
    model = LatentDiffusion(2, width=16, num_classes=3, steps=50).eval()
    for p in model.parameters():  # give the zero-initialised output layer something to say
        torch.nn.init.normal_(p, std=0.05)
    labels = torch.tensor([0, 1, 2])
    a = model.sample(3, (3, 5), steps=10, labels=labels, guidance=3.0, seed=1)
    assert a.shape == (3, 2, 3, 5) and torch.isfinite(a).all()
    assert torch.equal(a, model.sample(3, (3, 5), steps=10, labels=labels, guidance=3.0, seed=1))
    assert not torch.equal(a, model.sample(3, (3, 5), steps=10, labels=labels, guidance=1.0, seed=1))
    assert not torch.equal(a, model.sample(3, (3, 5), steps=10, labels=labels, guidance=3.0, seed=2))
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 50\]"):
        model.sample(1, (2, 2), steps=51)
    with pytest.raises(ValueError, match="labels must be a"):
        model.loss(torch.randn(2, 2, 3, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 2, H, W\)"):
        model.loss(torch.randn(2, 3, 3, 3))


def test_decoding_goes_through_the_quantizer_unless_told_not_to():
    torch.manual_seed(0)
    tokenizer = VQVAE(channels=16, res_channels=8, codebook_size=16, codebook_dim=8).train()
    latents = torch.randn(2, 8, 4, 4)
    state = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    images = decode_latents(tokenizer, latents)
    tokenizer.eval()
    expected = tokenizer.decode_latents(tokenizer.quantize(latents)[0])
    torch.testing.assert_close(images, expected)
    raw = decode_latents(tokenizer, latents, quantize=False)
    assert raw.shape == images.shape == (2, 3, 16, 16) and not torch.allclose(raw, images)
    assert all(torch.equal(v, state[k]) for k, v in tokenizer.state_dict().items()), "decoding changed the codebook"
