"""fastvq.ResidualVQ / GroupedResidualVQ against vector-quantize-pytorch 1.32.0 (the anchor).

Same protocol and tolerance as test_layer_parity: a few SGD training steps on both from the same
state, comparing quantized, indices, losses, input and parameter gradients and every state_dict
entry after each step; eval then bit-identical. Where 1.32.0 fails (feature maps, cross-entropy
from indices) or is wrong (beam search updates only the first codebook), fastvq is checked against
its own definition instead, as stated in each test.
"""

import copy

import pytest
import torch
from conftest import backend_cases
from test_layer_parity import close, compare_eval, compare_state, compare_steps
from vq_checks import LargestTensor

from fastvq.nn.residual_vq import GroupedResidualVQ, ResidualVQ
from fastvq.nn.vector_quantize import VectorQuantize

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

DIM, CODES, BATCH, SEQ = 8, 24, 2, 12

CONFIGS = {
    "ema": dict(num_quantizers=3),
    "learnable": dict(num_quantizers=3, learnable_codebook=True, ema_update=False),
    "cosine": dict(num_quantizers=3, use_cosine_sim=True),
    "shared-codebook": dict(num_quantizers=3, shared_codebook=True),
    "projection": dict(num_quantizers=3, codebook_dim=5),
    "sizes-per-stage": dict(codebook_size=(24, 13, 7)),
    "quantize-dropout": dict(num_quantizers=4, quantize_dropout=True),
    "quantize-dropout-cutoff-multiple": dict(
        num_quantizers=6, quantize_dropout=True, quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2
    ),
    "quant-grad-frac": dict(num_quantizers=3, quant_grad_frac=0.3),
    "straight-through-decay": dict(num_quantizers=2, rotation_trick=False, decay=0.5, commitment_weight=0.25),
    "orthogonal-reg": dict(num_quantizers=2, orthogonal_reg_weight=0.5),
}


def make_pair(backend="torch", cls="ResidualVQ", **kwargs):
    kwargs.setdefault("codebook_size", CODES)
    anchor = getattr(anchor_module, cls)(dim=DIM, **kwargs)
    ours = {"ResidualVQ": ResidualVQ, "GroupedResidualVQ": GroupedResidualVQ}[cls](dim=DIM, backend=backend, **kwargs)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


def batches(shape=(BATCH, SEQ, DIM), steps=3):
    return [torch.randn(shape) * 1.5 for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    """Quantize dropout draws its stage from the global RNG in both (seeded per step)."""
    anchor, ours = make_pair(**CONFIGS[config])
    compare_steps(anchor, ours, batches())
    compare_eval(anchor, ours, batches(steps=1)[0])


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("config", ["ema", "shared-codebook", "quantize-dropout"])
def test_backends_match_anchor(device, backend, config):
    anchor, ours = make_pair(backend, **CONFIGS[config])
    anchor, ours = anchor.to(device), ours.to(device)
    compare_steps(anchor, ours, [x.to(device) for x in batches(steps=2)])
    compare_eval(anchor, ours, batches(steps=1)[0].to(device))


def test_fixed_dropout_seed_and_padding_mask_match_anchor():
    anchor, ours = make_pair(num_quantizers=4, quantize_dropout=True)
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[0, 7:] = False
    compare_steps(anchor, ours, batches(), mask=mask, rand_quantize_dropout_fixed_seed=3)
    ours.train()
    indices = ours(batches(steps=1)[0], mask=mask, rand_quantize_dropout_fixed_seed=3)[1]
    assert (indices[0, 7:] == -1).all() and (indices[1, :, :2] >= 0).all()


@pytest.mark.parametrize("return_zeros", [True, False])
def test_masked_positions_match_anchor(return_zeros):
    anchor, ours = make_pair(num_quantizers=2, return_zeros_for_masked_padding=return_zeros)
    mask = torch.rand(BATCH, SEQ) > 0.3
    compare_steps(anchor, ours, batches(), mask=mask)
    compare_eval(anchor, ours, batches(steps=1)[0], mask=mask)


def test_state_dicts_load_both_ways():
    for kwargs in (dict(num_quantizers=3, codebook_dim=5), dict(num_quantizers=3, shared_codebook=True)):
        anchor, ours = make_pair(**kwargs)
        ours.train()(torch.randn(BATCH, SEQ, DIM))
        assert anchor.load_state_dict(ours.state_dict()) is not None
        compare_state(ours, anchor, "after loading fastvq's state into the anchor")
        compare_eval(anchor, ours, torch.randn(BATCH, SEQ, DIM))


def test_shared_codebook_is_one_module():
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, shared_codebook=True)
    assert rvq.layers[0]._codebook is rvq.layers[2]._codebook
    with pytest.raises(ValueError, match="shared_codebook needs one codebook_size"):
        ResidualVQ(dim=DIM, codebook_size=(8, 4), shared_codebook=True)


