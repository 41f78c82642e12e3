"""VectorQuantize's loss and gradient options against vector-quantize-pytorch 1.32.0 (the anchor):
the codebook diversity loss, the cross-entropy commitment, straight_through's softmax gradient,
directional_reparam, forward(codebook_transform_fn=...) and ResidualVQ(diveq=True).

Protocol and tolerance of test_layer_parity (several SGD steps from the same state, every output,
loss, gradient and state entry within 1e-5; eval identical); noise (directional_reparam) is drawn
at the same seed on both sides. Where the anchor's backward reads the codebook after its in-place
EMA update (the diversity, cross-entropy and softmax terms save the codebook, which the update then
overwrites through `.data`), fastvq differentiates the loss it returned, on the codes before the
update: there the gradients are compared with the anchor's at freeze_codebook=True (same forward,
no update) and the update with the anchor's own step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_layer_parity import BATCH, CODES, DIM, SEQ, batches, close, compare_eval, compare_steps, make_pair, train_step
from torch import nn
from vq_checks import LargestTensor

from fastvq.nn import code_soft_terms
from fastvq.nn.residual_vq import ResidualVQ
from fastvq.nn.vector_quantize import VectorQuantize

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

HEADS_SHARED = dict(heads=2, codebook_dim=3)
HEADS_SEPARATE = dict(heads=2, codebook_dim=4, separate_codebook_per_head=True)
MASK = torch.arange(SEQ).expand(BATCH, SEQ) < torch.tensor([[7], [SEQ]])
NO_ROUTE_ST = dict(straight_through=True, rotation_trick=False, route_gradients_to_input=False)

# constructor arguments, forward arguments
CASES = {
    "diversity": (dict(codebook_diversity_loss_weight=0.5), dict(freeze_codebook=True)),
    "diversity-cosine-heads-shared": (
        dict(
            codebook_diversity_loss_weight=0.5, codebook_diversity_temperature=10.0, use_cosine_sim=True, **HEADS_SHARED
        ),
        dict(freeze_codebook=True),
    ),
    "diversity-heads-separate": (dict(codebook_diversity_loss_weight=2.0, ema_update=False, **HEADS_SEPARATE), {}),
    "diversity-learnable-mask": (
        dict(codebook_diversity_loss_weight=0.5, learnable_codebook=True, ema_update=False),
        dict(mask=MASK),
    ),
    "cross-entropy-mask": (dict(commitment_use_cross_entropy_loss=True), dict(freeze_codebook=True, mask=MASK)),
    "cross-entropy-heads-shared": (dict(commitment_use_cross_entropy_loss=True, ema_update=False, **HEADS_SHARED), {}),
    "cross-entropy-heads-separate-learnable": (
        dict(
            commitment_use_cross_entropy_loss=True,
            commitment_weight=0.3,
            learnable_codebook=True,
            ema_update=False,
            rotation_trick=False,
            **HEADS_SEPARATE,
        ),
        {},
    ),
    "cross-entropy-cosine": (
        dict(commitment_use_cross_entropy_loss=True, use_cosine_sim=True),
        dict(freeze_codebook=True),
    ),
    "softmax-straight-through": (dict(ema_update=False, **NO_ROUTE_ST), {}),
    "softmax-straight-through-projection-temperature": (
        dict(codebook_dim=5, sample_codebook_temp=0.5, **NO_ROUTE_ST),
        dict(freeze_codebook=True),
    ),
    "softmax-straight-through-orthogonal-heads-separate": (
        dict(orthogonal_reg_weight=0.3, ema_update=False, **NO_ROUTE_ST, **HEADS_SEPARATE),
        {},
    ),
    "softmax-straight-through-cosine-heads-shared": (
        dict(use_cosine_sim=True, sample_codebook_temp=2.0, **NO_ROUTE_ST, **HEADS_SHARED),
        dict(freeze_codebook=True),  # no mask: 1.32.0's masked commitment fails with heads and a projection
    ),
    "directional-reparam": (dict(directional_reparam=True, threshold_ema_dead_code=0.5), {}),
    "directional-reparam-heads-separate": (
        dict(directional_reparam=True, threshold_ema_dead_code=0.5, directional_reparam_variance=0.1, **HEADS_SEPARATE),
        {},
    ),
    "directional-reparam-heads-shared-mask": (
        dict(directional_reparam=True, threshold_ema_dead_code=0.5, **HEADS_SHARED),
        dict(mask=MASK),
    ),
}


def compare_breakdown(anchor, ours, x, **forward_kwargs):
    """One training forward of copies of both at one seed: every LossBreakdown entry within 1e-5."""
    results = []
    for module in (copy.deepcopy(anchor).train(), copy.deepcopy(ours).train()):
        torch.manual_seed(0)
        results.append(module(x, return_loss_breakdown=True, **forward_kwargs)[3])
    for name, expected, actual in zip(results[0]._fields, *results):
        close(actual.detach(), expected.detach(), f"loss breakdown {name}")


@pytest.mark.parametrize("case", CASES)
def test_options_match_anchor(case):
    kwargs, forward_kwargs = CASES[case]
    anchor, ours = make_pair(**kwargs)
    inputs = batches((BATCH, SEQ, DIM), 2)
    compare_breakdown(anchor, ours, inputs[0], **forward_kwargs)
    compare_steps(anchor, ours, inputs, **forward_kwargs)
    eval_kwargs = {k: v for k, v in forward_kwargs.items() if k == "mask"}
    compare_eval(anchor, ours, inputs[0], **eval_kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codebook_diversity_loss_weight=0.5),
        dict(commitment_use_cross_entropy_loss=True, **HEADS_SEPARATE),
        dict(sample_codebook_temp=0.7, **NO_ROUTE_ST),
    ],
    ids=["diversity", "cross-entropy", "softmax-straight-through"],
)
def test_ema_codebook_gradients_are_those_of_the_returned_loss(kwargs):
    """With the EMA codebook: outputs, losses and the update as the anchor's; gradients as the
    anchor's where its update does not overwrite the codes its backward reads (freeze_codebook)."""
    anchor, ours = make_pair(**kwargs)
    frozen = copy.deepcopy(anchor)
    for step, x in enumerate(batches((BATCH, SEQ, DIM), 2)):
        expected, actual = train_step(anchor.train(), x, seed=step), train_step(ours.train(), x, seed=step)
        for what, e, a in zip(("quantized", "indices", "loss"), expected[:3], actual[:3]):
            close(a, e, f"step {step} {what}")
        gradients = train_step(frozen.train(), x, seed=step, freeze_codebook=True)
        close(actual[3], gradients[3], f"step {step} input grad")
        assert actual[4].keys() == gradients[4].keys()
        for name in actual[4]:
            close(actual[4][name], gradients[4][name], f"step {step} grad of {name}")
        for key, value in anchor.state_dict().items():
            close(ours.state_dict()[key], value, f"step {step} state {key}")
        frozen.load_state_dict(anchor.state_dict())
        ours.load_state_dict(anchor.state_dict())


