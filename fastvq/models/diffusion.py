"""`LatentDiffusion`: a DDPM over a VQ tokenizer's pre-quantization latents, sampled with DDIM and
decoded through the quantizer, as Latent Diffusion Models use VQ-regularised autoencoders
(Rombach et al. 2022; DDPM: Ho et al. 2020; cosine schedule: Nichol & Dhariwal 2021; DDIM: Song et
al. 2021; classifier-free guidance: Ho & Salimans 2022).

The default schedule is LDM's own for latents ("linear": sqrt(beta) evenly spaced from
sqrt(0.00085) to sqrt(0.012) over 1000 steps). The cosine schedule drives alpha_bar of the last step
to ~1e-8, and DDIM's first step divides the predicted noise's error by its square root: sampled
latents blow up (measured: std 4500 against 0.74 for real ones) unless x0 is clipped, which a
latent space has no natural range for.

The schedule and the DDIM update are a few lines of closed-form arithmetic (`NoiseSchedule`), kept
here rather than taken from a diffusion library: the one that has them (diffusers) brings a
hub client and a dozen dependencies for these ten lines, and its schedulers do not run offline
tests any better.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_choice, check_int, check_number, check_seed

SAMPLE_STEPS = 50
"""DDIM steps of a draw by default (fewer when the model was trained with fewer diffusion steps)."""
MAX_GUIDANCE = 100.0
"""The largest classifier-free guidance scale `LatentDiffusion.sample` takes (1: none; the usual
scales are 1-10; far beyond, eps_u + w (eps_c - eps_u) only amplifies the difference's error)."""


def cosine_alphas_cumprod(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar_t for t = 0 .. steps - 1 of the cosine schedule, float64 (steps,):
    alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) pi / 2), each
    beta_t = 1 - alpha_bar_t / alpha_bar_(t-1) clipped to max_beta."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


def linear_alphas_cumprod(steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """alpha_bar_t for t = 0 .. steps - 1 of LDM's linear schedule, float64 (steps,): sqrt(beta_t)
    evenly spaced from sqrt(beta_start) to sqrt(beta_end), both scaled by 1000 / steps so that any
    step count noises as far as 1000 steps do (alpha_bar of the last step ~0.005)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    scale = 1000 / steps
    betas = torch.linspace((beta_start * scale) ** 0.5, (beta_end * scale) ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas.clamp(max=0.999), 0)


SCHEDULES = {"linear": linear_alphas_cumprod, "cosine": cosine_alphas_cumprod}


class NoiseSchedule(nn.Module):
    """q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) with a_t = alpha_bar_t (buffer, float32) of the
    SCHEDULES ``kind``."""

    def __init__(self, steps: int = 1000, kind: str = "linear"):
        super().__init__()
        check_choice("schedule", kind, SCHEDULES)
        self.steps, self.kind = steps, kind
        self.register_buffer("alphas_cumprod", SCHEDULES[kind](steps).float())

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t per batch item, 1 for t = -1 (before the first step), shaped to broadcast."""
        a = torch.where(t >= 0, self.alphas_cumprod[t.clamp_min(0)], torch.ones_like(t, dtype=torch.float32))
        return a.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; t (B,) int64 in [0, steps)."""
        a = self._alpha(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddim_step(
        self,
        x_t: torch.Tensor,
        eps: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM update from step t to t_prev (< t; -1 ends at x_0) given the predicted noise:
        x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), then
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s noise with
        s = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) (eta = 0: deterministic)."""
        a, a_prev = self._alpha(t, x_t), self._alpha(t_prev, x_t)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0:
            out = out + sigma * (torch.randn_like(x_t) if noise is None else noise)
        return out


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer steps t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], -1)


