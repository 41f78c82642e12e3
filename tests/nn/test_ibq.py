"""fastvq.IBQ against IBQ's reference formula (SEED-Voken's `IndexPropagationQuantize`, written out densely
with its N x K tables in fastvq/nn/ibq_reference.py): outputs, the loss terms and the gradients to z and the
codebook within 1e-5 at small sizes; its rules for masks and non-finite tokens; its arguments and
state_dict; and O(N + K) extra memory for a training step where the dense formula needs >= 10x more."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PEAK_RSS_SOURCE, REFERENCE_ON_CPU, backend_cases

import fastvq
from fastvq.nn import IBQ
from fastvq.nn.ibq_reference import ibq_reference

OPTIONS = dict(beta=0.3, entropy_temperature=0.01, sample_minimization_weight=0.7, batch_maximization_weight=1.3)
NAMES = (
    "quantized",
    "indices",
    "quant_loss",
    "sample_entropy",
    "avg_entropy",
    "entropy_loss",
    "loss",
    "grad_z",
    "grad_codebook",
)


def make_layer(embedding, backend, **options):
    layer = IBQ(embedding.shape[1], embedding.shape[0], use_entropy_loss=True, backend=backend, **options)
    with torch.no_grad():
        layer.embedding.weight.copy_(embedding)
    return layer


def reference_run(z, embedding, decoder_grad, **options):
    """The reference in float64: its outputs, loss and the gradients of loss + <decoder_grad, z_q>."""
    z, embedding = z.double().requires_grad_(), embedding.double().requires_grad_()
    z_q, indices, quant_loss, sample_entropy, avg_entropy, entropy_loss = ibq_reference(
        z,
        embedding,
        beta=options["beta"],
        temperature=options["entropy_temperature"],
        sample_weight=options["sample_minimization_weight"],
        batch_weight=options["batch_maximization_weight"],
    )
    loss = quant_loss + entropy_loss
    grads = torch.autograd.grad(loss + (z_q * decoder_grad.double()).sum(), (z, embedding))
    return (z_q, indices, quant_loss, sample_entropy, avg_entropy, entropy_loss, loss, *grads)


def layer_run(layer, z, decoder_grad, device):
    z = z.to(device).requires_grad_()
    quantized, indices, loss, terms = layer.to(device)(z, return_loss_breakdown=True)
    grads = torch.autograd.grad(loss + (quantized * decoder_grad.to(device)).sum(), (z, layer.embedding.weight))
    return (quantized, indices.flatten(), *terms, loss, *grads)


def assert_matches(got, want):
    for name, value, expected in zip(NAMES, got, want):
        value = value.detach().cpu()
        if name == "indices":
            assert torch.equal(value, expected), name
            continue
        assert value.dtype == torch.float32, name
        scale = expected.abs().max().item()
        torch.testing.assert_close(
            value.double(), expected.detach(), rtol=1e-5, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("scale", ["near-uniform", "peaked"])
def test_outputs_losses_and_gradients_match_ibq_formula(device, backend, scale):
    """A feature map (B, D, H, W) as SEED-Voken takes it, non-default weights, a decoder gradient on the
    output; codes of scale 1 / K (softmaxes near uniform) and 0.3 (logits / 0.01 in the tens)."""
    batch, dim, height, width, n_codes = 2, 16, 5, 7, 300
    z = torch.randn(batch, dim, height, width) * (1.0 if scale == "near-uniform" else 0.3)
    embedding = (
        (torch.rand(n_codes, dim) * 2 - 1) / n_codes if scale == "near-uniform" else torch.randn(n_codes, dim) * 0.3
    )
    decoder_grad = torch.randn(batch, dim, height, width)
    got = layer_run(make_layer(embedding, backend, **OPTIONS), z, decoder_grad, device)
    assert got[0].shape == z.shape and got[1].dtype == torch.int64
    assert_matches(got, reference_run(z, embedding, decoder_grad, **OPTIONS))


def test_tokens_eval_and_no_entropy_loss():
    """Tokens (B, N, D) give the feature map's results; eval gives the same values (SEED-Voken computes
    the loss in eval too); without the entropy loss the loss is quant_loss and the entropy terms are 0."""
    z, embedding = torch.randn(2, 16, 3, 4), torch.randn(50, 16) * 0.3
    layer = make_layer(embedding, "torch", **OPTIONS)
    fmap = layer(z, return_loss_breakdown=True)
    tokens = layer(z.flatten(2).transpose(1, 2), return_loss_breakdown=True)
    assert torch.equal(tokens[0], fmap[0].flatten(2).transpose(1, 2)) and torch.equal(tokens[1], fmap[1].flatten(1))
    assert torch.equal(tokens[2], fmap[2])
    layer.eval()
    assert torch.equal(layer(z)[2], fmap[2])
    plain = IBQ(16, 50, beta=0.3, backend="torch")
    plain.load_state_dict(layer.state_dict())
    _, _, loss, terms = plain(z, return_loss_breakdown=True)
    assert torch.equal(loss, fmap[3].quant_loss)
    assert terms.sample_entropy == terms.avg_entropy == terms.entropy_loss == 0


def test_masked_and_non_finite_tokens_are_left_out():
    """They get index -1, pass through (value and gradient), and the losses are the reference's on the
    other tokens; a NaN token puts no NaN into the loss or a gradient."""
    z, embedding = torch.randn(2, 6, 8), torch.randn(40, 8) * 0.02  # logits / 0.01 of a few units
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = False
    z[1, 2, 3] = float("nan")
    kept = mask.clone()
    kept[1, 2] = False
    decoder_grad = torch.randn(2, 6, 8)
    layer = make_layer(embedding, "torch", **OPTIONS)
    zg = z.clone().requires_grad_()
    quantized, indices, loss, terms = layer(zg, mask=mask, return_loss_breakdown=True)
    grad_z, grad_codebook = torch.autograd.grad(loss + (quantized * decoder_grad).sum(), (zg, layer.embedding.weight))
    assert torch.equal(indices < 0, ~kept)
    torch.testing.assert_close(quantized[~kept].detach(), z[~kept], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(grad_z[~kept], decoder_grad[~kept]) and grad_codebook.isfinite().all()
    want = reference_run(z[kept].T[None, :, None, :], embedding, decoder_grad[kept].T[None, :, None, :], **OPTIONS)
    got = (
        quantized[kept].T[None, :, None, :],
        indices[kept],
        *terms,
        loss,
        grad_z[kept].T[None, :, None, :],
        grad_codebook,
    )
    assert_matches(got, want)
    assert float(layer.codebook_health()["nonfinite_tokens"]) == 1


def test_arguments_state_dict_and_health():
    layer = fastvq.IBQ(8, 32)
    assert [(k, tuple(v.shape)) for k, v in layer.state_dict().items()] == [("embedding.weight", (32, 8))]
    with pytest.raises(ValueError, match=r"entropy_temperature must be a number > 0, got 0"):
        IBQ(8, 32, entropy_temperature=0)
    with pytest.raises(ValueError, match=r"beta must be a number >= 0, got -1"):
        IBQ(8, 32, beta=-1)
    with pytest.raises(ValueError, match=r"mask and lens need sequence input"):
        layer(torch.randn(2, 8, 3, 3), mask=torch.ones(2, 9, dtype=torch.bool))
    _, indices, _ = layer(torch.randn(4, 10, 8))
    assert torch.isclose(layer.codebook_health()["usage"], torch.tensor(indices.unique().numel() / 32))


N, K, D = 2048, 131072, 16
NK_BYTES = N * K * 4  # one fp32 N x K table: 1 GiB; the reference holds at least six (logits, soft, hard,
LIMIT_BYTES = 3 * 2**30 // 10  # one_hot, probs, log_probs) and their gradients: >= 10x this bound

_STEP = (
    PEAK_RSS_SOURCE
    + f"""