def test_sampled_codes_get_the_softmax_gradient():
    """stochastic_sample_codes with straight_through: the value is the sampled code (drawn by fastvq's
    own seeded sampler, so not the anchor's draw) and the gradient is that of (one_hot(sampled) + p -
    p.detach()) @ codebook with p = softmax(-cdist / T) (1.32.0's formula), to the input and to
    project_in."""
    torch.manual_seed(0)
    layer = VectorQuantize(
        dim=DIM,
        codebook_size=CODES,
        codebook_dim=5,
        stochastic_sample_codes=True,
        sample_codebook_temp=3.0,
        **NO_ROUTE_ST,
    ).train()
    x = torch.randn(BATCH, SEQ, DIM)
    torch.manual_seed(1)
    quantized, indices, _ = layer(x, freeze_codebook=True)
    torch.manual_seed(1)
    again = layer(x, freeze_codebook=True)[1]
    assert torch.equal(indices, again)  # seeded
    assert (indices != layer.eval()(x)[1]).any()  # sampled, not all nearest
    target = torch.randn_like(quantized)
    (quantized * target).sum().backward()
    codebook = layer.codebook
    z = layer.project_in(x)
    probs = (-torch.cdist(z, codebook.expand(BATCH, -1, -1)) / 3.0).softmax(-1)
    one_hot = F.one_hot(indices, CODES).float()
    expected = layer.project_out((one_hot + probs - probs.detach()) @ codebook)
    close(quantized, expected.detach(), "quantized")
    weight = layer.project_in.weight
    expected_grad = torch.autograd.grad((expected * target).sum(), weight)[0]
    close(weight.grad, expected_grad, "project_in grad")
    assert expected_grad.abs().max() > 1e-3  # a gradient that could be wrong


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(codebook_dim=5), dict(mask=True)],
    ids=["plain", "projection", "mask"],
)
def test_residual_diveq_matches_anchor(kwargs):
    """(1.32.0's beam search fails with diveq: its zero commitment makes the stage loss a scalar.)"""
    kwargs = dict(kwargs)
    forward_kwargs = dict(mask=MASK) if kwargs.pop("mask", False) else {}
    anchor = anchor_module.ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, diveq=True, **kwargs)
    ours = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, diveq=True, backend="torch", **kwargs)
    ours.load_state_dict(anchor.state_dict())
    assert not ours.layers[0].ema_update and ours.quant_grad_frac == 1.0
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM)), **forward_kwargs)
    anchor.eval()
    ours.eval()
    x = torch.randn(BATCH, SEQ, DIM)
    results = []
    for module in (anchor, ours):
        torch.manual_seed(5)  # 1.32.0 draws the direction's noise in eval too
        with torch.no_grad():
            results.append(module(x, **forward_kwargs))
    for what, e, a in zip(("quantized", "indices", "losses"), *results):
        close(a, e, f"eval {what}")
    assert not torch.equal(results[1][0], ours.get_output_from_indices(results[1][1]))  # the noise shows


