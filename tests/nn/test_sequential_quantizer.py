"""fastvq.Sequential against vector-quantize-pytorch 1.32.0's (the anchor): modules around exactly one
quantizer, the quantizer's extra outputs returned after the last module's output; same state_dict keys,
the same outputs and gradients for the same state."""

import pytest
import torch
from torch import nn

import fastvq
from fastvq.nn.sequential import Sequential, is_quantizer
from fastvq.nn.sim_vq import SimVQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

DIM, CODES = 8, 16


def test_outputs_gradients_and_state_match_anchor():
    """Linear -> SimVQ -> Linear: out, indices and loss as the anchor's for the same state, eval and training."""
    torch.manual_seed(0)
    anchor = anchor_module.Sequential(
        nn.Linear(5, DIM), anchor_module.SimVQ(dim=DIM, codebook_size=CODES), nn.Linear(DIM, 3)
    )
    ours = Sequential(nn.Linear(5, DIM), SimVQ(dim=DIM, codebook_size=CODES, backend="torch"), nn.Linear(DIM, 3))
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    ours.load_state_dict(anchor.state_dict())
    x = torch.randn(2, 7, 5)
    for train in (False, True):
        anchor.train(train), ours.train(train)
        xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, actual = anchor(xa), ours(xo)
        assert len(actual) == len(expected) == 3
        torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-5)
        assert torch.equal(actual[1], expected[1])
        torch.testing.assert_close(actual[2], expected[2], rtol=0, atol=1e-6)
        (expected[0].square().sum() + expected[2]).backward()
        (actual[0].square().sum() + actual[2]).backward()
        torch.testing.assert_close(xo.grad, xa.grad, rtol=0, atol=1e-5)
        for (name, pa), po in zip(anchor.named_parameters(), ours.parameters()):
            torch.testing.assert_close(po.grad, pa.grad, rtol=0, atol=1e-5, msg=name)


def test_keyword_arguments_reach_the_quantizer():
    """forward(x, **kwargs) passes kwargs to the quantizer only (here VectorQuantize's mask)."""
    vq = fastvq.VectorQuantize(dim=DIM, codebook_size=CODES, backend="torch")
    seq = Sequential(nn.Identity(), vq).eval()
    x, mask = torch.randn(2, 6, DIM), torch.rand(2, 6) > 0.5
    out, indices, loss = seq(x, mask=mask)
    expected = vq(x, mask=mask)
    assert torch.equal(out, expected[0]) and torch.equal(indices, expected[1]) and torch.equal(loss, expected[2])


def test_anchor_quantizers_and_subclasses_count_as_quantizers():
    class MySimVQ(SimVQ):
        pass

    assert is_quantizer(anchor_module.SimVQ(dim=DIM, codebook_size=CODES))
    assert is_quantizer(MySimVQ(dim=DIM, codebook_size=CODES))
    assert not is_quantizer(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "fns,error,match",
    [
        ((nn.Linear(2, 2),), ValueError, "exactly one quantizer .* got 0"),
        ((SimVQ(dim=DIM, codebook_size=CODES), SimVQ(dim=DIM, codebook_size=CODES)), ValueError, "got 2"),
        ((lambda x: x, SimVQ(dim=DIM, codebook_size=CODES)), TypeError, "nn.Module arguments"),
    ],
)
def test_bad_arguments_raise_clear_errors(fns, error, match):
    with pytest.raises(error, match=match):
        Sequential(*fns)
