"""fastvq.ResidualLFQ / GroupedResidualLFQ against vector-quantize-pytorch 1.32.0 (the anchor), by the
protocol of scalar_checks: training steps (outputs, indices, every stage's aux loss, the input and
parameter gradients, the stage losses' own gradients included) within 1e-5, eval bit-identical,
state_dicts loading both ways, quantize dropout at fixed seeds, token and sample masks."""

import pytest
import torch
from scalar_checks import compare_eval, compare_steps
from test_layer_parity import close
from torch import nn
from torch.func import functional_call

from fastvq.nn import GroupedResidualLFQ, ResidualLFQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

BATCH, SEQ = 2, 13

CONFIGS = {  # constructor arguments
    "plain": dict(dim=5, codebook_size=32, num_quantizers=3),
    "projection": dict(dim=11, codebook_size=64, num_quantizers=3),
    "soft-clamp-commitment": dict(
        dim=7, codebook_size=32, num_quantizers=3, soft_clamp_input_value=1.5, commitment_loss_weight=0.25
    ),
    "spherical-weights": dict(dim=6, codebook_size=16, num_quantizers=2, spherical=True, diversity_gamma=2.5),
    "quantize-dropout": dict(dim=6, codebook_size=16, num_quantizers=4, quantize_dropout=True),
    "quantize-dropout-cutoff-multiple": dict(
        dim=4,
        codebook_size=16,
        num_quantizers=6,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=1,
        quantize_dropout_multiple_of=2,
    ),
}


class Summed(nn.Module):
    """The quantizer's outputs plus the sum of its stage losses as a 0-d output, so the shared step
    protocol backpropagates the losses too. float64: the anchor (built with force_quantization_f32=False)
    runs on float64 copies of its state and input, returning float32 (as test_lfq_parity: 1.32.0's
    own fp32 rounding of the entropy reaches 4e-5 of the largest input gradient)."""

    def __init__(self, quantizer, float64=False):
        super().__init__()
        self.quantizer, self.float64 = quantizer, float64

    def forward(self, x, **kwargs):
        if self.float64:
            named = [*self.quantizer.named_parameters(), *self.quantizer.named_buffers()]
            state = {name: t.double() if t.is_floating_point() else t for name, t in named}
            outputs = functional_call(self.quantizer, state, (x.double(),), kwargs)
            outputs = as_float32(outputs)
        else:
            outputs = self.quantizer(x, **kwargs)
        return (*outputs, outputs[2].sum())


def as_float32(value):
    """value (a tensor or nested tuple of tensors) with its float tensors cast to float32."""
    if isinstance(value, tuple):
        return tuple(as_float32(v) for v in value)
    return value.float() if value.is_floating_point() else value


def make_pair(cls="ResidualLFQ", **kwargs):
    anchor = getattr(anchor_module, cls)(**kwargs)
    torch.manual_seed(1234)  # fastvq built from another RNG state: its state must come from the anchor
    ours = {"ResidualLFQ": ResidualLFQ, "GroupedResidualLFQ": GroupedResidualLFQ}[cls](**kwargs)
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    ours.load_state_dict(anchor.state_dict())
    anchor.load_state_dict(ours.state_dict())
    return anchor, ours


def compare_training(cls, kwargs, ours, inputs, **forward_kwargs):
    """compare_steps of ours against the anchor's formula in float64."""
    anchor = getattr(anchor_module, cls)(**{**kwargs, "force_quantization_f32": False})
    compare_steps(Summed(anchor, float64=True), Summed(ours), inputs, **forward_kwargs)