def test_directional_reparam_defaults_and_values():
    """Its defaults follow 1.32.0 (no EMA, learnable codebook, no rotation trick, no commitment); its
    value is the code up to the noise, exactly the code at variance 0."""
    layer = VectorQuantize(dim=DIM, codebook_size=CODES, directional_reparam=True, threshold_ema_dead_code=1)
    assert not layer.ema_update and layer.learnable_codebook and not layer.rotation_trick
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    quantized, indices, loss = layer.train()(x)
    assert loss.item() == 0.0
    exact = VectorQuantize(
        dim=DIM,
        codebook_size=CODES,
        directional_reparam=True,
        threshold_ema_dead_code=1,
        directional_reparam_variance=0.0,
    )
    exact.load_state_dict(layer.state_dict())
    codes = exact.eval()(x)[0]
    close(exact.train()(x, freeze_codebook=True)[0].detach(), codes, "variance 0")
    assert not torch.allclose(quantized, codes)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(directional_reparam=True), ValueError, "threshold_ema_dead_code"),
        (dict(directional_reparam=True, threshold_ema_dead_code=1, rotation_trick=True), ValueError, "rotation_trick"),
        (
            dict(directional_reparam=True, threshold_ema_dead_code=1, straight_through=True),
            ValueError,
            "straight_through",
        ),
        (dict(directional_reparam_variance=-1.0), ValueError, "directional_reparam_variance"),
        (dict(codebook_diversity_loss_weight=-0.5), ValueError, "codebook_diversity_loss_weight"),
        (dict(codebook_diversity_temperature=0.0), ValueError, "codebook_diversity_temperature"),
    ],
)
def test_bad_option_values_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        VectorQuantize(dim=DIM, codebook_size=CODES, **kwargs)


def test_topk_in_training_refuses_what_1_32_0_cannot_do():
    x = torch.randn(BATCH, SEQ, DIM)
    with pytest.raises(ValueError, match="commitment_use_cross_entropy_loss"):
        VectorQuantize(dim=DIM, codebook_size=CODES, commitment_use_cross_entropy_loss=True).train()(x, topk=2)
    with pytest.raises(ValueError, match="straight_through"):
        VectorQuantize(dim=DIM, codebook_size=CODES, straight_through=True, rotation_trick=False).train()(x, topk=2)
    layer = VectorQuantize(dim=DIM, codebook_size=CODES, commitment_use_cross_entropy_loss=True).eval()
    assert layer(x, topk=2)[1].shape == (BATCH, SEQ, 2)  # eval top-k is fine


