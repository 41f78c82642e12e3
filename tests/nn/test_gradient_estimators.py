"""fastvq.nn.gradient_estimators and fastvq.nn.losses against their formulas written out in float64:
straight-through and the rotation trick (values, gradients, what the rotation saves for backward),
the commitment loss with masks and the orthogonal regularisation (against the n x n form)."""

import pytest
import torch
import torch.nn.functional as F

from fastvq.nn.gradient_estimators import SAFE_DIV_EPS, rotate_to, straight_through
from fastvq.nn.losses import commitment_loss, orthogonal_loss


def rotation_written_out(src, tgt):
    """The rotation trick as Fifty et al. (2024) write it, with the layer's norm clamps."""
    src_norm = src.norm(dim=-1, keepdim=True).clamp_min(SAFE_DIV_EPS)
    tgt_norm = tgt.norm(dim=-1, keepdim=True)
    u, q = src / src_norm, tgt / tgt_norm.clamp_min(SAFE_DIV_EPS)
    w = F.normalize(u + q, dim=-1, eps=1e-6)
    u, q, w, scale = (t.detach() for t in (u, q, w, tgt_norm / src_norm))
    return (src - 2 * (src * w).sum(-1, keepdim=True) * w + 2 * (src * u).sum(-1, keepdim=True) * q) * scale


def test_straight_through_returns_the_codes_and_passes_the_gradient_unchanged():
    x = torch.randn(3, 7, 11, requires_grad=True)
    codes = torch.randn(3, 7, 11, requires_grad=True)
    out = straight_through(x, codes)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(out, codes, rtol=0, atol=1e-6)  # x + (codes - x): one rounding
    assert torch.equal(x.grad, grad) and codes.grad is None


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.float64, 1e-9)])
def test_rotate_to_matches_the_float64_formula(dtype, tolerance):
    """Values are the targets; gradients are the transposed rotation of the incoming gradient, within
    fp32 rounding of the float64 formula (away from src and tgt pointing opposite ways)."""
    torch.manual_seed(0)
    src = torch.randn(500, 2, 13, dtype=torch.float64)
    tgt = src + 0.7 * torch.randn_like(src)
    grad = torch.randn_like(src)
    leaf = src.clone().requires_grad_()
    want = rotation_written_out(leaf, tgt)
    want.backward(grad)
    got_leaf = src.to(dtype).requires_grad_()
    got = rotate_to(got_leaf, tgt.to(dtype))
    got.backward(grad.to(dtype))
    assert got.dtype == got_leaf.grad.dtype == dtype
    torch.testing.assert_close(got.double(), tgt, rtol=tolerance, atol=tolerance)
    scale = leaf.grad.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(got_leaf.grad.double() / scale, leaf.grad / scale, rtol=tolerance, atol=tolerance)


def test_rotate_to_at_zero_tokens_zero_codes_and_codes_on_the_tokens_direction():
    """rotate_to's forward and backward (from three row reductions) against autograd of the rotation
    trick as the paper writes it, in float64: values and gradients, also for a zero token, a zero
    code and a code on the token's own direction."""
    torch.manual_seed(0)
    src = torch.randn(200, 1, 33, dtype=torch.float64)
    tgt = src + torch.randn_like(src)
    src[0], tgt[1], tgt[2] = 0.0, 0.0, 3 * src[2]
    grad = torch.randn_like(src)

    results = []
    for f in (rotation_written_out, rotate_to):
        leaf = src.clone().requires_grad_()
        out = f(leaf, tgt)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[3:], tgt[3:], rtol=1e-9, atol=1e-9)  # the values are the codes'
    scale = 1 + src.norm(dim=-1, keepdim=True).clamp_min(SAFE_DIV_EPS).reciprocal() * tgt.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got_grad / scale, want_grad / scale, rtol=1e-9, atol=1e-9)


def test_rotate_to_saves_the_inputs_and_six_numbers_per_row():
    src, tgt = torch.randn(64, 9, requires_grad=True), torch.randn(64, 9)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        rotate_to(src, tgt)
    assert sum(saved) == 2 * 64 * 9 + 6 * 64, saved


@pytest.mark.parametrize("per_token", [False, True])
def test_commitment_loss_averages_the_unmasked_tokens(per_token):
    torch.manual_seed(1)
    codes, z = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    mask = torch.rand(2, 5) > 0.4
    loss = commitment_loss(codes, z, mask, per_token=per_token)
    sq = (codes.double() - z.double()).pow(2)
    if per_token:
        assert loss.shape == (2, 5, 3)
        torch.testing.assert_close(loss.double(), sq.mean(-1) * mask.unsqueeze(-1))
    else:
        torch.testing.assert_close(loss.double(), sq[mask].mean())
        torch.testing.assert_close(commitment_loss(codes, z).double(), sq.mean())


def test_orthogonal_loss_equals_the_pairwise_form():
    """mean over all code pairs (i, j) of cos(c_i, c_j)^2, minus 1 / n, per codebook, averaged:
    values and gradients against the n x n float64 form."""
    torch.manual_seed(2)
    codes = torch.randn(2, 13, 7, requires_grad=True)
    codes64 = codes.detach().double().requires_grad_()
    normed = F.normalize(codes64, dim=-1)
    cosines = normed @ normed.transpose(1, 2)
    want = (cosines.pow(2).mean((1, 2)) - 1 / 13).mean()
    got = orthogonal_loss(codes)
    want.backward()
    got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(codes.grad.double(), codes64.grad, rtol=1e-5, atol=1e-7)
    orthogonal = torch.linalg.qr(torch.randn(1, 7, 7))[0]  # 7 orthonormal codes: the loss is 0
    assert abs(float(orthogonal_loss(orthogonal))) < 1e-6