def batches(shape, steps=3, scale=0.05):
    """Small values, so that the entropies are not all 0."""
    return [torch.randn(shape) * scale for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    kwargs = CONFIGS[config]
    anchor, ours = make_pair(**kwargs)
    shape = (BATCH, SEQ, kwargs["dim"])
    compare_training("ResidualLFQ", kwargs, ours, batches(shape), return_all_codes=True)
    compare_eval(anchor, ours, batches(shape, steps=1)[0], return_all_codes=True)
    ours.eval()
    _, indices, _ = ours(batches(shape, steps=1)[0])
    assert torch.equal(ours.get_output_from_indices(indices), anchor.get_output_from_indices(indices))
    assert torch.equal(ours.codebooks, anchor.codebooks)


def test_quantize_dropout_leaves_out_stages_with_index_minus_one_as_anchor():
    kwargs = CONFIGS["quantize-dropout"]
    _, ours = make_pair(**kwargs)
    x = torch.randn(BATCH, SEQ, 6) * 0.05
    compare_training("ResidualLFQ", kwargs, ours, [x, x], rand_quantize_dropout_fixed_seed=5)
    ours.train()
    seen = set()
    for seed in range(12):
        _, indices, losses, codes = ours(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=seed)
        kept = int((indices[0, 0] >= 0).sum())
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
        assert (losses[kept:] == 0).all() and (losses[:kept] != 0).all()
        assert (codes[kept:] == 0).all() and torch.equal(ours.get_codes_from_indices(indices[..., :kept]), codes)
        seen.add(kept)
    assert seen == {1, 2, 3, 4}


@pytest.mark.parametrize("mask", [[True, False], [False, True]])
def test_sample_masks_match_anchor(mask):
    kwargs = dict(dim=6, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.5)
    _, ours = make_pair(**kwargs)
    compare_training("ResidualLFQ", kwargs, ours, batches((BATCH, SEQ, 6)), mask=torch.tensor(mask))


def test_token_mask_losses_are_the_anchors_on_the_unmasked_tokens():
    """A (B, N) token mask: each stage's loss is the anchor's on the unmasked tokens alone (fastvq.LFQ
    counts a token mask right where 1.32.0's batch entropy does not; see test_lfq_parity)."""
    kwargs = dict(dim=6, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.5)
    anchor, ours = make_pair(**kwargs)
    x = torch.randn(BATCH, SEQ, 6) * 0.05
    mask = torch.rand(BATCH, SEQ) > 0.4
    ours.train(), anchor.train()
    out, indices, losses = ours(x, mask=mask)
    expected_out, expected_indices, expected_losses = Summed(anchor, float64=True)(x[mask][None])[:3]
    close(losses, expected_losses, "stage losses")
    close(out[mask], expected_out[0], "quantized")
    assert torch.equal(indices[mask], expected_indices[0])


def test_image_feature_maps_without_projection_match_anchor():
    """With dim = log2(codebook_size) 1.32.0 passes (B, dim, H, W) to its stages, which take it channel-first."""
    kwargs = dict(dim=4, codebook_size=16, num_quantizers=3)
    anchor, ours = make_pair(**kwargs)
    shape = (BATCH, 4, 3, 5)
    compare_training("ResidualLFQ", kwargs, ours, batches(shape))
    compare_eval(anchor, ours, batches(shape, steps=1)[0], return_all_codes=True)


def test_quantize_dropout_on_feature_maps_marks_the_dropped_stages():
    """1.32.0 fails here (its -1 indices are (B, dim)); fastvq's take the stages' index shape."""
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, quantize_dropout=True).train()
    x = torch.randn(BATCH, 4, 3, 5)
    out, indices, losses = rlfq(x, rand_quantize_dropout_fixed_seed=1)  # random.Random(1) stops at stage 0
    assert out.shape == x.shape and indices.shape == (BATCH, 3, 5, 3) and losses.shape == (3,)
    assert (indices[..., 0] >= 0).all() and (indices[..., 1:] == -1).all() and (losses[1:] == 0).all()
    assert torch.equal(rlfq.get_output_from_indices(indices), rlfq.layers[0](x)[0].movedim(1, -1))


GROUPED = {
    "groups": dict(dim=8, groups=2, codebook_size=16, num_quantizers=3),
    "groups-projection-dropout": dict(dim=12, groups=3, codebook_size=8, num_quantizers=4, quantize_dropout=True),
    "image-fmap": dict(dim=8, groups=2, codebook_size=16, num_quantizers=2, accept_image_fmap=True),
}


@pytest.mark.parametrize("config", GROUPED)
def test_grouped_matches_anchor(config):
    kwargs = GROUPED[config]
    anchor, ours = make_pair("GroupedResidualLFQ", **kwargs)
    shape = (BATCH, 8, 3, 5) if kwargs.get("accept_image_fmap") else (BATCH, SEQ, kwargs["dim"])
    compare_training("GroupedResidualLFQ", kwargs, ours, batches(shape), return_all_codes=True)
    compare_eval(anchor, ours, batches(shape, steps=1)[0], return_all_codes=True)
    indices = ours(batches(shape, steps=1)[0])[1]
    assert torch.equal(ours.get_codes_from_indices(indices), anchor.get_codes_from_indices(indices))
    assert torch.equal(ours.get_output_from_indices(indices), anchor.get_output_from_indices(indices))
    assert torch.equal(ours.codebooks, anchor.codebooks)


def test_grouped_sample_mask_reaches_every_group_as_in_the_anchor():
    kwargs = dict(GROUPED["groups"], commitment_loss_weight=0.5)
    _, ours = make_pair("GroupedResidualLFQ", **kwargs)
    compare_training("GroupedResidualLFQ", kwargs, ours, batches((BATCH, SEQ, 8)), mask=torch.tensor([True, False]))


def test_inputs_are_not_modified_and_bad_arguments_are_named():
    rlfq = ResidualLFQ(dim=6, codebook_size=16, num_quantizers=2).train()
    x = torch.randn(2, 7, 6)
    before = x.clone()
    out, _, losses = rlfq(x)
    (out.sum() + losses.sum()).backward()
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="num_quantizers must be"):
        ResidualLFQ(dim=4, codebook_size=16, num_quantizers=0)
    with pytest.raises(ValueError, match="codebook_size must be a power of 2"):
        ResidualLFQ(dim=4, codebook_size=20, num_quantizers=2)
    with pytest.raises(ValueError, match="must not project"):
        ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2, num_codebooks=2)
    with pytest.raises(ValueError, match="dim=6 channels"):
        rlfq(torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="multiple of groups=3"):
        GroupedResidualLFQ(dim=8, groups=3, codebook_size=16, num_quantizers=2)
    with pytest.raises(ValueError, match="num_quantizers=2 stages"):
        rlfq.get_output_from_indices(torch.zeros(2, 7, 1, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_match_anchor_in_eval(dtype):
    """Without projections the stages take the 16-bit residuals, quantize in fp32 and return x's dtype."""
    anchor, ours = make_pair(dim=4, codebook_size=16, num_quantizers=3)
    x = torch.randn(BATCH, SEQ, 4).to(dtype)
    compare_eval(anchor, ours, x, return_all_codes=True)
    assert ours.eval()(x)[0].dtype == dtype