class PerTokenShift(nn.Module):
    """A codebook transform with parameters: codes (C, K, D) -> scale * codes + an offset per
    (codebook, batch row, position), (C, B', S, K, D) (the shape 1.32.0 expects)."""

    def __init__(self, codebooks, rows, dim):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(codebooks, rows, SEQ, 1, dim) * 0.3)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, codes):
        return codes[:, None, None] * self.scale + self.offset


TRANSFORM_CASES = {  # constructor arguments, (codebooks, batch rows) of 1.32.0's layout, forward arguments
    "l2": (dict(), (1, BATCH), {}),
    "cosine": (dict(use_cosine_sim=True), (1, BATCH), {}),
    "learnable": (dict(learnable_codebook=True, ema_update=False), (1, BATCH), {}),
    "heads-separate": (HEADS_SEPARATE, (2, BATCH), {}),
    "heads-shared-learnable": (
        dict(heads=2, codebook_dim=4, learnable_codebook=True, ema_update=False, rotation_trick=False),
        (1, 2 * BATCH),
        {},
    ),
    "sampled-heads-separate": (
        dict(stochastic_sample_codes=True, sample_codebook_temp=2.0, **HEADS_SEPARATE),
        (2, BATCH),
        {},
    ),
    "softmax-straight-through": (dict(sample_codebook_temp=0.5, **NO_ROUTE_ST), (1, BATCH), {}),
    "diversity-cross-entropy-mask": (
        dict(codebook_diversity_loss_weight=0.5, commitment_use_cross_entropy_loss=True),
        (1, BATCH),
        dict(mask=MASK),
    ),
    "diversity-cross-entropy-heads-shared": (
        dict(codebook_diversity_loss_weight=0.5, commitment_use_cross_entropy_loss=True, **HEADS_SHARED),
        (1, 2 * BATCH),
        {},
    ),
}


@pytest.mark.parametrize("case", TRANSFORM_CASES)
def test_codebook_transform_fn_matches_anchor(case):
    """Training steps (outputs, losses, the layer's and the transform's gradients, the EMA state) and
    eval (identical) with per-token codebooks from a transform with parameters."""
    kwargs, (codebooks, rows), forward_kwargs = TRANSFORM_CASES[case]
    anchor, ours = make_pair(**kwargs)
    torch.manual_seed(0)
    anchor_transform = PerTokenShift(codebooks, rows, kwargs.get("codebook_dim", DIM))
    transform = copy.deepcopy(anchor_transform)
    for step, x in enumerate(batches((BATCH, SEQ, DIM), 2)):
        expected = train_step(anchor.train(), x, seed=step, codebook_transform_fn=anchor_transform, **forward_kwargs)
        actual = train_step(ours.train(), x, seed=step, codebook_transform_fn=transform, **forward_kwargs)
        for what, e, a in zip(("quantized", "indices", "loss", "input grad"), expected[:4], actual[:4]):
            close(a, e, f"step {step} {what}")
        assert actual[4].keys() == expected[4].keys()
        for name in expected[4]:
            close(actual[4][name], expected[4][name], f"step {step} grad of {name}")
        for (name, e), a in zip(anchor_transform.named_parameters(), transform.parameters()):
            assert (a.grad is None) == (e.grad is None), name
            if e.grad is not None:
                close(a.grad, e.grad, f"step {step} transform grad of {name}")
            e.grad = a.grad = None
        for key, value in anchor.state_dict().items():
            close(ours.state_dict()[key], value, f"step {step} state {key}")
        ours.load_state_dict(anchor.state_dict())
    anchor.eval()
    ours.eval()
    with torch.no_grad():
        expected = anchor(x, codebook_transform_fn=anchor_transform, **forward_kwargs)
        actual = ours(x, codebook_transform_fn=transform, **forward_kwargs)
    for what, e, a in zip(("quantized", "indices", "loss"), expected, actual):
        assert torch.equal(a, e), f"eval {what}"


