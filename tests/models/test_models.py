"""Reference models on tiny configurations (CPU, seconds)."""

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_vqp

from fastvq.app.config import make_config
from fastvq.app.device import QuantizerTimer, now
from fastvq.app.step import make_optimizers, train_step
from fastvq.models import LPIPS, VQGAN, VQVAE, TamingQuantizer, make_quantizer
from fastvq.models.losses import PatchDiscriminator, adaptive_weight, hinge_d_loss

VQT = "vector-quantize-pytorch"
TINY_VQVAE = dict(
    channels=32, res_channels=8, num_res_blocks=1, downsample=4, codebook_dim=8, codebook_size=32, decay=0.8
)
TINY_VQGAN = dict(
    channels=8,
    ch_mult=[1, 2, 2],
    num_res_blocks=1,
    z_channels=8,
    norm_groups=4,
    codebook_dim=8,
    codebook_size=32,
    decay=0.8,
    disc_channels=8,
    disc_layers=2,
    disc_start=0,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=4, size=16, seed=0):
    """(n, 3, size, size) images of 4x4 flat colour blocks in [-1, 1]: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=size, mode="nearest")


def build(kind, quantizer, seed=0, **overrides):
    torch.manual_seed(seed)
    args = {**(TINY_VQVAE if kind == "vqvae" else TINY_VQGAN), **overrides}
    return (VQVAE if kind == "vqvae" else VQGAN)(**args, quantizer=quantizer)


def run_steps(model, x, steps, lr=3e-3):
    config = make_config(model.kind, lr=lr, model_args={})
    optimizers = make_optimizers(model, config)
    return [train_step(model, optimizers, x, step)[0] for step in range(steps)]


@pytest.mark.parametrize("kind", ["vqvae", "vqgan"])
@pytest.mark.parametrize("quantizer", ["fastvq", pytest.param(VQT, marks=needs_vqp), "taming"])
def test_shapes_and_round_trip(kind, quantizer):
    model = build(kind, quantizer).eval()
    x = batch(size=16)
    reconstruction, indices, loss = model(x)
    assert reconstruction.shape == x.shape and reconstruction.dtype == torch.float32
    assert indices.shape == (4, 4, 4) and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < 32
    assert loss.ndim == 0
    codes = model.encode(x)
    assert torch.equal(codes, indices)
    # decoding the indices gives the forward's reconstruction
    torch.testing.assert_close(model.decode(codes), reconstruction, rtol=1e-5, atol=1e-5)
    assert model.config["quantizer"] == quantizer


def loss_ratio(logs):
    """Mean reconstruction loss of the last three steps over that of the first three."""
    losses = [row["rec_loss"] for row in logs]
    return sum(losses[-3:]) / sum(losses[:3])


# bounds: ~0.6 (EMA codebook) and ~0.85 (learnable codebook) measured, with margin
@pytest.mark.parametrize(
    "quantizer, bound", [("fastvq", 0.75), pytest.param(VQT, 0.75, marks=needs_vqp), ("taming", 0.93)]
)
def test_vqvae_training_lowers_loss(quantizer, bound):
    model = build("vqvae", quantizer)
    assert loss_ratio(run_steps(model, batch(8), 40)) < bound


@pytest.mark.parametrize(
    "quantizer, bound", [("fastvq", 0.8), pytest.param(VQT, 0.8, marks=needs_vqp), ("taming", 0.9)]
)
def test_vqgan_training_lowers_loss(quantizer, bound):
    model = build("vqgan", quantizer)
    logs = run_steps(model, batch(8), 30)
    assert all("g_loss" in row and "d_loss" in row for row in logs)  # GAN on from step 0
    assert loss_ratio(logs) < bound


@needs_vqp
def test_vqvae_fastvq_matches_vector_quantize_pytorch():
    reference = build("vqvae", VQT)
    model = VQVAE(**TINY_VQVAE, quantizer="fastvq")
    model.load_state_dict(reference.state_dict())
    x = batch(8)
    expected = run_steps(reference, x, 5)
    got = run_steps(model, x, 5)
    for e, g in zip(expected, got):
        for key in ("loss", "rec_loss", "vq_loss"):
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), key


def test_vqvae_architecture_and_downsample():
    model = VQVAE(channels=32, res_channels=8, downsample=8, codebook_dim=4, codebook_size=16, quantizer="fastvq")
    strided = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 3
    assert model(batch(2, 32))[1].shape == (2, 4, 4)
    assert model.quantizer.commitment_weight == 0.25 and model.quantizer._codebook.decay == 0.99
    assert not model.quantizer.rotation_trick
    with pytest.raises(ValueError, match="downsample must be a power of two"):
        VQVAE(downsample=6, quantizer="fastvq")
    with pytest.raises(ValueError, match="multiple of the model's downsampling factor 8"):
        model(batch(2, 20))


def test_vqgan_structure():
    model = VQGAN(
        channels=8,
        ch_mult=[1, 2, 2],
        num_res_blocks=1,
        num_attn_levels=1,
        z_channels=8,
        norm_groups=4,
        codebook_dim=4,
        codebook_size=16,
        quantizer="fastvq",
    )
    assert model.downsample == 4
    attn = [name for name, _ in model.encoder.named_modules() if type(_).__name__ == "AttnBlock"]
    # attention only in the lowest-resolution level and the middle block
    assert attn and all(n.startswith(("levels.2", "mid")) for n in attn)
    disc = {id(p) for p in model.discriminator.parameters()}
    assert not disc & {id(p) for p in model.generator_parameters()}
    with pytest.raises(ValueError, match="norm_groups=32 must divide"):
        VQGAN(channels=8, ch_mult=[1, 2], quantizer="fastvq")
    with pytest.raises(ValueError, match="pixel_loss"):
        VQGAN(**{**TINY_VQGAN, "pixel_loss": "l3"}, quantizer="fastvq")


def test_vqgan_disc_start_and_adaptive_weight():
    model = build("vqgan", "fastvq", disc_start=3)
    x = batch()
    reconstruction, _, vq_loss = model(x)
    loss, logs = model.generator_loss(x, reconstruction, vq_loss, step=2)
    assert "g_loss" not in logs
    assert float(loss.detach()) == pytest.approx(float(logs["rec_loss"] + logs["vq_loss"]), rel=1e-6)
    loss, logs = model.generator_loss(x, reconstruction, vq_loss, step=3)
    last = model.decoder.conv_out.weight
    rec = (reconstruction - x).abs().mean()
    g = -model.discriminator(reconstruction).mean()
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    expected_weight = 0.8 * float(g_rec / (g_gan + 1e-4))
    assert float(logs["disc_weight"]) == pytest.approx(expected_weight, rel=1e-4)
    expected = logs["rec_loss"] + logs["vq_loss"] + logs["disc_weight"] * logs["g_loss"]
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_adaptive_weight_clamps():
    w = torch.ones(3, requires_grad=True)
    assert float(adaptive_weight((w * 1e9).sum(), (w * 0).sum(), w)) == 1e4


def test_hinge_and_discriminator():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    disc = PatchDiscriminator(3, 8, num_layers=3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_taming_quantizer_matches_brute_force():
    torch.manual_seed(0)
    q = TamingQuantizer(dim=6, codebook_size=20, commitment_weight=0.25)
    x = torch.randn(3, 7, 6, requires_grad=True)
    quantized, indices, loss = q(x)
    expected = torch.cdist(x.detach().reshape(-1, 6), q.codebook.detach()).argmin(1)
    assert torch.equal(indices.reshape(-1), expected)
    codes = q.codebook[indices]
    torch.testing.assert_close(quantized, codes)
    assert float(loss.detach()) == pytest.approx(1.25 * float(F.mse_loss(x, codes).detach()), rel=1e-5)
    quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight-through
    loss_only = TamingQuantizer(6, 20)
    loss_only.load_state_dict(q.state_dict())
    loss_only(x.detach())[2].backward()
    assert loss_only.embedding.weight.grad.abs().sum() > 0  # learnable codebook
    torch.testing.assert_close(q.get_output_from_indices(indices), codes)


def test_make_quantizer_errors_and_fair_settings():
    with pytest.raises(ValueError, match="quantizer must be one of"):
        make_quantizer("faiss", 8, 16)
    with pytest.raises(ValueError, match="'taming' does not support kmeans_init"):
        make_quantizer("taming", 8, 16, kmeans_init=True)
    for name in ("fastvq", VQT):
        if name == VQT and needs_vqp.args[0]:
            continue  # the fastvq layer's check is the one that always runs
        q = make_quantizer(name, 8, 16, decay=0.9, commitment_weight=0.5)
        assert not q.rotation_trick and q._codebook.decay == 0.9 and q.commitment_weight == 0.5


def test_lpips_from_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}
    save_file(weights, tmp_path / "lpips.safetensors")
    lpips = LPIPS.from_file(tmp_path / "lpips.safetensors")
    x, y = batch(2, 32, seed=1), batch(2, 32, seed=2)
    torch.testing.assert_close(lpips(x, x), torch.zeros(2))
    assert (lpips(x, y) > 0).all()
    assert not any(p.requires_grad for p in lpips.parameters())

    model = build("vqgan", "fastvq", disc_start=100)
    reconstruction, _, vq_loss = model(x)
    loss, logs = model.generator_loss(x, reconstruction, vq_loss, 0, perceptual=lpips)
    assert float(logs["p_loss"]) > 0
    expected = logs["rec_loss"] + logs["p_loss"] + logs["vq_loss"]
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0

    del weights["lin4.model.1.weight"]
    save_file(weights, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="missing 1 VGG16-LPIPS tensors"):
        LPIPS.from_file(tmp_path / "partial.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        LPIPS.from_file(tmp_path / "junk.pt")


class SleepInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.03)
        return grad


class SlowQuantizer(TamingQuantizer):
    """Spends 20 ms in forward and 30 ms in backward on top of the real work."""

    def forward(self, x):
        time.sleep(0.02)
        return super().forward(SleepInBackward.apply(x))


def test_quantizer_timer_counts_forward_and_backward():
    model = VQVAE(**TINY_VQVAE, quantizer=SlowQuantizer(8, 32))
    optimizers = make_optimizers(model, make_config("vqvae"))
    x = batch(8)
    train_step(model, optimizers, x, 0)  # warm-up
    timer = QuantizerTimer(model.quantizer, torch.device("cpu"))
    start = now(torch.device("cpu"))
    train_step(model, optimizers, x, 1)
    total = now(torch.device("cpu")) - start
    assert 0.05 <= timer.seconds < total
    timer.close()
    train_step(model, optimizers, x, 2)
    assert timer.seconds < total  # hooks removed: nothing more counted