@pytest.mark.parametrize(
    "backend,beam_kwargs",
    [
        ("torch", dict(beam_size=3)),
        ("torch", dict(beam_size=4, eval_beam_size=2)),
        ("torch", dict(beam_size=3, beam_score_quantizer_weights=[1.0, 0.5, 0.25])),
        ("torch", dict(beam_size=2, shared_codebook=True)),
        *[
            pytest.param(backend, dict(beam_size=3), marks=case.marks, id=f"{case.id}-beam3")
            for case, backend in ((c, c.values[1]) for c in backend_cases(("triton", "cpu")))
            if case.values[0] == "cpu"
        ],
    ],
)
def test_beam_search_matches_anchor(backend, beam_kwargs):
    """Outputs, losses and gradients match 1.32.0 in training, and eval is identical. 1.32.0
    updates only the first stage's codebook after a beam search (it unbinds the stage inputs along
    the beam axis); fastvq updates every stage from the best path, which is checked by applying
    `update_indices` to the anchor's later stages with the residuals of the returned indices."""
    anchor, ours = make_pair(backend, num_quantizers=3, **beam_kwargs)
    for step, x in enumerate(batches(steps=2)):
        anchor.train(), ours.train()
        before = [layer._codebook.embed[0].clone() for layer in anchor.layers]
        outputs = []
        for module in (anchor, ours):
            xi = x.clone().requires_grad_()
            torch.manual_seed(step)
            quantized, indices, losses = module(xi)
            (quantized.square().sum() + losses.sum()).backward()
            outputs.append((quantized.detach(), indices, losses.detach(), xi.grad))
        for what, a, b in zip(("quantized", "indices", "losses", "input grad"), *outputs):
            close(b, a, f"step {step} {what}")
        indices, residual = outputs[0][1], x.clone()
        for q, layer in enumerate(anchor.layers):
            if q > 0:
                layer.update_indices(residual, indices[..., q])
            residual = residual - before[q][indices[..., q]]
        if anchor.shared_codebook:
            anchor.layers[0]._codebook.update_ema()
        compare_state(anchor, ours, f"after beam step {step}")
        ours.load_state_dict(anchor.state_dict())
    compare_eval(anchor, ours, batches(steps=1)[0])


def test_beam_search_finds_a_path_no_worse_than_greedy():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=4, codebook_size=16).eval()
    x = torch.randn(4, 64, DIM)
    greedy = rvq(x)[0]
    beam = rvq(x, beam_size=8)[0]
    greedy_error = (greedy - x).square().sum(-1)
    beam_error = (beam - x).square().sum(-1)
    assert beam_error.mean() < greedy_error.mean()


def test_masked_beam_search_equals_the_search_on_the_unmasked_tokens():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=16, beam_size=4).eval()
    x, mask = torch.randn(2, 9, DIM), torch.rand(2, 9) > 0.4
    quantized, indices, losses = rvq(x, mask=mask)
    kept_quantized, kept_indices, kept_losses = rvq(x[mask][None])
    close(quantized[mask], kept_quantized[0], "quantized")
    assert torch.equal(indices[mask], kept_indices[0]) and (indices[~mask] == -1).all()
    assert (quantized[~mask] == 0).all()
    close(losses, kept_losses, "losses")


