"""code_cross_entropy: forward and both gradients against the dense float64 oracle (`fastvq.ops.naive`,
itself checked against F.cross_entropy in tests/ops/test_naive_oracle.py).

Tolerances: logits are computed in fp32 from fp32 (or rounded 16-bit) operands, so the loss and
the gradients are compared at 2e-5 relative to their scale plus 2e-5 absolute for fp32 inputs, and
against the float64 result of the same rounded inputs at 1e-2 for 16-bit ones.
"""

import pytest
import torch
import torch.nn.functional as tF
from conftest import REFERENCE_ON_CPU, backend_cases, case

import fastvq.ops.functional as F
from fastvq.ops import chunked, naive
from fastvq.ops.common import METRICS

CASES = [
    case(H=1, shared=False, N=70, K=130, D=8),  # several code tiles
    case(H=2, shared=True, N=33, K=300, D=20),  # small N: code splits
    case(H=2, shared=False, N=5, K=200, D=150),  # one codebook per head, D streamed in chunks
]


def dense_loss_and_grads(x, codebook, indices, grad, metric):
    """The oracle's per-token loss and the gradients of sum(grad * loss) w.r.t. x and the codebook, float64."""
    loss, lse = naive.code_cross_entropy(x, codebook, indices, metric=metric)
    return loss, *(
        naive.code_cross_entropy_grad(x, codebook, indices, lse, grad, wrt, metric=metric) for wrt in ("x", "codebook")
    )


