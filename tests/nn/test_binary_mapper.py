"""fastvq.BinaryMapper against vector-quantize-pytorch 1.32.0 (the anchor): training steps by the
protocol of scalar_checks (same seed, same sampled codes; outputs, aux loss and input gradient within
1e-5), eval bit-identical, log_prob, fp16/bf16 logits against 1.32.0 on their fp32 values, and the
argument errors."""

import pytest
import torch
from scalar_checks import compare_eval, compare_steps
from test_layer_parity import close

from fastvq import BinaryMapper

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

CONFIGS = {  # constructor arguments, logits shape, forward arguments
    "one-bit": (dict(), (2, 7, 1), dict()),
    "3-bits-indices": (dict(bits=3), (2, 5, 3), dict(return_indices=True)),
    "5-bits-hot-unreduced": (dict(bits=5), (3, 2, 4, 5), dict(temperature=0.7, reduce_aux_kl_loss=False)),
    "7-bits-threshold": (dict(bits=7, kl_loss_threshold=0.3), (11, 7), dict(return_indices=True)),
    "6-bits-deterministic": (dict(bits=6), (3, 9, 6), dict(deterministic=True, return_indices=True)),
    "4-bits-no-straight-through": (dict(bits=4), (2, 3, 4), dict(straight_through=False, calc_aux_loss=True)),
}


def logits_batches(shape, steps=3, scale=2.0):
    return [torch.randn(shape) * scale for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_match_anchor(config):
    kwargs, shape, forward_kwargs = CONFIGS[config]
    anchor, ours = anchor_module.BinaryMapper(**kwargs), BinaryMapper(**kwargs)
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    compare_steps(anchor, ours, logits_batches(shape), **forward_kwargs)


@pytest.mark.parametrize("deterministic_on_eval", [False, True])
def test_eval_matches_anchor(deterministic_on_eval):
    """Eval: no straight-through and no aux loss by default; sampled at a fixed seed unless
    deterministic_on_eval (then the most probable bits)."""
    anchor = anchor_module.BinaryMapper(bits=5, deterministic_on_eval=deterministic_on_eval)
    ours = BinaryMapper(bits=5, deterministic_on_eval=deterministic_on_eval)
    logits = torch.randn(4, 9, 5)
    if deterministic_on_eval:
        compare_eval(anchor, ours, logits, return_indices=True)
    anchor.eval()
    ours.eval()
    torch.manual_seed(3)
    expected = anchor(logits, return_indices=True)
    torch.manual_seed(3)
    actual = ours(logits, return_indices=True)
    for a, e, name in zip(actual, expected, ("one_hot", "indices", "aux_kl_loss")):
        assert a.dtype == e.dtype and torch.equal(a, e), f"eval {name} differs"
    torch.manual_seed(5)
    first = ours(logits, return_indices=True)[1]
    torch.manual_seed(6)
    second = ours(logits, return_indices=True)[1]
    assert torch.equal(first, second) == deterministic_on_eval
    if deterministic_on_eval:
        expected_bits = logits > 0
        assert torch.equal(ours.indices_to_bits(first), expected_bits)


def test_straight_through_gradient_is_the_code_distribution():
    """The one-hot's gradient is that of G[c] = prod_b P(bit_b = c_b), computed in float64 here
    over all 2^bits codes: for a weight w per code, d(sum w G)/d logit."""
    ours = BinaryMapper(bits=6)
    logits = (torch.randn(13, 6, dtype=torch.float64) * 3).requires_grad_()
    weights = torch.randn(13, 64, dtype=torch.float64)
    bits = ours.codes.double()
    prob = logits.sigmoid()
    expected_soft = (prob[:, None, :] * bits + (1 - prob[:, None, :]) * (1 - bits)).prod(-1)
    (expected_soft * weights).sum().backward()
    x = logits.detach().float().requires_grad_()
    one_hot, _ = ours(x, calc_aux_loss=False)
    (one_hot * weights.float()).sum().backward()
    close(x.grad.double(), logits.grad, "input gradient")
    hard = one_hot.detach().round()
    assert torch.equal(hard.sum(-1), torch.ones(13)) and (one_hot.detach() - hard).abs().max() < 1e-6


def test_log_prob_and_codes_match_anchor():
    anchor, ours = anchor_module.BinaryMapper(bits=5), BinaryMapper(bits=5)
    assert torch.equal(ours.codes, anchor.codes)
    logits = torch.randn(2, 3, 7, 5)
    one_hot, indices, _ = ours(logits, return_indices=True)
    for sum_bits in (True, False):
        expected = anchor.log_prob(logits, indices=indices, sum_bits=sum_bits)
        close(ours.log_prob(logits, indices=indices, sum_bits=sum_bits), expected, f"log_prob sum_bits={sum_bits}")
        close(ours.log_prob(logits, one_hot=one_hot, sum_bits=sum_bits), expected, f"one-hot sum_bits={sum_bits}")
    close(ours.calc_aux_loss(logits, reduce_aux_kl_loss=False), anchor.calc_aux_loss(logits, False), "aux")
    close(ours.binary_entropy(logits), anchor.binary_entropy(logits), "entropy")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_match_anchor_on_their_fp32_values(dtype):
    """fastvq runs the probabilities in fp32: 16-bit logits give 1.32.0's results on their fp32
    values (same draws, same codes), the aux loss in the logits' dtype and the gradient in it."""
    logits = (torch.randn(3, 11, 6) * 2).to(dtype)
    anchor, ours = anchor_module.BinaryMapper(bits=6), BinaryMapper(bits=6)
    x, x32 = logits.clone().requires_grad_(), logits.float().requires_grad_()
    torch.manual_seed(0)
    one_hot, indices, loss = ours(x, return_indices=True)
    torch.manual_seed(0)
    expected_one_hot, expected_indices, expected_loss = anchor(x32, return_indices=True)
    assert torch.equal(indices, expected_indices) and one_hot.dtype == torch.float32
    close(one_hot, expected_one_hot, "one_hot")
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.float(), expected_loss, atol=1e-2, rtol=1e-2)
    weights = torch.randn_like(one_hot)
    ((one_hot * weights).sum() + loss).backward()
    ((expected_one_hot * weights).sum() + expected_loss).backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=1e-2, rtol=1e-2)


