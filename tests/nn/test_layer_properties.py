"""Property-based parity of the layers with vector-quantize-pytorch 1.32.0, where 1.32.0 defines the answer.

Hypothesis draws a configuration (`tests/strategies.py`: dim, codebook size, heads shared or
separate, cosine, codebook_dim projections, EMA options, learnable codebooks, layouts, padding
masks; for ResidualVQ and GroupedResidualVQ stages, per-stage sizes, shared codebooks, quantize
dropout, groups). Both layers start from the same state and see the same inputs and the same global
RNG state at each step, the protocol of tests/nn/test_layer_parity.py whose helpers run it: each
training step compares quantized, indices, loss, input and parameter gradients and every state_dict
entry (the EMA buffers) within that file's tolerance, then eval must be bit-identical. k-means init
and dead-code replacement draw differently by design and are left to the parity tests.
"""

import copy
import math

import pytest
import torch
from conftest import backend_cases
from strategies import LayerCase, backend_property, residual_cases, vector_quantize_cases
from test_layer_parity import compare_eval, compare_steps, train_step

import fastvq

anchor_package = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

CPU_BACKENDS = [case for case in backend_cases() if case.values[0] == "cpu"]
TRAINING_STEPS = 2
LAYER_SHARE, INTERPRETER_SHARE = 0.6, 0.2
"""Each example trains two layers for TRAINING_STEPS steps: these shares of the profile's examples
(the second under Triton's interpreter)."""


def make_layers(case, backend: str):
    """1.32.0's layer built from the case's seed, fastvq's from another RNG state on purpose (as
    test_layer_parity.make_pair), then given the anchor's state_dict."""
    torch.manual_seed(case.seed)
    anchor = getattr(anchor_package, case.name)(**case.kwargs)
    torch.manual_seed(12345)
    ours = getattr(fastvq, case.name)(**case.kwargs, backend=backend)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


def check_parity(case, backend: str) -> None:
    """Training steps within the parity tolerance, then eval bit-identical."""
    anchor, ours = make_layers(case, backend)
    *steps, final = case.inputs(TRAINING_STEPS + 1)
    compare_steps(anchor, ours, steps, **case.forward)
    compare_eval(anchor, ours, final, **case.forward)


@backend_property(CPU_BACKENDS, share=LAYER_SHARE, interpreter_share=INTERPRETER_SHARE, case=vector_quantize_cases())
def test_vector_quantize_matches_anchor(device, backend, case):
    """VectorQuantize: training steps within tolerance and eval bit-identical to 1.32.0."""
    check_parity(case, backend)


@backend_property(CPU_BACKENDS, share=LAYER_SHARE, interpreter_share=INTERPRETER_SHARE, case=residual_cases())
def test_residual_quantizers_match_anchor(device, backend, case):
    """ResidualVQ and GroupedResidualVQ: training steps within tolerance and eval bit-identical to 1.32.0."""
    check_parity(case, backend)


