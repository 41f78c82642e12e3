"""code_entropy: the per-token entropy of softmax(logits / T) and its mean over the batch, forward and
both gradients, against the dense float64 oracle (`fastvq.ops.naive`) on every backend that runs
here (tolerances: tests/ops/soft_checks.py)."""

import pytest
import torch
from conftest import REFERENCE_ON_CPU, backend_cases, needs_vqp
from soft_checks import CASES, assert_close_to_oracle

import fastvq.ops.functional_soft as F
from fastvq.ops import chunked, naive
from fastvq.ops.common import METRICS

TEMPERATURES = [
    pytest.param(1.0, None, id="T1-exact"),  # MAGVIT's / IBQ's formula
    pytest.param(0.01, 1e-5, id="T0.01-clamp1e-5"),  # IBQ's temperature, vector-quantize-pytorch's clamp
]


def _loss(entropy, mean_probs, grad_entropy, grad_mean_probs):
    """A random linear loss of both outputs (the NaN entropies of non-finite tokens left out)."""
    return torch.where(entropy.isnan(), 0.0, entropy * grad_entropy).sum() + (mean_probs * grad_mean_probs).sum()


def run_and_compare(x, codebook, mask, device, backend, *, grad_entropy=None, grad_mean_probs=None, **options):
    """Run the op and the oracle (float64, and in fp32 for the tolerance) on canonical x (H, N, D) and
    codebook (Hc, K, D); compare both outputs and the gradients of a random linear loss of them.
    Returns the op's (entropy, mean_probs, grad_x, grad_codebook)."""
    if grad_entropy is None:
        grad_entropy = torch.randn(x.shape[:2])
    if grad_mean_probs is None:
        grad_mean_probs = torch.randn(x.shape[0], codebook.shape[1])
    oracle = {}
    for dtype in (torch.float64, torch.float32):
        xo, co = x.detach().to(dtype).requires_grad_(), codebook.detach().to(dtype).requires_grad_()
        entropy, mean_probs = naive.code_entropy(xo, co, mask, dtype=dtype, **options)
        loss = _loss(entropy, mean_probs, grad_entropy.to(dtype), grad_mean_probs.to(dtype))
        oracle[dtype] = (entropy, mean_probs, *torch.autograd.grad(loss, (xo, co)))
    xd, cd = x.detach().to(device).requires_grad_(), codebook.detach().to(device).requires_grad_()
    got = F.code_entropy(xd, cd, mask=None if mask is None else mask.to(device), backend=backend, **options)
    assert got[0].dtype == got[1].dtype == torch.float32
    got = (*got, *torch.autograd.grad(_loss(*got, grad_entropy.to(device), grad_mean_probs.to(device)), (xd, cd)))
    assert got[2].dtype == x.dtype and got[3].dtype == codebook.dtype
    for name, value, want, dense32 in zip(
        ("entropy", "mean_probs", "grad_x", "grad_codebook"), got, oracle[torch.float64], oracle[torch.float32]
    ):
        assert_close_to_oracle(name, value, want, dense32)
    return got


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("H,shared,N,K,D", CASES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("temperature,log_clamp_min", TEMPERATURES)
def test_forward_and_gradients_match_dense_float64(
    device, backend, H, shared, N, K, D, metric, temperature, log_clamp_min
):
    x = torch.randn(H, N, D)
    codebook = torch.randn(1 if shared else H, K, D)
    entropy, mean_probs, _, _ = run_and_compare(
        x, codebook, None, device, backend, metric=metric, temperature=temperature, log_clamp_min=log_clamp_min
    )
    assert (entropy >= -1e-6).all() and torch.allclose(mean_probs.sum(-1).cpu(), torch.ones(H), atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("temperature,log_clamp_min", [(0.01, None), (1.0, 1e-5), (0.3, 0.02)])
def test_other_temperatures_and_clamps(device, backend, temperature, log_clamp_min):
    """The crossings TEMPERATURES leaves out, and a clamp above many probabilities (0.02 of 61 codes)."""
    run_and_compare(
        torch.randn(2, 45, 12),
        torch.randn(2, 61, 12),
        None,
        device,
        backend,
        metric="l2",
        temperature=temperature,
        log_clamp_min=log_clamp_min,
    )


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("log_clamp_min", [None, 1e-5])
def test_masks_and_non_finite_tokens(device, backend, log_clamp_min):
    """Masked tokens: entropy 0; unmasked tokens with a NaN or inf entry: NaN. Neither is in the mean nor
    gets a gradient (their rows of grad_x are 0, and the codebook's gradient stays finite)."""
    x = torch.randn(2, 40, 6)
    mask = torch.rand(2, 40) > 0.3
    x[0, 3, 1], x[0, 4, 0], x[1, 7, 2] = float("nan"), float("inf"), -float("inf")
    mask[0, 3], mask[0, 4], mask[1, 7], mask[1, 8] = True, False, True, False
    x[1, 8, 5] = float("nan")  # masked and non-finite: 0
    entropy, mean_probs, grad_x, grad_codebook = run_and_compare(
        x, torch.randn(1, 50, 6), mask, device, backend, metric="cosine", temperature=0.5, log_clamp_min=log_clamp_min
    )
    entropy, grad_x = entropy.cpu(), grad_x.cpu()
    assert entropy[0, 3].isnan() and entropy[1, 7].isnan()
    assert (entropy[~mask] == 0).all() and entropy[mask].isnan().sum() == 2
    excluded = ~mask | ~x.isfinite().all(-1)
    assert (grad_x[excluded] == 0).all() and grad_x[~excluded].abs().sum() > 0
    assert grad_codebook.isfinite().all() and mean_probs.isfinite().all()


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_a_head_with_every_token_left_out(device, backend):
    """The mean over no token is NaN (torch's mean of nothing), as vector-quantize-pytorch's LFQ gives
    with everything masked; the other head is unaffected, and nothing gets a NaN gradient."""
    x = torch.randn(2, 9, 5, device=device, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1] = False
    entropy, mean_probs = F.code_entropy(x, torch.randn(11, 5, device=device), mask=mask, backend=backend)
    assert mean_probs[1].isnan().all() and mean_probs[0].isfinite().all() and (entropy[1] == 0).all()
    (entropy.sum() + mean_probs[0].sum()).backward()
    assert x.grad.isfinite().all() and (x.grad[1] == 0).all()


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs(device, backend, dtype):
    """Logits of the 16-bit values in fp32 (the oracle sees the same values); gradients come back in the
    inputs' dtype, so they may differ by its rounding too."""
    run_and_compare(
        torch.randn(2, 37, 16).to(dtype),
        torch.randn(1, 70, 16).to(dtype),
        None,
        device,
        backend,
        metric="dot",
        temperature=0.1,
        log_clamp_min=None,
    )


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_one_output_s_gradient_alone(device, backend):
    """Only the mean used (the per-token entropy's gradient never arrives), then only the entropy (the
    pass for the mean's gradient is skipped): each as the oracle's."""
    x, codebook = torch.randn(1, 30, 7), torch.randn(1, 40, 7)
    run_and_compare(x, codebook, None, device, backend, grad_entropy=torch.zeros(1, 30), temperature=0.2)
    run_and_compare(x, codebook, None, device, backend, grad_mean_probs=torch.zeros(1, 40), temperature=0.2)
    xd = x.to(device).requires_grad_()
    _, mean_probs = F.code_entropy(xd, codebook.to(device), backend=backend)
    (grad_mean_only,) = torch.autograd.grad(mean_probs[0, 3], xd)
    entropy, _ = F.code_entropy(xd, codebook.to(device), backend=backend)
    (grad_entropy_only,) = torch.autograd.grad(entropy.sum(), xd)
    assert grad_mean_only.abs().sum() > 0 and grad_entropy_only.abs().sum() > 0


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_gradient_only_where_required(device, backend):
    x = torch.randn(20, 6, device=device, requires_grad=True)
    codebook = torch.randn(30, 6, device=device)
    entropy, mean_probs = F.code_entropy(x, codebook, backend=backend)
    (entropy.sum() + mean_probs.square().sum()).backward()
    assert codebook.grad is None and x.grad.abs().sum() > 0
    codebook.requires_grad_()
    entropy, _ = F.code_entropy(x.detach(), codebook, backend=backend)
    entropy.sum().backward()
    assert codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_shapes_non_contiguous_and_empty(device, backend):
    wide = torch.randn(2, 50, 66, device=device)
    x = wide[:, ::2, 1::2]
    codebook = torch.randn(33, 70, device=device).t()
    got = F.code_entropy(x, codebook, metric="cosine", backend=backend)
    want = F.code_entropy(x.contiguous(), codebook.contiguous(), metric="cosine", backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    entropy, mean_probs = F.code_entropy(x[0], codebook, backend=backend)
    assert entropy.shape == (25,) and mean_probs.shape == (70,)
    empty = torch.randn(2, 0, 33, device=device, requires_grad=True)
    entropy, mean_probs = F.code_entropy(empty, codebook, backend=backend)
    assert entropy.shape == (2, 0) and mean_probs.shape == (2, 70) and mean_probs.isnan().all()
    entropy.sum().backward()
    assert empty.grad.shape == (2, 0, 33)


@needs_vqp
def test_lfq_entropies_of_vector_quantize_pytorch():
    """vector-quantize-pytorch 1.32.0's LFQ: probs = softmax(-distance * inv_temperature) with distance =
    -2 x . c, per-sample entropy = mean of entropy(probs), codebook entropy = entropy(mean probs), its
    `entropy` clamping probabilities at 1e-5: the dot metric at T = 1 / (2 inv_temperature) with
    log_clamp_min=1e-5 gives them (its own helper computes the reference)."""
    from vector_quantize_pytorch.lookup_free_quantization import entropy as vqp_entropy

    dim, inv_temperature = 6, 100.0
    codebook = (((torch.arange(2**dim)[:, None] >> torch.arange(dim - 1, -1, -1)) & 1) * 2 - 1).float()
    x = torch.randn(300, dim) * 0.1
    probs = (-(-2 * x @ codebook.T) * inv_temperature).softmax(-1)
    entropy, mean_probs = F.code_entropy(
        x, codebook, metric="dot", temperature=1 / (2 * inv_temperature), log_clamp_min=1e-5, backend="torch"
    )
    torch.testing.assert_close(entropy.mean(), vqp_entropy(probs).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vqp_entropy(mean_probs), vqp_entropy(probs.mean(0)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(with_mask):
    """The custom op's schema, fake tensors and autograd registration (torch.library.opcheck)."""
    x = torch.randn(2, 9, 4, requires_grad=True)
    codebook = torch.randn(1, 7, 4, requires_grad=True)
    mask = torch.rand(2, 9) > 0.2 if with_mask else None
    torch.library.opcheck(
        F._code_entropy_op, (x, codebook, mask, 0.5, 1e-5 if with_mask else None, "l2", "ieee", "torch")
    )


BAD_ARGUMENTS = [
    (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0, got 0.0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite float > 0"),
    (dict(temperature="1"), TypeError, "temperature must be a float, got str"),
    (dict(log_clamp_min=1.0), ValueError, r"log_clamp_min must be None or a float in \(0, 1\), got 1.0"),
    (dict(log_clamp_min=0.0), ValueError, r"log_clamp_min must be None or a float in \(0, 1\)"),
    (
        dict(mask=torch.ones(5, dtype=torch.bool)),
        ValueError,
        r"mask must be a bool tensor of shape x.shape\[:-1\] = \(4,\)",
    ),
    (dict(mask=torch.ones(4)), ValueError, "mask must be a bool tensor"),
    (dict(metric="hamming"), ValueError, "metric must be one of"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_ARGUMENTS, ids=lambda v: None)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        F.code_entropy(torch.randn(4, 3), torch.randn(20, 3), **kwargs)


@pytest.mark.parametrize("dim", [3, 16, 33, 64, 70, 128, 300])
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16", "fp16"])
def test_every_triton_pass_cuts_d_the_same_way(dim, precision):
    """The soft ops' passes recompute the logits; they must be bit-identical across passes (at T = 0.01 a
    rounding difference is multiplied by 100 in log p), so every pass's configuration cuts D alike."""
    pytest.importorskip("triton")
    from fastvq.ops.triton._launch import search_config
    from fastvq.ops.triton._softmax_grad import grad_pass_config
    from fastvq.ops.triton._softmax_passes import _stats_config, pass_config

    device = torch.device("cpu")
    configs = [_stats_config(4096, 16384, dim, 2, precision, device, soft) for soft in (False, True)]
    configs.append(pass_config(search_config(4096, 16384, dim, 2, precision, device, logits=True), dim, precision))
    configs += [
        grad_pass_config(4096, 16384, dim, 2, precision, device, code_side, g_term)
        for code_side in (False, True)
        for g_term in (False, True)
    ]
    assert len({(c["SINGLE_D_TILE"], c["BLOCK_D"]) for c in configs}) == 1


@pytest.mark.parametrize("log_clamp_min", [None, 1e-3])
def test_torch_backend_across_code_and_token_tiles(log_clamp_min):
    """The torch backend's tiles (`chunked.CODES_PER_TILE` codes, `chunked.SCORE_TILE_ELEMENTS` scores):
    K spans two code tiles and N two token tiles, one codebook per head, with a mask."""
    k = chunked.CODES_PER_TILE + 70
    n = chunked.SCORE_TILE_ELEMENTS // chunked.CODES_PER_TILE + 6
    x, codebook = torch.randn(2, n, 5), torch.randn(2, k, 5)
    mask = torch.rand(2, n) < 0.8
    run_and_compare(x, codebook, mask, "cpu", "torch", metric="l2", temperature=0.5, log_clamp_min=log_clamp_min)
