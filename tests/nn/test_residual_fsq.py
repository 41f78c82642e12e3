"""fastvq.ResidualFSQ / GroupedResidualFSQ against vector-quantize-pytorch 1.32.0 (the anchor), by the
protocol of scalar_checks (training steps within 1e-5, eval bit-identical), with the stages fused
(the default) and run one by one (noise dropout, orthogonal rotation); then what 1.32.0 gets wrong:
16-bit inputs and a codebook built for every call."""

import pytest
import torch
from scalar_checks import batches, compare_eval, compare_steps
from vq_checks import LargestTensor

from fastvq.nn import GroupedResidualFSQ, ResidualFSQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

BATCH, SEQ = 2, 13

CONFIGS = {  # constructor arguments; dim defaults to len(levels)
    "8555": dict(levels=[8, 5, 5, 5], num_quantizers=3),
    "projection": dict(levels=[8, 5, 5, 5], num_quantizers=3, dim=11),
    "soft-clamp": dict(levels=[7, 5, 4], num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=1.5),
    "soft-clamp-per-dim": dict(
        levels=[7, 5, 4], num_quantizers=2, bound_hard_clamp=False, soft_clamp_input_value=[1.5, 2.0, 1.2]
    ),
    "no-clamp": dict(levels=[7, 5, 4], num_quantizers=2, bound_hard_clamp=False),
    "quantize-dropout": dict(levels=[8, 5, 5, 5], num_quantizers=4, quantize_dropout=True),
    "quantize-dropout-cutoff-multiple": dict(
        levels=[8, 5, 5, 5],
        num_quantizers=6,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=1,
        quantize_dropout_multiple_of=2,
    ),
    "noise-dropout": dict(levels=[8, 5, 5, 5], num_quantizers=3, noise_dropout=0.3),
    "orthogonal-rotation": dict(levels=[5, 5, 5], num_quantizers=2, orthogonal_rotation=True),
}


def width(kwargs):
    return kwargs.get("dim") or len(kwargs["levels"])


def make_pair(cls="ResidualFSQ", **kwargs):
    anchor = getattr(anchor_module, cls)(**kwargs)
    torch.manual_seed(1234)
    ours = {"ResidualFSQ": ResidualFSQ, "GroupedResidualFSQ": GroupedResidualFSQ}[cls](**kwargs)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    """Quantize dropout draws its last stage from torch's RNG in both (seeded per step). With
    orthogonal rotation 1.32.0's all_codes and get_output_from_indices leave the codes rotated (their
    sum is not its output); fastvq's are rotated back, checked against its own forward instead."""
    kwargs = CONFIGS[config]
    anchor, ours = make_pair(**kwargs)
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    shape = (BATCH, SEQ, width(kwargs))
    rotated = kwargs.get("orthogonal_rotation", False)
    compare_steps(anchor, ours, batches(shape, steps=4), return_all_codes=not rotated)
    compare_eval(anchor, ours, batches(shape, steps=1)[0], return_all_codes=not rotated)
    ours.eval()
    out, indices, codes = ours(batches(shape, steps=1)[0], return_all_codes=True)
    decoded = ours.get_output_from_indices(indices)
    if rotated:
        assert torch.allclose(codes.sum(0), out, atol=1e-6) and torch.allclose(decoded, out, atol=1e-6)
    else:
        assert torch.equal(decoded, anchor.get_output_from_indices(indices))


def test_quantize_dropout_leaves_out_stages_with_index_minus_one_as_anchor():
    anchor, ours = make_pair(**CONFIGS["quantize-dropout"])
    x = torch.randn(BATCH, SEQ, 4)
    compare_steps(anchor, ours, [x, x], rand_quantize_dropout_fixed_seed=5)
    ours.train()
    seen = set()
    for seed in range(12):
        _, indices, codes = ours(x, return_all_codes=True, rand_quantize_dropout_fixed_seed=seed)
        kept = int((indices[0, 0] >= 0).sum())
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
        assert (codes[kept:] == 0).all() and torch.equal(ours.get_codes_from_indices(indices[..., :kept]), codes)
        seen.add(kept)
    assert seen == {1, 2, 3, 4}


