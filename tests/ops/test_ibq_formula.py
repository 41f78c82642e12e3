"""IBQ (TencentARC SEED-Voken `IndexPropagationQuantize` and its `compute_entropy_loss`), written densely
in float64 as its source reads (fastvq/nn/ibq_reference.py), against what a layer computes from fastvq's soft
ops (`soft_quantize` for the value and its gradient, `code_entropy` for the entropy loss, a lookup for
the hard code):
the quantized value and indices, the three-term quantization loss, the sample and batch entropies,
the entropy loss, and the gradients to z and the codebook, within 1e-5, at small sizes."""

import pytest
import torch
import torch.nn.functional as tF
from conftest import REFERENCE_ON_CPU, backend_cases

import fastvq
from fastvq.nn.ibq import AVG_ENTROPY_EPS
from fastvq.nn.ibq_reference import ibq_reference

BETA, TEMPERATURE, SAMPLE_WEIGHT, BATCH_WEIGHT = 0.25, 0.01, 1.0, 1.0


def ibq_from_ops(z, embedding, backend):
    """The same quantities as a layer computes them from fastvq's ops on tokens (B H W, D)."""
    batch, dim, height, width = z.shape
    tokens = z.permute(0, 2, 3, 1).reshape(-1, dim)
    quantized, indices = fastvq.soft_quantize(tokens, embedding, metric="dot", temperature=1.0, backend=backend)
    z_q = quantized.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    z_q_2 = tF.embedding(indices, embedding).reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    quant_loss = (
        torch.mean((z_q - z) ** 2)
        + torch.mean((z_q_2.detach() - z) ** 2)
        + BETA * torch.mean((z_q_2 - z.detach()) ** 2)
    )
    entropy, mean_probs = fastvq.code_entropy(tokens, embedding, metric="dot", temperature=TEMPERATURE, backend=backend)
    sample_entropy = entropy.mean()
    avg_entropy = -torch.sum(mean_probs * torch.log(mean_probs + AVG_ENTROPY_EPS))
    entropy_loss = SAMPLE_WEIGHT * sample_entropy - BATCH_WEIGHT * avg_entropy
    return z_q, indices, quant_loss, sample_entropy, avg_entropy, entropy_loss


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("codebook_scale", ["ibq-init", "trained"])
def test_ibq_loss_terms_and_gradients(device, backend, codebook_scale):
    """IBQ's initialisation (codebook uniform in +-1/K: near-uniform softmaxes) and a trained-like scale
    (logits / 0.01 in the tens: peaked ones); a decoder gradient on z_q joins the losses."""
    batch, dim, height, width, n_codes = 2, 16, 5, 7, 300
    z = torch.randn(batch, dim, height, width) * (1.0 if codebook_scale == "ibq-init" else 0.3)
    embedding = (
        (torch.rand(n_codes, dim) * 2 - 1) / n_codes
        if codebook_scale == "ibq-init"
        else torch.randn(n_codes, dim) * 0.3
    )
    decoder_grad = torch.randn(batch, dim, height, width)
    results = []
    for run, dtype, dev in (
        (lambda z, e: ibq_reference(z, e), torch.float64, "cpu"),
        (lambda z, e: ibq_from_ops(z, e, backend), torch.float32, device),
    ):
        zr = z.to(dtype).to(dev).requires_grad_()
        er = embedding.to(dtype).to(dev).requires_grad_()
        out = run(zr, er)
        total = out[2] + out[5] + (out[0] * decoder_grad.to(dtype).to(dev)).sum()
        results.append((*out, *torch.autograd.grad(total, (zr, er))))
    names = ("z_q", "indices", "quant_loss", "sample_entropy", "avg_entropy", "entropy_loss", "grad_z", "grad_codebook")
    for name, want, got in zip(names, *results):
        got = got.detach().cpu()
        if name == "indices":
            assert torch.equal(got, want), name
            continue
        scale = want.abs().max().item()
        torch.testing.assert_close(
            got.double(), want.detach(), rtol=1e-5, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )
