"""fastvq.FSQ against vector-quantize-pytorch 1.32.0 (the anchor) and against its own definition:
exact indices for 16-bit inputs, an implicit codebook that is never built unless read."""

import math

import pytest
import torch
from scalar_checks import batches, compare_eval, compare_steps
from vq_checks import LargestTensor

from fastvq.nn import FSQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

BATCH, SEQ = 2, 13

CONFIGS = {  # constructor arguments (dim defaults to the codebook dims)
    "8555": dict(levels=[8, 5, 5, 5]),
    "symmetric": dict(levels=[8, 5, 5, 5], preserve_symmetry=True),
    "hard-clamp": dict(levels=[7, 5, 5, 6], bound_hard_clamp=True),
    "symmetric-hard-clamp-level-2": dict(levels=[2, 3, 4, 5], preserve_symmetry=True, bound_hard_clamp=True),
    "projection": dict(levels=[8, 6, 5], dim=11),
    "projection-without-bias": dict(levels=[8, 6, 5], dim=11, projection_has_bias=False),
    "codebooks-projection": dict(levels=[8, 6, 5], dim=10, num_codebooks=3),
    "codebooks": dict(levels=[8, 6, 5], num_codebooks=2),
    "keep-codebooks-dim": dict(levels=[8, 6, 5], keep_num_codebooks_dim=True),
    "orthogonal-rotation": dict(levels=[5, 5, 5, 5], orthogonal_rotation=True),
    "noise-dropout": dict(levels=[8, 5, 5, 5], preserve_symmetry=True, noise_dropout=0.3),
    "without-indices": dict(levels=[8, 5, 5, 5], return_indices=False),
    "not-forced-f32": dict(levels=[8, 5, 5, 5], force_quantization_f32=False),
}


def make_pair(**kwargs):
    anchor = anchor_module.FSQ(**kwargs)
    torch.manual_seed(1234)  # fastvq built from another RNG state: its state must come from the anchor
    ours = FSQ(**kwargs)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


def width(kwargs):
    return kwargs.get("dim") or len(kwargs["levels"]) * kwargs.get("num_codebooks", 1)


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    kwargs = CONFIGS[config]
    anchor, ours = make_pair(**kwargs)
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    assert ours.codebook_size == math.prod(kwargs["levels"])
    compare_steps(anchor, ours, batches((BATCH, SEQ, width(kwargs))))
    compare_eval(anchor, ours, batches((BATCH, SEQ, width(kwargs)), steps=1)[0])