import json, torch, fastvq
torch.set_num_threads(1)
torch.manual_seed(0)
layer = fastvq.IBQ({D}, {K}, use_entropy_loss=True, backend="torch")
for n in (8, {N}):  # the first step loads everything lazy, the second is measured
    z = torch.randn(1, {D}, 1, n, requires_grad=True)
    if n == {N}:
        before = peak_rss()
    quantized, indices, loss = layer(z)
    (loss + quantized.square().mean()).backward()
after = peak_rss()
print(json.dumps(dict(before=before, after=after, finite=bool(z.grad.isfinite().all()
                      and layer.embedding.weight.grad.isfinite().all()), used=int(indices.unique().numel()))))
"""
)


@pytest.mark.slow
def test_training_step_memory_is_linear():
    """An IBQ training step with the entropy loss at N = 2048, K = 131072, D = 16 on the torch backend
    adds less than 0.3 GiB of peak RSS (fresh process) where the dense formula needs >= 6 GiB."""
    assert 10 * LIMIT_BYTES <= 6 * NK_BYTES
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVQ_BACKEND", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["finite"] and report["used"] > 1
    extra = report["after"] - report["before"]
    assert extra < LIMIT_BYTES, f"the step added {extra / 2**20:.0f} MiB of peak RSS, expected < 307 MiB"
    print(f"extra peak RSS {extra / 2**20:.0f} MiB (one N x K fp32 table: {NK_BYTES / 2**20:.0f} MiB)")