@pytest.mark.parametrize("config", ["ema", "projection", "quantize-dropout"])
def test_grouped_matches_anchor(config):
    kwargs = dict(CONFIGS[config], groups=2)
    kwargs.pop("codebook_dim", None)
    anchor, ours = make_pair(cls="GroupedResidualVQ", **kwargs)
    compare_steps(anchor, ours, batches())
    compare_eval(anchor, ours, batches(steps=1)[0])
    x = batches(steps=1)[0]
    with torch.no_grad():
        expected, actual = anchor(x, return_all_codes=True), ours.eval()(x, return_all_codes=True)
    assert len(actual[3]) == len(expected[3]) == 2
    for group, (a, e) in enumerate(zip(actual[3], expected[3])):
        close(a, e, f"all codes of group {group}")
    close(ours.codebooks, anchor.codebooks, "codebooks")
    close(ours.get_output_from_indices(actual[1]), anchor.get_output_from_indices(expected[1]), "output")
    close(ours.get_codes_from_indices(actual[1]), anchor.get_codes_from_indices(expected[1]), "codes")


def test_grouped_feature_maps_equal_the_same_tokens_as_a_sequence():
    """1.32.0 fails on feature maps here too; each group quantizes its channels of every pixel."""
    torch.manual_seed(0)
    ours = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=CODES, accept_image_fmap=True).eval()
    seq = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=CODES).eval()
    seq.load_state_dict(ours.state_dict())
    x = torch.randn(BATCH, DIM, 3, 5)
    quantized, indices, losses = ours(x)
    q_seq, i_seq, l_seq = seq(x.flatten(2).transpose(1, 2))
    assert quantized.shape == x.shape and indices.shape == (2, BATCH, 3, 5, 2)
    close(quantized.flatten(2).transpose(1, 2), q_seq, "quantized")
    close(indices.reshape(i_seq.shape), i_seq, "indices")
    close(losses, l_seq, "losses")


def test_codes_from_indices_match_anchor():
    anchor, ours = make_pair(num_quantizers=4, codebook_dim=5, quantize_dropout=True)
    indices = torch.randint(0, CODES, (BATCH, SEQ, 4))
    indices[0, :3, 2:] = -1
    for given in (indices, indices[..., :2]):
        close(ours.get_codes_from_indices(given), anchor.get_codes_from_indices(given), "codes")
        close(ours.get_output_from_indices(given), anchor.get_output_from_indices(given), "output")
    x = batches(steps=1)[0]
    with torch.no_grad():
        expected, actual = anchor.eval()(x, return_all_codes=True), ours.eval()(x, return_all_codes=True)
    close(actual[3], expected[3], "all codes")
    close(ours.codebooks, anchor.codebooks, "codebooks")
    with pytest.raises(ValueError, match="indices must be in"):
        ours.get_codes_from_indices(torch.full((1, 2, 4), CODES))
    with pytest.raises(ValueError, match="num_quantizers=4 stages"):
        ours.get_codes_from_indices(torch.zeros(1, 2, 5, dtype=torch.long))


def test_sizes_per_stage_codebooks_is_a_tuple():
    _, ours = make_pair(codebook_size=(24, 13, 7))
    assert [tuple(c.shape) for c in ours.codebooks] == [(24, DIM), (13, DIM), (7, DIM)]
    indices = ours(torch.randn(BATCH, SEQ, DIM))[1]
    assert indices[..., 2].max() < 7 and indices[..., 1].max() < 13


@pytest.mark.parametrize(
    "layout,kwargs,shape",
    [
        ("image", dict(accept_image_fmap=True), (BATCH, DIM, 3, 5)),
        ("video", dict(accept_3d_fmap=True), (BATCH, DIM, 2, 2, 3)),
        ("channel-first", dict(channel_last=False), (BATCH, DIM, SEQ)),
        ("one-token", {}, (BATCH, DIM)),
    ],
)
def test_layouts_equal_the_same_tokens_as_a_sequence(layout, kwargs, shape):
    """1.32.0's ResidualVQ fails on feature maps; fastvq gives exactly the token-sequence result,
    laid out like the input (indices channel last, with the quantizer dim last)."""
    torch.manual_seed(0)
    ours = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, codebook_dim=5, **kwargs).eval()
    seq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, codebook_dim=5).eval()
    seq.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    tokens = x.unsqueeze(1) if len(shape) == 2 else x.flatten(2).transpose(1, 2)
    quantized, indices, losses, codes = ours(x, return_all_codes=True)
    q_seq, i_seq, l_seq, c_seq = seq(tokens, return_all_codes=True)
    assert quantized.shape == x.shape
    if len(shape) == 2:
        close(quantized, q_seq[:, 0], "quantized")
        close(indices, i_seq[:, 0], "indices")
    else:
        close(quantized.flatten(2).transpose(1, 2), q_seq, "quantized")
        close(indices.reshape(BATCH, -1, 3), i_seq, "indices")
        assert indices.shape == (*shape[:1], *shape[2:], 3)
    close(codes.reshape(c_seq.shape), c_seq, "all codes")


