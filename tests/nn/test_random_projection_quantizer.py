"""fastvq.RandomProjectionQuantizer against vector-quantize-pytorch 1.32.0 (the anchor): the same
state gives bit-identical target indices; the cross-entropy against targets and its gradients
(input and the VectorQuantize's learnable projection) match within 1e-5 over several SGD steps."""

import pytest
import torch
from test_layer_parity import close, compare_state

from fastvq.nn.random_projection_quantizer import RandomProjectionQuantizer

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

DIM, CODES, BATCH, SEQ = 16, 24, 2, 10

CONFIGS = {
    "two-codebooks": dict(codebook_dim=4, num_codebooks=2),
    "one-codebook": dict(codebook_dim=6),
    "no-norm": dict(codebook_dim=3, num_codebooks=3, norm=False),
    "vq-kwargs": dict(codebook_dim=4, num_codebooks=2, decay=0.5, commitment_weight=0.3),
}


def make_pair(backend="torch", **kwargs):
    anchor = anchor_module.RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, **kwargs)
    ours = RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, backend=backend, **kwargs)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


def cross_entropy_step(module, x, targets, lr=0.05):
    """Cross-entropy of x against targets, its backward, an SGD step; -> (loss, x.grad, parameter grads)."""
    x = x.clone().requires_grad_()
    loss = module(x, indices=targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    return loss.detach(), x.grad, grads


@pytest.mark.parametrize("config", CONFIGS)
def test_indices_and_cross_entropy_match_anchor(config):
    anchor, ours = make_pair(**CONFIGS[config])
    for step in range(3):
        x = torch.randn(BATCH, SEQ, DIM) * 1.5
        with torch.no_grad():
            expected = anchor(x)
            assert torch.equal(ours(x), expected), f"step {step}: target indices differ"
        targets = torch.randint(0, CODES, expected.shape)
        targets[0, 0] = -1  # ignored
        a, b = cross_entropy_step(anchor, x, targets), cross_entropy_step(ours, x, targets)
        close(b[0], a[0], f"step {step} cross-entropy")
        close(b[1], a[1], f"step {step} input grad")
        assert a[2].keys() == b[2].keys()
        for name in a[2]:
            close(b[2][name], a[2][name], f"step {step} grad of {name}")
        compare_state(anchor, ours, f"after step {step}")
        ours.load_state_dict(anchor.state_dict())


def test_same_seed_draws_the_same_projections_and_the_quantizer_never_trains():
    torch.manual_seed(7)
    anchor = anchor_module.RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, codebook_dim=4, num_codebooks=2)
    torch.manual_seed(7)
    ours = RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, codebook_dim=4, num_codebooks=2)
    assert torch.equal(ours.rand_projs, anchor.rand_projs) and "rand_projs" not in dict(ours.named_parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in anchor.state_dict().items()}
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.train()
    indices = ours(torch.randn(BATCH, SEQ, DIM))
    assert indices.shape == (BATCH, SEQ, 2) and indices.dtype == torch.int64 and not ours.vq.training
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed: the codebooks must stay random"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_input_gives_the_indices_of_its_fp32_values(dtype):
    """1.32.0 fails on 16-bit input (einsum with the fp32 projections); fastvq projects in fp32."""
    rpq = RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, codebook_dim=4, num_codebooks=2, backend="torch")
    x = torch.randn(BATCH, SEQ, DIM).to(dtype)
    assert torch.equal(rpq(x), rpq(x.float()))
    assert rpq(x, indices=rpq(x)).dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="codebook_dim must be an int >= 1, got None"):
        RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, codebook_dim=None)
    rpq = RandomProjectionQuantizer(dim=DIM, codebook_size=CODES, codebook_dim=4)
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor \(B, N, dim=16\)"):
        rpq(torch.randn(BATCH, DIM))
