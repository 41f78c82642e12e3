"""fastvq.LFQ against vector-quantize-pytorch 1.32.0's LFQ (the anchor): a matrix of configurations and
layouts, trained for three steps (outputs, indices, the aux loss and every term of the loss breakdown,
the input and parameter gradients within test_layer_parity's 1e-5), eval bit-identical, state_dicts
loading both ways; and where 1.32.0 is wrong (a token mask's batch entropy), against the right value."""

import pytest
import torch
from scalar_checks import compare_eval, compare_steps
from test_layer_parity import close
from torch import nn
from torch.func import functional_call

from fastvq.nn import LFQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

BATCH, SEQ = 2, 13

CONFIGS = {  # constructor arguments; dim defaults to log2(codebook_size) * num_codebooks
    "default": dict(codebook_size=64),
    "dim-only": dict(dim=5),
    "codebooks": dict(codebook_size=16, num_codebooks=3),
    "projection": dict(codebook_size=32, dim=11),
    "projection-without-bias": dict(codebook_size=32, dim=11, projection_has_bias=False),
    "codebooks-projection": dict(codebook_size=8, num_codebooks=2, dim=7),
    "cosine-sim-project-in": dict(codebook_size=32, dim=11, cosine_sim_project_in=True, codebook_scale=0.4),
    "cosine-sim-project-in-scale": dict(
        codebook_size=32, dim=9, cosine_sim_project_in=True, cosine_sim_project_in_scale=0.3
    ),
    "spherical": dict(codebook_size=64, spherical=True),
    "spherical-scaled-codebooks": dict(codebook_size=32, num_codebooks=2, spherical=True, codebook_scale=0.7),
    "soft-clamp": dict(codebook_size=32, soft_clamp_input_value=1.5, codebook_scale=1.2),
    "commitment": dict(codebook_size=64, commitment_loss_weight=0.25),
    "weights": dict(codebook_size=32, entropy_loss_weight=0.3, diversity_gamma=2.5),
    "softplus": dict(codebook_size=32, experimental_softplus_entropy_loss=True, entropy_loss_offset=0.5),
    "orthogonal-rotation": dict(codebook_size=64, orthogonal_rotation=True, commitment_loss_weight=0.1),
    "tanh-straight-through": dict(codebook_size=32, straight_through_activation=nn.Tanh()),
    "keep-codebooks-dim": dict(codebook_size=32, keep_num_codebooks_dim=True),
    "not-forced-f32": dict(codebook_size=32, force_quantization_f32=False),
    "frac-per-sample-entropy": dict(codebook_size=64, frac_per_sample_entropy=0.5),
    "frac-codebooks": dict(codebook_size=16, num_codebooks=2, frac_per_sample_entropy=0.3),
}


class Flat(nn.Module):
    """The quantizer with return_loss_breakdown=True, its two namedtuples as one flat tuple, so the
    shared step protocol compares the breakdown's terms (and their gradients) too. With float64, the
    quantizer (the anchor, built with force_quantization_f32=False) runs on float64 copies of its
    parameters, buffers and input and returns float32: 1.32.0's formula without its own fp32 rounding,
    which reaches 4e-5 of the largest input gradient at inv_temperature 100 (fastvq's is 10x smaller)."""

    def __init__(self, quantizer, float64=False):
        super().__init__()
        self.quantizer, self.float64 = quantizer, float64

    def forward(self, x, **kwargs):
        kwargs = dict(kwargs, return_loss_breakdown=True)
        if not self.float64:
            result, breakdown = self.quantizer(x, **kwargs)
            return (*result, *breakdown)
        named = [*self.quantizer.named_parameters(), *self.quantizer.named_buffers()]
        state = {name: t.double() if t.is_floating_point() else t for name, t in named}
        result, breakdown = functional_call(self.quantizer, state, (x.double(),), kwargs)
        return tuple(t.float() if t.is_floating_point() else t for t in (*result, *breakdown))


def make_pair(**kwargs):
    anchor = anchor_module.LFQ(**kwargs)
    torch.manual_seed(1234)  # fastvq built from another RNG state: its state must come from the anchor
    ours = LFQ(**kwargs)
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    ours.load_state_dict(anchor.state_dict())
    anchor.load_state_dict(ours.state_dict())
    return anchor, ours


