"""ResidualVQ(implicit_neural_codebook=True) (QINCo) against vector-quantize-pytorch 1.32.0, and
the blocked search over conditioned codes against a dense float64 oracle.

Parity protocol as test_residual_vq: SGD steps on both from the same state, comparing quantized,
indices, losses, input and parameter gradients (MLPs and codebooks) and the state within 1e-5,
then eval. Eval is bit-identical where dim is a multiple of 8; for other sizes the CPU's GEMM rounds
a row of 1.32.0's (B, N, K, D) product differently from the same row of fastvq's (N, D) one, so
eval there is within 1e-6 with identical indices.
"""

import pytest
import torch
from test_layer_parity import close, compare_eval, compare_state, compare_steps
from test_residual_vq import BATCH, CODES, DIM, SEQ, batches, make_pair
from vq_checks import LargestTensor

from fastvq.nn import implicit_codebook
from fastvq.nn.implicit_codebook import ImplicitCodebookMLP, search_conditioned_codes
from fastvq.nn.residual_vq import GroupedResidualVQ, ResidualVQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

CONFIGS = {
    "plain": dict(num_quantizers=3),
    "shared-codebook": dict(num_quantizers=3, shared_codebook=True),
    "quantize-dropout": dict(num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1),
    "quant-grad-frac": dict(num_quantizers=3, quant_grad_frac=0.3),
    "sizes-per-stage": dict(codebook_size=(24, 13, 7)),
    "straight-through-weighted": dict(num_quantizers=3, rotation_trick=False, commitment_weight=0.25),
    "orthogonal-reg": dict(
        num_quantizers=3, orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=5
    ),
    "mlp-kwargs": dict(num_quantizers=3, mlp_kwargs=dict(dim_hidden=12, depth=2)),
}


def implicit_pair(**kwargs):
    torch.manual_seed(0)
    return make_pair(implicit_neural_codebook=True, **kwargs)


def compare_eval_close(anchor, ours, x, **forward_kwargs):
    """Eval on identical state: indices identical, quantized and losses within 1e-5."""
    ours.load_state_dict(anchor.state_dict())
    anchor.eval(), ours.eval()
    with torch.no_grad():
        expected, actual = anchor(x, **forward_kwargs), ours(x, **forward_kwargs)
    for what, e, a in zip(("quantized", "indices", "losses"), expected, actual):
        close(a, e, f"eval {what}")


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    """Quantize dropout draws its stage from the global RNG in both (seeded per step); the
    orthogonal loss's sample of codes too."""
    anchor, ours = implicit_pair(**CONFIGS[config])
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    compare_steps(anchor, ours, batches())
    compare_eval(anchor, ours, batches(steps=1)[0])


@pytest.mark.parametrize("return_zeros", [True, False])
def test_mask_and_fixed_dropout_seed_match_anchor(return_zeros):
    anchor, ours = implicit_pair(num_quantizers=4, quantize_dropout=True, return_zeros_for_masked_padding=return_zeros)
    mask = torch.rand(BATCH, SEQ) > 0.3
    mask[0, 0] = False
    compare_steps(anchor, ours, batches(), mask=mask, rand_quantize_dropout_fixed_seed=3)
    compare_eval(anchor, ours, batches(steps=1)[0], mask=mask)
    indices = ours.train()(batches(steps=1)[0], mask=mask, rand_quantize_dropout_fixed_seed=3)[1]
    assert (indices[~mask] == -1).all() and (indices[mask][:, :2] >= 0).all()


def test_frozen_codebook_matches_anchor():
    anchor, ours = implicit_pair(num_quantizers=3)
    compare_steps(anchor, ours, batches(steps=2), freeze_codebook=True)


def test_projection_and_odd_code_size_match_anchor():
    """codebook_dim=5: training within 1e-5, eval indices identical and values within 1e-5."""
    anchor, ours = implicit_pair(num_quantizers=3, codebook_dim=5)
    compare_steps(anchor, ours, batches())
    compare_eval_close(anchor, ours, batches(steps=1)[0])


def test_grouped_matches_anchor():
    torch.manual_seed(0)
    kwargs = dict(groups=2, num_quantizers=3, codebook_size=CODES, implicit_neural_codebook=True)
    anchor = anchor_module.GroupedResidualVQ(dim=DIM, **kwargs)
    ours = GroupedResidualVQ(dim=DIM, backend="torch", **kwargs)
    ours.load_state_dict(anchor.state_dict())
    compare_steps(anchor, ours, batches())
    compare_eval_close(anchor, ours, batches(steps=1)[0])
    x = batches(steps=1)[0]
    with torch.no_grad():
        expected, actual = anchor(x, return_all_codes=True), ours(x, return_all_codes=True)
    for group, (a, e) in enumerate(zip(actual[3], expected[3])):
        close(a, e, f"all codes of group {group}")
    close(ours.get_output_from_indices(actual[1]), anchor.get_output_from_indices(expected[1]), "output")