@pytest.mark.parametrize("shape", [(BATCH, 4, SEQ), (BATCH, 4, 3, 5)], ids=["sequence", "image"])
def test_channel_first_matches_anchor(shape):
    anchor, ours = make_pair(levels=[8, 5, 5, 5], num_quantizers=3, is_channel_first=True)
    compare_steps(anchor, ours, batches(shape))
    compare_eval(anchor, ours, batches(shape, steps=1)[0])


GROUPED = {
    "groups": dict(dim=8, groups=2, levels=[8, 5, 5, 5], num_quantizers=3),
    "groups-projection-dropout": dict(dim=12, groups=3, levels=[8, 5, 5], num_quantizers=4, quantize_dropout=True),
}


@pytest.mark.parametrize("config", GROUPED)
def test_grouped_matches_anchor(config):
    kwargs = GROUPED[config]
    anchor, ours = make_pair("GroupedResidualFSQ", **kwargs)
    shape = (BATCH, SEQ, kwargs["dim"])
    compare_steps(anchor, ours, batches(shape), return_all_codes=True)
    compare_eval(anchor, ours, batches(shape, steps=1)[0], return_all_codes=True)
    indices = ours(batches(shape, steps=1)[0])[1]
    assert torch.equal(ours.get_output_from_indices(indices), anchor.get_output_from_indices(indices))
    assert torch.equal(ours.codebooks, anchor.codebooks)


def test_grouped_image_feature_maps_match_anchor_given_is_channel_first():
    """1.32.0 needs is_channel_first as well as accept_image_fmap; fastvq sets it from accept_image_fmap."""
    kwargs = dict(dim=8, groups=2, levels=[8, 5, 5, 5], num_quantizers=2, accept_image_fmap=True)
    anchor = anchor_module.GroupedResidualFSQ(is_channel_first=True, **kwargs)
    ours = GroupedResidualFSQ(**kwargs)
    shape = (BATCH, 8, 3, 5)
    compare_steps(anchor, ours, batches(shape))
    compare_eval(anchor, ours, batches(shape, steps=1)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_give_the_indices_of_their_fp32_values(dtype):
    """Every stage's indices from a 16-bit input are its fp32 values' (the stages run in fp32)."""
    rfsq = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4)
    x = (torch.randn(2, 500, 4) * 1.5).to(dtype)
    out, indices = rfsq(x)
    assert out.dtype == dtype and torch.equal(indices, rfsq(x.float())[1])


def test_many_codes_run_without_building_a_codebook():
    """levels [4] * 16 per stage (2^32 codes): 1.32.0 builds arange(2^32) per stage in its constructor."""
    x = torch.randn(2, 32, 16)
    with LargestTensor() as probe:
        rfsq = ResidualFSQ(levels=[4] * 16, num_quantizers=2)
        out, indices = rfsq(x)
        decoded = rfsq.get_output_from_indices(indices)
    assert probe.largest <= 4 * x.numel()
    assert indices.dtype == torch.int64 and indices.shape == (2, 32, 2)
    assert torch.allclose(decoded, out, atol=1e-6)


def test_inputs_are_not_modified_and_bad_arguments_are_named():
    rfsq = ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2, dim=6).train()
    x = torch.randn(2, 7, 6)
    before = x.clone()
    rfsq(x)[0].sum().backward()
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="num_quantizers must be"):
        ResidualFSQ(levels=[8, 5], num_quantizers=0)
    with pytest.raises(ValueError, match="soft_clamp_input_value needs bound_hard_clamp=False"):
        ResidualFSQ(levels=[8, 5], num_quantizers=2, soft_clamp_input_value=1.5)
    with pytest.raises(ValueError, match="num_codebooks=1"):
        ResidualFSQ(levels=[8, 5], num_quantizers=2, num_codebooks=2)
    with pytest.raises(ValueError, match="dim=6 channels"):
        rfsq(torch.randn(2, 7, 4))
    with pytest.raises(ValueError, match="multiple of groups=3"):
        GroupedResidualFSQ(dim=8, groups=3, levels=[8, 5], num_quantizers=2)
    with pytest.raises(ValueError, match="num_quantizers=2 stages"):
        rfsq.get_output_from_indices(torch.zeros(2, 7, 1, dtype=torch.long))