def compare_training(kwargs, ours, inputs, **forward_kwargs):
    """compare_steps of ours (built with kwargs) against the anchor's formula in float64."""
    anchor = anchor_module.LFQ(**{**kwargs, "force_quantization_f32": False})
    compare_steps(Flat(anchor, float64=True), Flat(ours), inputs, **forward_kwargs)


def width(quantizer):
    return quantizer.dim


def batches(shape, steps=3, scale=0.05):
    """Small values, so that p = softmax(200 x . c) spreads over several codes and the entropies are
    not all 0."""
    return [torch.randn(shape) * scale for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    anchor, ours = make_pair(**CONFIGS[config])
    shape = (BATCH, SEQ, width(ours))
    compare_training(CONFIGS[config], ours, batches(shape))
    compare_eval(anchor, ours, batches(shape, steps=1)[0])


@pytest.mark.parametrize("inv_temperature", [100.0, 7.3, 1.0])
def test_inv_temperature_matches_anchor(inv_temperature):
    kwargs = dict(codebook_size=32, num_codebooks=2, spherical=inv_temperature == 1.0)
    _, ours = make_pair(**kwargs)
    compare_training(kwargs, ours, batches((BATCH, SEQ, 10), scale=0.3), inv_temperature=inv_temperature)


LAYOUTS = {  # constructor arguments, input shape (channels at dim 1)
    "image": ({}, (BATCH, 0, 3, 5)),
    "video": ({}, (BATCH, 0, 2, 3, 2)),
    "channel-first-sequence": (dict(channel_first=True), (BATCH, 0, SEQ)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", [10, 7])
def test_layouts_match_anchor(layout, dim):
    extra, shape = LAYOUTS[layout]
    kwargs = dict(codebook_size=32, num_codebooks=2, dim=dim, **extra)
    anchor, ours = make_pair(**kwargs)
    shape = tuple(dim if s == 0 else s for s in shape)
    compare_training(kwargs, ours, batches(shape))
    compare_eval(anchor, ours, torch.randn(shape))
    indices = ours(torch.randn(shape)).indices
    assert torch.equal(ours.indices_to_codes(indices), anchor.indices_to_codes(indices))
    assert torch.equal(ours.indices_to_codes(indices, project_out=False), anchor.indices_to_codes(indices, False))


@pytest.mark.parametrize("frac", [1.0, 0.5])
@pytest.mark.parametrize("mask", [[True, False], [True, True], [False, True]])
def test_sample_masks_match_anchor(frac, mask):
    """A (B,) mask leaves whole samples out of the losses (1.32.0's test_masked_lfq), images included."""
    kwargs = dict(codebook_size=64, frac_per_sample_entropy=frac, commitment_loss_weight=0.5)
    _, ours = make_pair(**kwargs)
    compare_training(kwargs, ours, batches((BATCH, 6, 3, 4)), mask=torch.tensor(mask))


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_token_mask_counts_the_masked_tokens(num_codebooks):
    """A (B, N) token mask: the losses are those of the unmasked tokens alone, as the anchor computes
    them on those tokens without a mask. (1.32.0 given the mask takes the batch distribution over one
    token and codebook at a time, so its batch entropy equals the per-sample entropy: checked too.)"""
    anchor, ours = make_pair(codebook_size=16, num_codebooks=num_codebooks, commitment_loss_weight=0.3)
    x = torch.randn(BATCH, SEQ, ours.dim) * 0.05
    mask = torch.rand(BATCH, SEQ) > 0.4
    x_ours, x_anchor = x.clone().requires_grad_(), x[mask][None].clone().requires_grad_()
    (out, indices, loss), terms = ours(x_ours, mask=mask, return_loss_breakdown=True)
    (_, _, expected_loss), expected_terms = anchor(x_anchor, return_loss_breakdown=True)
    close(loss, expected_loss, "aux loss")
    for name, actual, expected in zip(terms._fields, terms, expected_terms):
        close(actual, expected, name)
    (grad,) = torch.autograd.grad(loss, x_ours)
    (expected_grad,) = torch.autograd.grad(expected_loss, x_anchor)
    assert grad[~mask].abs().max() == 0
    close(grad[mask], expected_grad[0], "input gradient of the aux loss")
    full = anchor(x, mask=mask)
    assert torch.equal(out, full.quantized) and torch.equal(indices, full.indices)
    _, wrong = anchor(x, mask=mask, return_loss_breakdown=True)
    assert torch.allclose(wrong.batch_entropy, wrong.per_sample_entropy)
    assert not torch.allclose(terms.batch_entropy, terms.per_sample_entropy)


def test_state_dict_has_the_anchors_keys_and_buffers():
    anchor, ours = make_pair(codebook_size=64, dim=9, orthogonal_rotation=True)
    assert list(ours.state_dict()) == list(anchor.state_dict())
    assert torch.equal(ours.mask, anchor.mask) and ours.mask.dtype == anchor.mask.dtype
    assert torch.equal(ours.codebook, anchor.codebook) and ours.dtype == anchor.dtype
    assert "codebook" not in dict(ours.named_buffers())  # computed when read, never stored


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_quantize_in_fp32_and_give_finite_losses(dtype):
    """1.32.0 crashes on 16-bit inputs with force_quantization_f32=False (its entropy multiplies them by
    its fp32 codebook); fastvq computes the entropies in fp32 either way and returns x's dtype."""
    x = torch.randn(BATCH, SEQ, 6) * 0.05
    for force in (True, False):
        quantizer = LFQ(codebook_size=64, force_quantization_f32=force)
        reference = LFQ(codebook_size=64, force_quantization_f32=force)(x.to(dtype).float())
        out, indices, loss = quantizer(x.to(dtype))
        assert out.dtype == dtype and torch.equal(indices, reference.indices) and loss.isfinite()
        torch.testing.assert_close(loss, reference.entropy_aux_loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        anchor_module.LFQ(codebook_size=64, force_quantization_f32=False)(x.to(dtype))


def test_exact_entropy_is_the_unclamped_formula_in_float64():
    """exact_entropy=True: -sum p log p for both terms (the per-token one from the per-bit binary
    entropies), against the dense float64 formula, value and input gradient; BSQ's codes included."""
    for spherical in (False, True):
        quantizer = LFQ(
            codebook_size=64, num_codebooks=2, spherical=spherical, exact_entropy=True, entropy_loss_weight=1
        )
        x = (torch.randn(BATCH, SEQ, 12) * 0.05).requires_grad_()
        _, terms = quantizer(x, inv_temperature=30.0, return_loss_breakdown=True)
        x64 = x.detach().double().requires_grad_()
        z = quantizer.maybe_l2norm(x64.reshape(-1, 2, 6))
        codes = quantizer.maybe_l2norm(quantizer.codebook.double())
        probs = (2 * 30.0 * z @ codes.T).softmax(-1)  # (N, c, K)
        per_sample = -torch.special.xlogy(probs, probs).sum(-1).mean()
        mean = probs.mean(0)
        batch = -torch.special.xlogy(mean, mean).sum(-1).mean()
        torch.testing.assert_close(terms.per_sample_entropy.double(), per_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms.batch_entropy.double(), batch, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(terms.per_sample_entropy - terms.batch_entropy, x)
        (expected,) = torch.autograd.grad(per_sample - batch, x64)
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


BAD = [
    (dict(), ValueError, "either dim or codebook_size"),
    (dict(codebook_size=48), ValueError, "codebook_size must be a power of 2 .* got 48 \\(suggested 64\\)"),
    (
        dict(codebook_size=16, frac_per_sample_entropy=0.0),
        ValueError,
        r"frac_per_sample_entropy must be a number in \(0, 1\]",
    ),
    (
        dict(codebook_size=16, soft_clamp_input_value=0.5),
        ValueError,
        "soft_clamp_input_value must be None or >= codebook_scale",
    ),
    (dict(codebook_size=16, num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
    (dict(codebook_size=16, dim=6, has_projections=False), ValueError, "has_projections=False needs dim"),
    (dict(codebook_size=16, codebook_scale=0), ValueError, "codebook_scale must be a number > 0"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=lambda v: None)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        LFQ(**kwargs)


def test_bad_forward_inputs_are_named():
    quantizer = LFQ(codebook_size=16)
    with pytest.raises(ValueError, match="x must have dim=4 channels"):
        quantizer(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        quantizer(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \(B,\) = \(2,\) or \(B, N\) = \(2, 3\)"):
        quantizer(torch.randn(2, 3, 4), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="inv_temperature must be a number > 0"):
        quantizer(torch.randn(2, 3, 4), inv_temperature=0.0)
    x = torch.randn(2, 3, 4)
    before = x.clone()
    quantizer(x, mask=torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(x, before)