def assert_close_scaled(got, want, rel):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double().cpu(), want, rtol=rel, atol=rel * scale + rel)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("H,shared,N,K,D", CASES)
@pytest.mark.parametrize("metric", METRICS)
def test_forward_and_gradients_match_dense_float64(device, backend, H, shared, N, K, D, metric):
    x = torch.randn(H, N, D)
    codebook = torch.randn(1 if shared else H, K, D)
    indices = torch.randint(-1, K, (H, N))
    grad = torch.randn(H, N)
    want_loss, want_grad_x, want_grad_codebook = dense_loss_and_grads(x, codebook, indices, grad, metric)
    xd = x.to(device).requires_grad_()
    cbd = codebook.to(device).requires_grad_()
    loss = F.code_cross_entropy(xd, cbd, indices.to(device), metric=metric, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == (H, N)
    assert (loss.cpu()[indices < 0] == 0).all()
    (loss * grad.to(device)).sum().backward()
    assert_close_scaled(loss.detach(), want_loss, 2e-5)
    assert_close_scaled(xd.grad, want_grad_x, 2e-5)
    assert_close_scaled(cbd.grad, want_grad_codebook, 2e-5)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_inputs(device, backend, dtype):
    """Logits of the 16-bit values in fp32; gradients come back in the inputs' dtype."""
    x = torch.randn(40, 16).to(dtype)
    codebook = torch.randn(70, 16).to(dtype)
    indices = torch.randint(0, 70, (40,))
    want_loss, want_grad_x, want_grad_codebook = dense_loss_and_grads(
        x[None], codebook[None], indices[None], torch.ones(1, 40), "l2"
    )
    xd = x.to(device).requires_grad_()
    cbd = codebook.to(device).requires_grad_()
    loss = F.code_cross_entropy(xd, cbd, indices.to(device), backend=backend)
    loss.sum().backward()
    assert xd.grad.dtype == dtype and cbd.grad.dtype == dtype
    assert_close_scaled(loss.detach(), want_loss[0], 1e-2)
    assert_close_scaled(xd.grad, want_grad_x[0], 1e-2)
    assert_close_scaled(cbd.grad, want_grad_codebook[0], 1e-2)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_far_logits_are_stable(device, backend):
    """Tokens far from every code (logits around -200, spread over tens): the online log-sum-exp
    must not underflow, and the mean over non-ignored tokens is the anchor's loss."""
    x = torch.randn(50, 8) * 3 + 200.0
    codebook = torch.randn(90, 8) * 30
    indices = torch.randint(-1, 90, (50,))
    want = tF.cross_entropy(naive.logits(x[None], codebook[None], "l2")[0], indices, ignore_index=-1)
    loss = F.code_cross_entropy(x.to(device), codebook.to(device), indices.to(device), backend=backend)
    assert loss.isfinite().all()
    got = loss.sum() / (indices >= 0).sum().to(device)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_gradient_only_where_required(device, backend):
    """A frozen codebook gets no gradient (and no second pass); x still gets its own."""
    x = torch.randn(20, 6, device=device, requires_grad=True)
    codebook = torch.randn(30, 6, device=device)
    F.code_cross_entropy(x, codebook, torch.randint(0, 30, (20,), device=device), backend=backend).mean().backward()
    assert codebook.grad is None and x.grad is not None and x.grad.abs().sum() > 0
    codebook.requires_grad_()
    x.grad = None
    F.code_cross_entropy(
        x.detach(), codebook, torch.randint(0, 30, (20,), device=device), backend=backend
    ).mean().backward()
    assert codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_non_contiguous_inputs_and_shapes(device, backend):
    wide = torch.randn(2, 50, 66, device=device)
    x = wide[:, ::2, 1::2]
    codebook = torch.randn(33, 70, device=device).t()
    indices = torch.randint(-1, 70, (2, 25), device=device)
    got = F.code_cross_entropy(x, codebook, indices, metric="cosine", backend=backend)
    want = F.code_cross_entropy(x.contiguous(), codebook.contiguous(), indices, metric="cosine", backend=backend)
    torch.testing.assert_close(got, want)
    assert F.code_cross_entropy(x[0], codebook, indices[0].int(), backend=backend).shape == (25,)
    empty = torch.randn(2, 0, 33, device=device, requires_grad=True)
    loss = F.code_cross_entropy(empty, codebook, indices[:, :0], backend=backend)
    loss.sum().backward()
    assert loss.shape == (2, 0) and empty.grad.shape == (2, 0, 33)


@pytest.mark.parametrize("device,backend", backend_cases(REFERENCE_ON_CPU))
def test_non_finite_token_gives_nan_loss(device, backend):
    x = torch.randn(4, 5)
    x[2, 1] = float("nan")
    loss = F.code_cross_entropy(
        x.to(device), torch.randn(9, 5, device=device), torch.tensor([0, 1, 2, 3], device=device), backend=backend
    ).cpu()
    assert loss[2].isnan() and loss[[0, 1, 3]].isfinite().all()


def test_opcheck():
    """The custom ops' schemas, fake tensors and autograd registration (torch.library.opcheck)."""
    x = torch.randn(1, 9, 4, requires_grad=True)
    codebook = torch.randn(1, 7, 4, requires_grad=True)
    indices = torch.randint(-1, 7, (1, 9))
    torch.library.opcheck(F._code_cross_entropy_op, (x, codebook, indices, "cosine", "ieee", "torch"))


def test_bad_arguments_are_named():
    x, codebook = torch.randn(4, 3), torch.randn(20, 3)
    with pytest.raises(ValueError, match=r"indices must have shape x.shape\[:-1\] = \(4,\)"):
        F.code_cross_entropy(x, codebook, torch.zeros(5, dtype=torch.int64))
    for dtype in (torch.int16, torch.float32):
        with pytest.raises(TypeError, match=r"indices must be an integer tensor \(int64 or int32\)"):
            F.code_cross_entropy(x, codebook, torch.zeros(4, dtype=dtype))
    with pytest.raises(ValueError, match=r"indices must be in \[-1, num_codes=20\)"):
        F.code_cross_entropy(x, codebook, torch.tensor([0, 1, 20, -1]))
    with pytest.raises(ValueError, match="metric"):
        F.code_cross_entropy(x, codebook, torch.zeros(4, dtype=torch.int64), metric="hamming")


@pytest.mark.parametrize("device,backend", backend_cases())
def test_dot_metric_is_a_fused_linear_cross_entropy_with_bias(device, backend):
    """metric="dot" against nn.Linear + F.cross_entropy, the bias as an extra feature ([h, 1] against
    [W, b]): loss and the gradients of h, W and b within fp32 tolerance."""
    hidden = torch.randn(37, 19, device=device, requires_grad=True)
    linear = torch.nn.Linear(19, 301).to(device)
    targets = torch.randint(0, 301, (37,), device=device)
    want = tF.cross_entropy(linear(hidden), targets, reduction="none")
    want_grads = torch.autograd.grad(want.sum(), (hidden, linear.weight, linear.bias))
    ones = torch.ones(37, 1, device=device)
    loss = F.code_cross_entropy(
        torch.cat([hidden, ones], 1),
        torch.cat([linear.weight, linear.bias[:, None]], 1),
        targets,
        metric="dot",
        backend=backend,
    )
    grads = torch.autograd.grad(loss.sum(), (hidden, linear.weight, linear.bias))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_torch_backend_across_code_and_token_tiles(metric):
    """The torch backend's tiles (`chunked.CODES_PER_TILE` codes, `chunked.SCORE_TILE_ELEMENTS` scores):
    K spans two code tiles and N two token tiles, with targets on both sides of the code tiles' border."""
    k = chunked.CODES_PER_TILE + 70
    n = chunked.SCORE_TILE_ELEMENTS // chunked.CODES_PER_TILE + 6
    x, codebook = torch.randn(1, n, 5), torch.randn(1, k, 5)
    indices = torch.randint(-1, k, (1, n))
    indices[:, :4] = torch.tensor([0, chunked.CODES_PER_TILE - 1, chunked.CODES_PER_TILE, k - 1])
    grad = torch.randn(1, n)
    want_loss, want_grad_x, want_grad_codebook = dense_loss_and_grads(x, codebook, indices, grad, metric)
    xd, cbd = x.clone().requires_grad_(), codebook.clone().requires_grad_()
    loss = F.code_cross_entropy(xd, cbd, indices, metric=metric, backend="torch")
    (loss * grad).sum().backward()
    assert_close_scaled(loss.detach(), want_loss, 2e-5)
    assert_close_scaled(xd.grad, want_grad_x, 2e-5)
    assert_close_scaled(cbd.grad, want_grad_codebook, 2e-5)