LAYOUTS = {  # constructor arguments, input shape (dim 8 = 2 codebooks of 4 levels)
    "channel-first": (dict(channel_first=True), (BATCH, 8, SEQ)),
    "image": ({}, (BATCH, 8, 3, 5)),
    "video": ({}, (BATCH, 8, 2, 3, 2)),
    "one-token-channel-first": (dict(channel_first=True), (BATCH, 8)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", [8, 12])
def test_layouts_match_anchor(layout, dim):
    extra, shape = LAYOUTS[layout]
    kwargs = dict(levels=[8, 5, 5, 5], num_codebooks=2, dim=dim, **extra)
    shape = (shape[0], dim, *shape[2:])
    anchor, ours = make_pair(**kwargs)
    compare_steps(anchor, ours, batches(shape))
    compare_eval(anchor, ours, torch.randn(shape))
    indices = ours(torch.randn(shape))[1]
    assert torch.equal(ours.indices_to_codes(indices), anchor.indices_to_codes(indices))


def test_float64_inputs_stay_float64_and_match_anchor():
    anchor, ours = make_pair(levels=[8, 5, 5, 5])
    x = torch.randn(BATCH, SEQ, 4, dtype=torch.float64)
    compare_steps(anchor, ours, [x, 2 * x])
    compare_eval(anchor, ours, x)
    assert ours(x)[0].dtype == torch.float64


def test_one_token_per_sample_is_a_sequence_of_one():
    """(B, dim) channel-last (1.32.0 fails on it) quantizes like (B, 1, dim)."""
    fsq = FSQ([8, 5, 5, 5], dim=6, num_codebooks=2)
    x = torch.randn(5, 6)
    out, indices = fsq(x)
    expected_out, expected_indices = fsq(x[:, None])
    assert torch.equal(out, expected_out[:, 0]) and torch.equal(indices, expected_indices[:, 0])


# ---------------------------------------------------------------------------------------------
# 16-bit inputs: the indices of a bf16/fp16 input are those of its fp32 values, for every code
# ---------------------------------------------------------------------------------------------


def code_centres(fsq: FSQ, eps: float = 1e-3) -> torch.Tensor:
    """(codebook_size, d) fp32 inputs, one inside each code's cell, as far from its edges as the
    bound allows (the cell of an extreme level of the symmetric bound reaches to infinity)."""
    levels = torch.tensor(fsq.indices_to_level_indices(torch.arange(fsq.codebook_size)).tolist(), dtype=torch.float64)
    sizes = torch.tensor(fsq.indices_to_level_indices(torch.tensor(fsq.codebook_size - 1)).tolist()) + 1.0
    if fsq.preserve_symmetry:  # floor((L - 1) (tanh z + 1) / 2 + 0.5) = l
        bracket = torch.where(levels == 0, 0.75, torch.where(levels == sizes - 1, sizes - 0.75, levels + 0.5))
        return torch.atanh(2 * (bracket - 0.5) / (sizes - 1) - 1).float()
    half_l, offset = (sizes - 1) * (1 + eps) / 2, torch.where(sizes % 2 == 0, 0.5, 0.0)
    rounded = levels - sizes // 2  # round(tanh(z + shift) half_l - offset) = rounded
    return (torch.atanh((rounded + offset) / half_l) - torch.atanh(offset / half_l)).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preserve_symmetry", [False, True])
@pytest.mark.parametrize("force_f32", [True, False])
def test_16_bit_inputs_give_the_indices_of_their_fp32_values_for_every_code(dtype, preserve_symmetry, force_f32):
    """Every code of [8, 5, 5, 5], hit by an input at its centre, and by each of those inputs moved
    towards the cells' edges: the 16-bit input's index is its fp32 value's, from forward and from
    codes_to_indices of the 16-bit codes. 1.32.0 sums the levels in bf16 there (issue #114: codes
    merge): its codes_to_indices of the same bf16 codes loses codes (run below: this test fails on
    1.32.0's arithmetic)."""
    kwargs = dict(levels=[8, 5, 5, 5], preserve_symmetry=preserve_symmetry, force_quantization_f32=force_f32)
    fsq = FSQ(**kwargs)
    centres = code_centres(fsq)
    assert torch.equal(fsq(centres[None])[1][0], torch.arange(fsq.codebook_size, dtype=torch.int32))
    inputs = torch.cat([centres, centres * 1.1, centres * 0.9, centres + 0.05 * torch.randn_like(centres)])[None]
    low = inputs.to(dtype)
    out, indices = fsq(low)
    expected = fsq(low.float())[1]
    assert out.dtype == dtype and indices.dtype == torch.int32
    assert torch.equal(indices, expected)
    assert indices[0, : fsq.codebook_size].unique().numel() == fsq.codebook_size
    assert torch.equal(fsq.codes_to_indices(fsq.quantize(low.float()).to(dtype)), expected)
    if dtype == torch.bfloat16 and not preserve_symmetry:
        anchor = anchor_module.FSQ(**kwargs)
        anchor_indices = anchor.codes_to_indices(anchor.quantize(low.float()).to(dtype))
        wrong = (anchor_indices != expected).float().mean().item()
        assert wrong > 0.2, f"1.32.0's bf16 indices were expected to merge codes (wrong: {wrong:.3f})"


# ---------------------------------------------------------------------------------------------
# the implicit codebook
# ---------------------------------------------------------------------------------------------


def test_a_four_billion_code_grid_constructs_and_runs_without_building_its_codebook():
    """levels [4] * 16: 2^32 codes (1.32.0 allocates arange(2^32) int64, 34 GB, in its constructor,
    then a (2^32, 16) float codebook). No tensor here exceeds a few times the input."""
    x = torch.randn(2, 64, 16)
    with LargestTensor() as probe:
        fsq = FSQ([4] * 16)
        out, indices = fsq(x)
        codes = fsq.indices_to_codes(indices)
        again = fsq.codes_to_indices(fsq.quantize(x))
    assert probe.largest <= 4 * x.numel()
    assert fsq.codebook_size == 2**32 and indices.dtype == torch.int64
    assert torch.equal(codes, out) and torch.equal(again, indices)
    assert int(fsq(torch.full((1, 1, 16), 9.0))[1]) == 2**32 - 1  # every level at its top: exact in int64
    assert int(fsq(torch.full((1, 1, 16), -9.0))[1]) == 0
    assert "implicit_codebook" not in dict(fsq.named_buffers())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(levels=[8, 5, 5, 5]),
        dict(levels=[4, 5, 3], preserve_symmetry=True),
        dict(levels=[5, 5, 5], orthogonal_rotation=True),
    ],
)
def test_implicit_codebook_is_the_anchors_buffer_and_decodes_every_index(kwargs):
    anchor, ours = make_pair(**kwargs)
    close_codebook = ours.implicit_codebook
    assert torch.equal(close_codebook, anchor.implicit_codebook)
    every = torch.arange(ours.codebook_size)
    assert torch.equal(ours.codes_to_indices(close_codebook), every.int())
    assert torch.equal(ours.indices_to_codes(every), anchor.indices_to_codes(every))