class _GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that also takes a batch whose groups hold one value in all (a batch of one 1x1
    map with one channel per group, as width 8 gives at 1x1 and 2x2 latents), which torch refuses:
    normalised alone a value is 0, so the output is the bias. Torch computes it for two copies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * (x.shape[1] // self.num_groups) * math.prod(x.shape[2:]) == 1:
            return super().forward(torch.cat([x, x]))[:1]
        return super().forward(x)


class _ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, embed: int):
        super().__init__()
        self.norm1 = _GroupNorm(min(8, channels_in), channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels, 3, padding=1)
        self.embed = nn.Linear(embed, channels)
        self.norm2 = _GroupNorm(min(8, channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels, 1) if channels_in != channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.embed(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Denoiser(nn.Module):
    """A small UNet predicting the noise of latents (B, C, H, W), any H, W >= 1: residual blocks at
    full and half resolution with a skip connection, conditioned on the step and (optionally) a
    class, where class `num_classes` means "no class" (classifier-free guidance)."""

    def __init__(self, channels: int, width: int = 64, num_classes: int = 0):
        super().__init__()
        check_int("channels", channels)
        check_int("num_classes", num_classes, minimum=0)
        if isinstance(width, bool) or not isinstance(width, int) or width < 8 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8 (group norms of 8 groups), got {width!r}")
        embed = 4 * width
        self.width, self.num_classes = width, num_classes
        self.time = nn.Sequential(nn.Linear(width, embed), nn.SiLU(), nn.Linear(embed, embed))
        self.label = nn.Embedding(num_classes + 1, embed) if num_classes else None
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList([_ResBlock(width, width, embed), _ResBlock(width, 2 * width, embed)])
        self.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.middle = _ResBlock(2 * width, 2 * width, embed)
        self.up = _ResBlock(3 * width, width, embed)
        self.out = nn.Sequential(_GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.width))
        if self.label is not None:
            labels = torch.full_like(t, self.num_classes) if labels is None else labels
            emb = emb + self.label(labels)
        h = self.down[0](self.inp(x), emb)
        low = self.down[1](self.downsample(h), emb)
        low = self.middle(low, emb)
        up = F.interpolate(low, size=h.shape[-2:], mode="nearest")
        return self.out(self.up(torch.cat([h, up], 1), emb))


class LatentDiffusion(nn.Module):
    """DDPM (noise prediction; `schedule` 'linear' (LDM's, the default) or 'cosine' over `steps`
    steps) over latents (C, H, W), scaled by
    `latent_scale` (1 / their measured standard deviation, set by `fit_scale`, as LDM does).

    loss(latents (B, C, H, W), labels) -> () fp32 mean squared noise error; in training the class
    is dropped with probability `label_dropout` so guidance can be used. sample(...) -> latents in
    the tokenizer's units.
    """

    def __init__(
        self,
        channels: int,
        *,
        width: int = 64,
        num_classes: int = 0,
        steps: int = 1000,
        schedule: str = "linear",
        label_dropout: float = 0.1,
    ):
        super().__init__()
        check_number("label_dropout", label_dropout, 0.0, 1.0, below_maximum=True)
        self.channels, self.num_classes, self.label_dropout = channels, num_classes, label_dropout
        self.denoiser = Denoiser(channels, width, num_classes)
        self.schedule = NoiseSchedule(steps, schedule)
        self.register_buffer("latent_scale", torch.ones(()))

    @torch.no_grad()
    def fit_scale(self, latents: torch.Tensor) -> float:
        """Set latent_scale = 1 / std of these latents (all elements); returns it."""
        std = latents.float().std()
        if not torch.isfinite(std) or std <= 0:
            raise ValueError(f"latents must be finite and not constant to fit a scale, got std {std}")
        self.latent_scale.fill_(1.0 / std)
        return float(self.latent_scale)

    def _check(self, latents: torch.Tensor, labels: torch.Tensor | None) -> None:
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must have shape (B, {self.channels}, H, W), got {tuple(latents.shape)}")
        if labels is not None and (
            not self.num_classes
            or labels.shape != latents.shape[:1]
            or bool(((labels < 0) | (labels >= self.num_classes)).any())
        ):
            raise ValueError(
                f"labels must be a (B,) tensor in [0, num_classes={self.num_classes}) (and only for "
                f"a model with classes), got {tuple(labels.shape)}"
            )

    def loss(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check(latents, labels)
        x0 = latents.float() * self.latent_scale
        t = torch.randint(0, self.schedule.steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        if labels is not None and self.training and self.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels = labels.masked_fill(drop, self.num_classes)
        return F.mse_loss(self.denoiser(self.schedule.add_noise(x0, noise, t), t, labels), noise)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        size: tuple[int, int],
        *,
        steps: int | None = None,
        labels: torch.Tensor | None = None,
        guidance: float = 1.0,
        eta: float = 0.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """num latents (num, C, *size) by DDIM over `steps` evenly spaced steps (None: SAMPLE_STEPS, at
        most the schedule's); guidance w > 1
        extrapolates from the unconditional prediction (eps_u + w (eps_c - eps_u)), w in [0,
        MAX_GUIDANCE]; eta in [0, 1] (0: deterministic, 1: DDPM's noise); seed: see `check_seed`."""
        check_int("num", num)
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise ValueError(f"size must be (H, W), got {size!r}")
        for name, value in zip(("H", "W"), size):
            check_int(f"size {name}", value)
        steps = min(SAMPLE_STEPS, self.schedule.steps) if steps is None else steps
        check_int("steps", steps, 1, self.schedule.steps)
        check_number("guidance", guidance, 0.0, MAX_GUIDANCE)
        check_number("eta", eta, 0.0, 1.0)
        check_seed(seed)
        device = self.latent_scale.device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        x = torch.randn(num, self.channels, *size, generator=generator, device=device)
        if labels is not None:
            self._check(x, labels.to(device))
        times = torch.linspace(self.schedule.steps - 1, 0, steps, device=device).round().long().unique_consecutive()
        for i, t in enumerate(times):
            t_prev = times[i + 1] if i + 1 < len(times) else torch.tensor(-1, device=device)
            batch_t = t.expand(num)
            eps = self.denoiser(x, batch_t, labels)
            if labels is not None and guidance != 1.0:
                eps_uncond = self.denoiser(x, batch_t, None)
                eps = eps_uncond + guidance * (eps - eps_uncond)
            noise = torch.randn(x.shape, generator=generator, device=device) if eta > 0 else None
            x = self.schedule.ddim_step(x, eps, batch_t, t_prev.expand(num), eta=eta, noise=noise)
        return x / self.latent_scale


@torch.no_grad()
def decode_latents(tokenizer: nn.Module, latents: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
    """Images (B, 3, H, W) from latents (B, D, h, w) of a `VQModel`: quantized first (its quantizer
    in eval mode, as LDM decodes), or decoded as they are with quantize=False."""
    if quantize:
        training = tokenizer.training
        tokenizer.eval()
        latents = tokenizer.quantize(latents)[0]
        tokenizer.train(training)
    return tokenizer.decode_latents(latents)
