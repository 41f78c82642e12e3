"""soft_quantize (IBQ's index backpropagation: the hard code's value, the softmax's gradient), forward
and both gradients, against the dense float64 oracle of IBQ's formula (`fastvq.ops.naive`:
one_hot = hard - soft.detach() + soft, quantized = one_hot @ codebook) on every backend that runs here
(tolerances: tests/ops/soft_checks.py)."""

import pytest
import torch
from conftest import REFERENCE_ON_CPU, backend_cases
from soft_checks import CASES, FACTOR, assert_close_to_oracle

import fastvq.ops.functional_soft as F
from fastvq.ops import chunked, naive
from fastvq.ops.common import METRICS


def check_indices(x, codebook, indices, metric):
    """indices (H, N) are the argmax of the float64 logits up to fp32 rounding: the chosen logit is
    within the dense fp32 logits' error of the largest, and is the largest where the runner-up is
    farther than that; -1 exactly for tokens with a non-finite entry."""
    logits64 = naive.logits(x, codebook, metric)
    logits32 = naive.logits(x, codebook, metric, dtype=torch.float32).double()
    error = FACTOR * (logits32 - logits64).nan_to_num().abs().max()
    finite = x.isfinite().all(-1)
    assert torch.equal(indices < 0, ~finite), "index -1 exactly for the tokens with a non-finite entry"
    top2 = logits64[finite].topk(2, dim=-1)
    chosen = logits64[finite].gather(-1, indices[finite][:, None])[:, 0]
    assert (top2.values[:, 0] - chosen <= error).all(), "a chosen code's logit is below the largest"
    clear = top2.values[:, 0] - top2.values[:, 1] > error
    assert torch.equal(indices[finite][clear], top2.indices[clear, 0]), "a clear argmax was not chosen"