def _exact_rotation_gradient(x, code, grad):
    """d/dx of grad . rotate_to(x, code) in float64, from the definition (arXiv:2410.06424, sec. 4.2):
    R^T grad |code| / |x|, with u = x / |x|, q = code / |code|, w = (u + q) / |u + q|, R = I - 2 w w^T + 2 q u^T."""
    x, code, grad = x.double(), code.double(), grad.double()
    u, q = x / x.norm(), code / code.norm()
    w = (u + q) / (u + q).norm()
    rotation = torch.eye(len(x), dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(q, u)
    return rotation.T @ grad * code.norm() / x.norm()


@pytest.mark.parametrize("package", [pytest.param(anchor_package, id="1.32.0"), pytest.param(fastvq, id="fastvq")])
def test_rotation_trick_gradient_of_a_token_nearly_opposite_its_code(package):
    """A token at 179 degrees from the only code (found by the layer properties, where such a token made
    fastvq's input gradient differ from 1.32.0's by 2e-5 in a training step): the input gradient within
    1e-5 relative of the rotation trick's exact one, which 1.32.0 meets."""
    torch.manual_seed(0)
    vq = package.VectorQuantize(dim=2, codebook_size=1, commitment_weight=0.0, ema_update=False).train()
    code, angle = vq.codebook.detach().reshape(2), math.radians(179.0)
    turn = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    x = (turn @ code * 1.3).reshape(1, 1, 2).requires_grad_()
    grad = torch.tensor([0.3, -0.7])
    (vq(x)[0].reshape(2) * grad).sum().backward()
    want = _exact_rotation_gradient(x.detach().reshape(2), code, grad)
    error = (x.grad.reshape(2).double() - want).abs().max() / want.abs().max()
    assert error < 1e-5, f"relative error {error.item():.2g}"


@pytest.mark.parametrize(
    "package,rotation_trick",
    [
        pytest.param(anchor_package, True, id="1.32.0-rotation"),
        pytest.param(fastvq, True, id="fastvq-rotation"),
        pytest.param(anchor_package, False, id="1.32.0-straight-through"),
        pytest.param(fastvq, False, id="fastvq-straight-through"),
    ],
)
def test_a_learnable_codebook_without_commitment_loss_gets_no_gradient(package, rotation_trick):
    """Found by the layer properties (long profile): VectorQuantize(learnable_codebook=True,
    commitment_weight=0) in a training step leaves the codebook's .grad None, as 1.32.0 does."""
    torch.manual_seed(0)
    vq = package.VectorQuantize(
        dim=2,
        codebook_size=3,
        learnable_codebook=True,
        ema_update=False,
        commitment_weight=0.0,
        rotation_trick=rotation_trick,
    ).train()
    x = torch.tensor([[2.3115, -0.4401], [0.5, 1.0]], requires_grad=True)
    quantized, _, loss = vq(x)
    (quantized.square().sum() + loss.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    embed = dict(vq.named_parameters())["_codebook.embed"]  # the same name in both packages
    assert embed.grad is None, f"the codebook got a gradient: {embed.grad}"


def test_grouped_residual_input_gradient_through_a_tiny_residual_is_within_rounding():
    """Found by the layer properties (long profile): a GroupedResidualVQ step whose second-stage residual
    is tiny (|r| = 0.0044 against codes of norm 0.14). The rotation trick's gradient then depends on r's
    direction, which fp32 knows only to ulp(x) / |r| (r = x - code rounds to the ulp of x), so the
    fp32 gradients of both packages are determined only to that bound: 1.32.0's is 1.7e-6 off the
    float64 answer, fastvq's 1.2e-5 (its residual rounds the other way), 1.4e-5 apart, just over the
    parity tolerance. Both must lie within the bound of the float64 answer (1.32.0 run in float64; the
    same formulas, which agree to 1e-15 on the same residuals)."""
    case = LayerCase(
        "GroupedResidualVQ",
        dict(
            dim=4,
            groups=2,
            num_quantizers=2,
            codebook_size=17,
            decay=0.8,
            use_cosine_sim=False,
            shared_codebook=False,
            quant_grad_frac=0.0,
        ),
        (2, 2, 4),
        {},
        seed=199,
    )
    anchor, ours = make_layers(case, "torch")
    (x,) = case.inputs(1)
    exact = copy.deepcopy(anchor).double()
    want, indices = train_step(exact, x.double())[3], train_step(copy.deepcopy(anchor), x)[1]
    codes = anchor.codebooks.detach().double()  # (groups, stages, K, D / groups)
    first_codes = torch.stack([codes[g, 0][indices[g, ..., 0]] for g in range(case.kwargs["groups"])])
    residual = torch.stack(x.double().chunk(case.kwargs["groups"], dim=-1)) - first_codes
    bound = torch.finfo(torch.float32).eps * x.abs().max().item() / residual.norm(dim=-1).min().item()
    assert 1e-5 < bound < 1e-4, f"the case no longer has a tiny residual (bound {bound:.2g})"
    for name, layer in (("1.32.0", anchor), ("fastvq", ours)):
        got = train_step(layer, x)[3].double()
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error < bound, f"{name}: input gradient {error:.2g} off the float64 answer (bound {bound:.2g})"