def test_levels_beyond_2_to_the_24_codes_keep_exact_indices():
    """8^9 = 2^27 codes: fp32 sums (1.32.0's codes_to_indices) cannot hold every index; int64 can."""
    fsq = FSQ([8] * 9)
    codes = fsq.indices_to_codes(torch.tensor([2**27 - 1, 2**27 - 3, 2**24 + 1, 12345677]))
    assert fsq.codes_to_indices(codes).tolist() == [2**27 - 1, 2**27 - 3, 2**24 + 1, 12345677]


# ---------------------------------------------------------------------------------------------
# bad values and bad arguments
# ---------------------------------------------------------------------------------------------


def test_a_nan_value_gives_index_minus_one_for_its_codebook_only():
    fsq = FSQ([8, 5, 5, 5], num_codebooks=2)
    x = torch.randn(1, 3, 8)
    x[0, 1, 5] = float("nan")
    indices = fsq(x)[1]
    assert indices[0, 1].tolist()[1] == -1 and indices[0, 1, 0] >= 0 and (indices[0, [0, 2]] >= 0).all()
    decoded = fsq.indices_to_codes(indices)
    assert torch.equal(decoded[0, 1, 4:], torch.zeros(4))  # -1 decodes to a zero code


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="levels must be a non-empty list of ints >= 2"):
        FSQ([8, 1, 5])
    with pytest.raises(ValueError, match="levels must be"):
        FSQ([])
    with pytest.raises(ValueError, match="needs preserve_symmetry=True"):
        FSQ([2, 5])
    with pytest.raises(ValueError, match="noise_dropout > 0 needs preserve_symmetry"):
        FSQ([8, 5], noise_dropout=0.1)
    with pytest.raises(ValueError, match="noise_dropout must be a number in"):
        FSQ([8, 5], noise_dropout=1.5, preserve_symmetry=True)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim must be True"):
        FSQ([8, 5], num_codebooks=2, keep_num_codebooks_dim=False)
    fsq = FSQ([8, 5, 5, 5], dim=6)
    with pytest.raises(ValueError, match="dim=6 channels"):
        fsq(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        fsq(torch.zeros(2, 3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must be in \[-1, codebook_size=1000\)"):
        fsq.indices_to_codes(torch.tensor([[1000]]))
    with pytest.raises(ValueError, match="codebook_dim=4"):
        fsq.codes_to_indices(torch.zeros(3, 6))


def test_inputs_are_not_modified():
    fsq = FSQ([8, 5, 5, 5], dim=6, channel_first=True).train()
    x = torch.randn(2, 6, 7)
    before = x.clone()
    fsq(x)[0].sum().backward()
    assert torch.equal(x, before)