def run_and_compare(x, codebook, device, backend, *, hard, metric, temperature):
    """The op against the oracle (given the op's indices, once they pass `check_indices`), in float64
    and in fp32 for the tolerance: quantized and the gradients of sum(grad * quantized) (grad representable
    in x's dtype: autograd hands the op the gradient of quantized in that dtype)."""
    grad = torch.randn(x.shape).to(x.dtype).float()
    xd, cd = x.detach().to(device).requires_grad_(), codebook.detach().to(device).requires_grad_()
    quantized, indices = F.soft_quantize(xd, cd, hard=hard, metric=metric, temperature=temperature, backend=backend)
    assert quantized.dtype == x.dtype and quantized.shape == x.shape and indices.dtype == torch.int64
    got = (quantized, *torch.autograd.grad((quantized * grad.to(device)).sum(), (xd, cd)))
    assert got[1].dtype == x.dtype and got[2].dtype == codebook.dtype
    indices = indices.cpu()
    check_indices(x, codebook, indices, metric)
    oracle = {}
    for dtype in (torch.float64, torch.float32):
        xo, co = x.detach().to(dtype).requires_grad_(), codebook.detach().to(dtype).requires_grad_()
        want, _ = naive.soft_quantize(
            xo, co, temperature=temperature, metric=metric, hard=hard, indices=indices, dtype=dtype
        )
        oracle[dtype] = (want, *torch.autograd.grad((want * grad.to(dtype)).sum(), (xo, co)))
    for name, value, want, dense32 in zip(
        ("quantized", "grad_x", "grad_codebook"), got, oracle[torch.float64], oracle[torch.float32]
    ):
        assert_close_to_oracle(name, value, want, dense32)
    return got, indices


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("H,shared,N,K,D", CASES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_forward_and_gradients_match_dense_float64(device, backend, H, shared, N, K, D, metric, hard):
    x = torch.randn(H, N, D)
    codebook = torch.randn(1 if shared else H, K, D)
    (quantized, _, _), indices = run_and_compare(
        x, codebook, device, backend, hard=hard, metric=metric, temperature=0.7 if hard else 1.0
    )
    if hard:  # the value is the chosen code itself, bit for bit
        chosen = codebook.expand(H, -1, -1).gather(1, indices[..., None].expand(-1, -1, D))
        assert torch.equal(quantized.detach().cpu(), chosen)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("temperature", [0.01, 3.0])
def test_temperatures(device, backend, temperature):
    """IBQ's entropy temperature (a near one-hot softmax: its terms must cancel as autograd's do) and a
    warm one."""
    run_and_compare(
        torch.randn(2, 40, 12),
        torch.randn(2, 90, 12),
        device,
        backend,
        hard=True,
        metric="dot",
        temperature=temperature,
    )


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_ties_go_to_the_lowest_index(device, backend):
    """Five copies of one code (3, long enough to win under every metric): in the same tile (5), in the
    next Triton tile of the same split (70), in another split (130), past the torch backend's 512-code
    tile (600). Every token near them picks 3; the soft value and the gradients weigh all five."""
    codebook = torch.randn(1, 700, 8)
    codebook[0, 3] *= 3
    codebook[0, 5] = codebook[0, 70] = codebook[0, 130] = codebook[0, 600] = codebook[0, 3]
    x = codebook[0, 3] + 0.01 * torch.randn(1, 20, 8)
    for metric in METRICS:
        _, indices = run_and_compare(x, codebook, device, backend, hard=True, metric=metric, temperature=1.0)
        assert (indices == 3).all(), f"{metric}: {indices.tolist()}"


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_non_finite_tokens_pass_through(device, backend, hard):
    """A token with a NaN or inf entry gets index -1 and passes x through, value and gradient (as
    lookup_codes does); the others and the codebook's gradient are unaffected (finite)."""
    x = torch.randn(1, 30, 6)
    x[0, 2, 1], x[0, 9, 0], x[0, 10, 5] = float("nan"), float("inf"), -float("inf")
    (quantized, grad_x, grad_codebook), indices = run_and_compare(
        x, torch.randn(1, 50, 6), device, backend, hard=hard, metric="l2", temperature=1.0
    )
    bad = torch.tensor([2, 9, 10])
    assert (indices[0, bad] == -1).all() and (indices[0, [0, 1, 3]] >= 0).all()
    torch.testing.assert_close(quantized[0, bad].cpu(), x[0, bad], equal_nan=True)
    assert grad_codebook.isfinite().all() and grad_x.isfinite().all()


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs(device, backend, dtype):
    """Logits of the 16-bit values in fp32; the value and the gradients come back in the inputs' dtype."""
    run_and_compare(
        torch.randn(2, 37, 16).to(dtype),
        torch.randn(1, 70, 16).to(dtype),
        device,
        backend,
        hard=True,
        metric="dot",
        temperature=1.0,
    )


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_gradient_only_where_required(device, backend):
    x = torch.randn(20, 6, device=device, requires_grad=True)
    codebook = torch.randn(30, 6, device=device)
    quantized, _ = F.soft_quantize(x, codebook, backend=backend)
    quantized.square().sum().backward()
    assert codebook.grad is None and x.grad.abs().sum() > 0
    codebook.requires_grad_()
    quantized, _ = F.soft_quantize(x.detach(), codebook, backend=backend)
    quantized.square().sum().backward()
    assert codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_shapes_non_contiguous_and_empty(device, backend):
    wide = torch.randn(2, 50, 66, device=device)
    x = wide[:, ::2, 1::2]
    codebook = torch.randn(33, 70, device=device).t()
    for hard in (True, False):
        got = F.soft_quantize(x, codebook, metric="cosine", hard=hard, backend=backend)
        want = F.soft_quantize(x.contiguous(), codebook.contiguous(), metric="cosine", hard=hard, backend=backend)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    quantized, indices = F.soft_quantize(x[0], codebook, backend=backend)
    assert quantized.shape == (25, 33) and indices.shape == (25,)
    empty = torch.randn(2, 0, 33, device=device, requires_grad=True)
    quantized, indices = F.soft_quantize(empty, codebook, backend=backend)
    assert quantized.shape == (2, 0, 33) and indices.shape == (2, 0)
    quantized.sum().backward()
    assert empty.grad.shape == (2, 0, 33)


@pytest.mark.parametrize("hard", [True, False])
def test_opcheck(hard):
    """The custom op's schema, fake tensors and autograd registration (torch.library.opcheck)."""
    x = torch.randn(2, 9, 4, requires_grad=True)
    codebook = torch.randn(2, 7, 4, requires_grad=True)
    torch.library.opcheck(F._soft_quantize_op, (x, codebook, 0.5, hard, "dot", "ieee", "torch"))


BAD_ARGUMENTS = [
    (dict(temperature=-1.0), ValueError, "temperature must be a finite float > 0, got -1.0"),
    (dict(temperature=None), TypeError, "temperature must be a float, got NoneType"),
    (dict(hard=1), TypeError, "hard must be a bool, got int"),
    (dict(metric="hamming"), ValueError, "metric must be one of"),
    (dict(precision="fp8"), ValueError, "precision must be None or one of"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_ARGUMENTS)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        F.soft_quantize(torch.randn(4, 3), torch.randn(20, 3), **kwargs)
    with pytest.raises(ValueError, match="x and codebook must share the last dimension D"):
        F.soft_quantize(torch.randn(4, 3), torch.randn(20, 2))


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_torch_compile_fullgraph(device, backend):
    """An IBQ-like step through both soft ops compiles to one graph, forward and backward, and gives
    eager's loss and gradients."""

    def step(x, codebook):
        quantized, _ = F.soft_quantize(x, codebook, metric="dot", backend=backend)
        entropy, mean_probs = F.code_entropy(x, codebook, metric="dot", temperature=0.1, backend=backend)
        return (quantized - x).square().mean() + entropy.mean() + (mean_probs * mean_probs.log()).sum()

    x = torch.randn(20, 8, device=device, requires_grad=True)
    codebook = torch.randn(12, 8, device=device, requires_grad=True)
    compiled_loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x, codebook)
    compiled_grads = torch.autograd.grad(compiled_loss, (x, codebook))
    loss = step(x, codebook)
    torch.testing.assert_close(compiled_loss, loss)
    for got, want in zip(compiled_grads, torch.autograd.grad(loss, (x, codebook))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_torch_backend_across_code_and_token_tiles(hard):
    """The torch backend's tiles (`chunked.CODES_PER_TILE` codes, `chunked.SCORE_TILE_ELEMENTS` scores):
    K spans two code tiles and N two token tiles, with a shared codebook."""
    k = chunked.CODES_PER_TILE + 70
    n = chunked.SCORE_TILE_ELEMENTS // chunked.CODES_PER_TILE + 6
    x, codebook = torch.randn(2, n, 5), torch.randn(1, k, 5)
    run_and_compare(x, codebook, "cpu", "torch", hard=hard, metric="cosine", temperature=0.5)