def test_codes_from_indices_match_anchor():
    """Decoding conditions each stage on the codes of the stages before it, as the forward did;
    indices of dropped stages (-1, trailing) give zeros."""
    anchor, ours = implicit_pair(num_quantizers=4, quantize_dropout=True)
    x = batches(steps=1)[0]
    with torch.no_grad():
        expected, actual = anchor.eval()(x, return_all_codes=True), ours.eval()(x, return_all_codes=True)
    close(actual[3], expected[3], "all codes")
    close(ours.get_output_from_indices(actual[1]), actual[0], "output of the returned indices")
    indices = torch.randint(0, CODES, (BATCH, SEQ, 4))
    indices[0, :3, 2:] = -1
    for given in (indices, indices[..., :2]):
        close(ours.get_codes_from_indices(given), anchor.get_codes_from_indices(given), "codes")
        close(ours.get_output_from_indices(given), anchor.get_output_from_indices(given), "output")
    with pytest.raises(ValueError, match="indices must be in"):
        ours.get_codes_from_indices(torch.full((1, 2, 4), CODES))


def test_state_dicts_load_both_ways():
    anchor, ours = implicit_pair(num_quantizers=3, mlp_kwargs=dict(dim_hidden=16))
    ours.train()(torch.randn(BATCH, SEQ, DIM))
    assert anchor.load_state_dict(ours.state_dict()) is not None
    compare_state(ours, anchor, "after loading fastvq's state into the anchor")
    compare_eval(anchor, ours, torch.randn(BATCH, SEQ, DIM))
    assert "mlps.1.layers.0.2.weight" in ours.state_dict()


def test_bfloat16_input_matches_anchor_in_eval():
    """bf16 tokens: eval identical to 1.32.0 (math in fp32, output cast back). In training 1.32.0
    runs the rotation trick and the residuals in bf16 where fastvq keeps fp32 (as for every
    ResidualVQ), so there the outputs are bf16 with finite gradients, not compared."""
    anchor, ours = implicit_pair(num_quantizers=3)
    x = batches(steps=1)[0].bfloat16()
    compare_eval(anchor, ours, x)
    x.requires_grad_()
    quantized, _, losses = ours.train()(x)
    (quantized.float().square().sum() + losses.sum()).backward()
    assert quantized.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_stages_run_in_fp32_under_autocast():
    _, ours = implicit_pair(num_quantizers=3)
    x = torch.randn(BATCH, SEQ, DIM)
    with torch.no_grad():
        expected = ours.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = ours(x)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_nonfinite_tokens_get_no_code_and_leave_the_others_alone():
    _, ours = implicit_pair(num_quantizers=3)
    ours.eval()
    x = torch.randn(BATCH, SEQ, DIM)
    with torch.no_grad():
        clean = ours(x)
        x[1, 4, 2] = float("nan")
        dirty = ours(x)
    assert (dirty[1][1, 4] == -1).all()
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[1, 4] = False
    assert torch.equal(dirty[1][keep], clean[1][keep]) and torch.equal(dirty[0][keep], clean[0][keep])


def test_bad_arguments_raise_clear_errors():
    kwargs = dict(dim=DIM, num_quantizers=3, codebook_size=CODES, implicit_neural_codebook=True)
    with pytest.raises(ValueError, match="beam_size needs implicit_neural_codebook=False"):
        ResidualVQ(beam_size=2, **kwargs)
    with pytest.raises(ValueError, match="use_cosine_sim and learnable_codebook"):
        ResidualVQ(use_cosine_sim=True, **kwargs)
    with pytest.raises(ValueError, match="straight_through and"):
        ResidualVQ(straight_through=True, rotation_trick=False, **kwargs)
    rvq = ResidualVQ(**kwargs)
    x = torch.randn(BATCH, SEQ, DIM)
    with pytest.raises(ValueError, match="beam search needs implicit_neural_codebook=False"):
        rvq(x, beam_size=2)
    with pytest.raises(ValueError, match="indices"):
        rvq(x, indices=torch.zeros(BATCH, SEQ, 3, dtype=torch.long))


def test_inputs_are_not_modified():
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, implicit_neural_codebook=True).train()
    x, mask = torch.randn(BATCH, SEQ, DIM), torch.rand(BATCH, SEQ) > 0.5
    before = x.clone(), mask.clone()
    rvq(x, mask=mask)
    assert torch.equal(x, before[0]) and torch.equal(mask, before[1])