def test_cross_entropy_from_indices_is_teacher_forced():
    """1.32.0 raises on forward(x, indices=...); fastvq sums each stage's cross-entropy, stage q
    seeing x minus the target codes of stages < q, and returns the output of the targets."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES).eval()
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    targets = torch.randint(0, CODES, (BATCH, SEQ, 3))
    quantized, loss = rvq(x, indices=targets)
    expected, residual = 0.0, x
    for q, layer in enumerate(rvq.layers):
        expected = expected + layer(residual, indices=targets[..., q])[1]
        residual = residual - layer.get_codes_from_indices(targets[..., q]).detach()
    close(loss.detach(), expected.detach(), "cross-entropy")
    close(quantized, rvq.get_output_from_indices(targets), "quantized")
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dropped out"):
        rvq(x, indices=targets.masked_fill(targets == 0, -1).index_fill(2, torch.tensor([1]), -1))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="in_place_codebook_optimizer needs learnable codes"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, in_place_codebook_optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="heads=1"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, heads=2)
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualVQ(dim=DIM, codebook_size=CODES)
    with pytest.raises(ValueError, match="codebook_size must have num_quantizers=3"):
        ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=(8, 4))
    with pytest.raises(ValueError, match="beam_score_quantizer_weights"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, beam_size=2, beam_score_quantizer_weights=[1.0])
    with pytest.raises(ValueError, match="eval_beam_size needs beam_size"):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, eval_beam_size=2)
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=CODES)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, dim=8\)"):
        rvq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="topk must be <= 16"):
        rvq(torch.randn(2, 3, DIM), beam_size=17)
    with pytest.raises(ValueError, match="dim must be a multiple of groups=3"):
        GroupedResidualVQ(dim=DIM, groups=3, num_quantizers=2, codebook_size=CODES)


def test_inputs_are_not_modified():
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, beam_size=2).train()
    x = torch.randn(BATCH, SEQ, DIM)
    before = x.clone()
    rvq(x)
    assert torch.equal(x, before)


def test_training_step_builds_no_n_by_k_tensor(monkeypatch):
    """A residual training step (greedy and beam search, shared codebook with dead codes) never
    creates a tensor of N * K / 2 elements; cdist and one_hot are never called."""
    n_tokens, n_codes = 2048, 1024

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense N x K helper was called")

    monkeypatch.setattr(torch, "cdist", forbidden)
    monkeypatch.setattr(torch.nn.functional, "one_hot", forbidden)
    x = torch.randn(2, n_tokens // 2, 16, requires_grad=True)
    for kwargs in (
        dict(codebook_dim=8, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2.0),
        dict(beam_size=4),
        dict(shared_codebook=True, threshold_ema_dead_code=2.0, quantize_dropout=True),
    ):
        rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=n_codes, **kwargs).train()
        with LargestTensor() as record:
            quantized, _, losses = rvq(x)
            (quantized.sum() + losses.sum()).backward()
        assert 0 < record.largest < n_tokens * n_codes // 2, (kwargs, record.largest)


def test_stages_are_vector_quantize_layers_with_passed_keywords():
    rvq = ResidualVQ(
        dim=DIM,
        num_quantizers=2,
        codebook_size=CODES,
        decay=0.5,
        backend="torch",
        precision="ieee",
        threshold_ema_dead_code=1,
    )
    assert all(isinstance(layer, VectorQuantize) for layer in rvq.layers)
    assert rvq.layers[1]._codebook.decay == 0.5 and rvq.layers[1]._codebook.backend == "torch"
    frozen = copy.deepcopy(rvq).train()
    state = copy.deepcopy(frozen.state_dict())
    frozen(torch.randn(BATCH, SEQ, DIM), freeze_codebook=True)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, state[key]), key