def test_codebook_transform_fn_errors():
    layer = VectorQuantize(dim=DIM, codebook_size=CODES)
    x = torch.randn(BATCH, SEQ, DIM)
    shift = PerTokenShift(1, BATCH, DIM)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(1, 2, 12, 24, 8\)"):
        layer(x, codebook_transform_fn=lambda codes: codes)
    with pytest.raises(TypeError, match="callable"):
        layer(x, codebook_transform_fn="identity")
    with pytest.raises(ValueError, match="does not support topk or indices"):
        layer.eval()(x, topk=2, codebook_transform_fn=shift)
    with pytest.raises(ValueError, match="does not support topk or indices"):
        layer(x, indices=torch.zeros(BATCH, SEQ, dtype=torch.long), codebook_transform_fn=shift)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codebook_diversity_loss_weight=1.0, commitment_use_cross_entropy_loss=True),
        dict(codebook_diversity_loss_weight=1.0, learnable_codebook=True, ema_update=False),
        dict(orthogonal_reg_weight=0.1, sample_codebook_temp=0.5, **NO_ROUTE_ST),
    ],
    ids=["diversity-cross-entropy", "diversity-learnable", "softmax-straight-through"],
)
def test_soft_terms_build_no_n_by_k_tensor(kwargs):
    """A training step (forward and backward, the codebook learning where it can) with the terms that
    score every code holds no tensor of N x K / 4 elements (1.32.0 holds several N x K ones); the
    diversity loss's per-position means are (positions, K), small here."""
    n_codes, batch, seq = 1024, 32, 4
    layer = VectorQuantize(dim=16, codebook_size=n_codes, codebook_dim=6, **kwargs).train()
    x = torch.randn(batch, seq, 16)
    with LargestTensor() as record:
        quantized, _, loss = layer(x)
        (quantized.square().sum() + loss).backward()
    assert 0 < record.largest < batch * seq * n_codes // 4, record.largest
    assert layer.project_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codebook_diversity_loss_weight=0.5, commitment_use_cross_entropy_loss=True),
        dict(directional_reparam=True, threshold_ema_dead_code=0.5, **HEADS_SEPARATE),
        dict(sample_codebook_temp=0.5, **NO_ROUTE_ST),
    ],
    ids=["diversity-cross-entropy", "directional-reparam", "softmax-straight-through"],
)
def test_16_bit_inputs_give_the_fp32_result_of_their_values(kwargs, dtype):
    """The math is fp32 whatever the input dtype: a 16-bit input gives the losses and input gradient of
    its values in fp32, and an output in its dtype."""
    layer = VectorQuantize(dim=DIM, codebook_size=CODES, backend="torch", **kwargs).train()
    x = torch.randn(BATCH, SEQ, DIM).to(dtype)
    results = []
    for inputs in (x, x.float()):
        inputs = inputs.clone().requires_grad_()
        torch.manual_seed(0)
        quantized, _, loss = layer(inputs, freeze_codebook=True)
        (quantized.float().square().sum() + loss).backward()
        results.append((quantized, loss, inputs.grad))
    (q16, loss16, grad16), (q32, loss32, grad32) = results
    assert q16.dtype == dtype and grad16.dtype == dtype
    close(loss16, loss32, "loss")
    close(q16.float(), q32.to(dtype).float(), "quantized")
    assert torch.allclose(grad16.float(), grad32, atol=1e-2, rtol=1e-2)  # the gradient is rounded to the dtype


def test_softmax_gradient_is_not_computed_where_the_estimator_cuts_it(monkeypatch):
    """An input that gets straight-through's own gradient makes the softmax term's gradient vanish in
    1.32.0 (x + (q - x).detach()): fastvq then skips the soft pass altogether."""

    def forbidden(*args, **kwargs):
        raise AssertionError("softmax_straight_through ran")

    monkeypatch.setattr(code_soft_terms, "softmax_straight_through", forbidden)
    layer = VectorQuantize(dim=DIM, codebook_size=CODES, straight_through=True, rotation_trick=False).train()
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    quantized, _, loss = layer(x)
    (quantized.sum() + loss).backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match="softmax_straight_through ran"):
        layer(x.detach())  # no input gradient of its own: the soft term is what reaches project_in / the codes