@pytest.mark.parametrize(
    "num_tokens,num_codes,dim,block_elements", [(37, 29, 5, 300), (16, 64, 8, 1), (9, 7, 3, 1 << 22)]
)
def test_blocked_search_matches_the_dense_float64_oracle(monkeypatch, num_tokens, num_codes, dim, block_elements):
    """Every block size (one code per block, several, all codes at once): the index of the least
    float64 distance to the conditioned codes, wherever the runner-up is farther than rounding;
    duplicate codes resolve to the first index; a non-finite token or condition gets -1."""
    monkeypatch.setattr(implicit_codebook, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(num_tokens)
    mlp = ImplicitCodebookMLP(dim, dim_hidden=dim + 2, depth=2)
    codebook, condition, tokens = (
        torch.randn(num_codes, dim),
        torch.randn(num_tokens, dim),
        torch.randn(num_tokens, dim),
    )
    codebook[3] = codebook[1]
    condition[2, 0], tokens[4, 1] = float("inf"), float("nan")
    found = search_conditioned_codes(mlp, codebook, condition, tokens)
    with torch.no_grad():
        dense = mlp.double()(codebook.double(), condition=condition.double()[None])[0]  # (N, K, D)
    distance = (tokens.double()[:, None] - dense).norm(dim=-1)
    valid = torch.ones(num_tokens, dtype=torch.bool)
    valid[[2, 4]] = False
    assert (found[~valid] == -1).all()
    best, second = distance[valid].topk(2, dim=-1, largest=False).values.unbind(-1)
    clear = second - best > 1e-4
    assert torch.equal(found[valid][clear], distance[valid].argmin(-1)[clear])
    assert not (found == 3).any()


def test_sampled_codes_follow_the_softmax_of_the_negative_distances(monkeypatch):
    """temperature > 0 (stochastic_sample_codes): over 20000 draws for one token and condition,
    blocks of 2 codes, each code's frequency is within 5 standard errors of softmax(-distance / T)
    of the float64 distances to the conditioned codes."""
    num_draws, temperature = 20000, 0.7
    monkeypatch.setattr(implicit_codebook, "BLOCK_ELEMENTS", num_draws * 4 * 2)
    torch.manual_seed(0)
    mlp = ImplicitCodebookMLP(4, depth=1)
    codebook, condition, token = torch.randn(5, 4) * 0.5, torch.randn(1, 4), torch.randn(1, 4)
    found = search_conditioned_codes(
        mlp, codebook, condition.expand(num_draws, -1), token.expand(num_draws, -1), temperature
    )
    with torch.no_grad():
        dense = mlp.double()(codebook.double(), condition=condition.double())[0]  # (K, D)
    probs = (-(token.double() - dense).norm(dim=-1) / temperature).softmax(-1)
    freq = torch.bincount(found, minlength=5).double() / num_draws
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / num_draws).sqrt() + 1e-3).all(), (freq, probs)


def test_stochastic_sampling_in_training_only():
    """stochastic_sample_codes draws codes in training (reproducible from torch's seed, different
    across seeds); eval and sample_codebook_temp=0 take the nearest codes."""
    rvq = ResidualVQ(
        dim=DIM, num_quantizers=3, codebook_size=CODES, implicit_neural_codebook=True, stochastic_sample_codes=True
    )
    x = torch.randn(BATCH, SEQ, DIM)
    with torch.no_grad():
        nearest = rvq.eval()(x)[1]
        draws = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            draws.append(rvq.train()(x, freeze_codebook=True)[1])
        cold = rvq(x, freeze_codebook=True, sample_codebook_temp=0.0)[1]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], nearest) and torch.equal(cold, nearest)


def test_training_step_holds_no_tensor_that_grows_with_the_codes(monkeypatch):
    """With blocks of 4096 values, a training step at N = 64 tokens, D = 8 creates no tensor larger
    than a block: the same largest tensor at K = 64 and K = 256 codes, where 1.32.0's (N, K, D)
    tensor has 32768 and 131072 values (and its MLP several of that size each)."""
    monkeypatch.setattr(implicit_codebook, "BLOCK_ELEMENTS", 4096)
    largest = {}
    for num_codes in (64, 256):
        torch.manual_seed(0)
        rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=num_codes, implicit_neural_codebook=True).train()
        x = torch.randn(2, 32, 8, requires_grad=True)
        with LargestTensor() as record:
            quantized, _, losses = rvq(x)
            (quantized.square().sum() + losses.sum()).backward()
        largest[num_codes] = record.largest
        assert torch.isfinite(x.grad).all() and rvq.mlps[0].proj_in.weight.grad.abs().sum() > 0
    assert largest[64] == largest[256] == 4096, largest