def test_inputs_are_not_modified_and_state_is_empty():
    ours = BinaryMapper(bits=4)
    logits = torch.randn(5, 4)
    kept = logits.clone()
    ours(logits, return_indices=True)
    ours.log_prob(logits, indices=torch.arange(5))
    assert torch.equal(logits, kept)
    assert ours.state_dict() == {}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: BinaryMapper(bits=0), ValueError, r"bits must be an int in \[1, 62\]"),
        (lambda: BinaryMapper(bits=2.0), ValueError, r"bits must be an int in \[1, 62\]"),
        (lambda: BinaryMapper(kl_loss_threshold=-1.0), ValueError, "kl_loss_threshold must be a number >= 0"),
        (lambda: BinaryMapper(bits=3)(torch.randn(2, 4)), ValueError, "last dimension of bits=3"),
        (lambda: BinaryMapper(bits=3)(torch.zeros(2, 3, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: BinaryMapper(bits=2)(torch.tensor([[0.0, float("nan")]])), ValueError, "logits must be finite"),
        (lambda: BinaryMapper(bits=2)(torch.randn(3, 2), temperature=0.0), ValueError, "temperature must be"),
        (lambda: BinaryMapper(bits=2).log_prob(torch.randn(3, 2)), ValueError, "exactly one of indices"),
        (
            lambda: BinaryMapper(bits=2).log_prob(torch.randn(3, 2), indices=torch.tensor([0, 4, 1])),
            ValueError,
            r"indices must be in \[0, num_codes=4\)",
        ),
        (
            lambda: BinaryMapper(bits=2).log_prob(torch.randn(3, 2), indices=torch.zeros(2, dtype=torch.long)),
            ValueError,
            r"shape \(3,\)",
        ),
    ],
)
def test_bad_arguments_raise_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()
