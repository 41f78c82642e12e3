"""CodeHead (an output layer over codes on the fused dot-metric ops) and CodePrior (a GPT over code
grids): against nn.Linear + F.cross_entropy, the key/value cache against full recomputation,
training, sampling, and the (B, L, K) logits never built."""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases
from vq_checks import LargestTensor

from fastvq.models import CodePrior
from fastvq.nn import CodeHead


def dense_logits(head: CodeHead, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, head.weight, head.bias)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("bias", [True, False])
def test_head_loss_and_gradients_match_linear_cross_entropy(device, backend, bias):
    head = CodeHead(19, 301, bias=bias, backend=backend).to(device)
    hidden = torch.randn(3, 13, 19, device=device, requires_grad=True)
    targets = torch.randint(0, 301, (3, 13), device=device)
    targets[0, 0] = -1
    want = F.cross_entropy(
        dense_logits(head, hidden).flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none"
    ).view(3, 13)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    want_grads = torch.autograd.grad(want.sum(), params)
    got = head.loss(hidden, targets)
    got_grads = torch.autograd.grad(got.sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_head_sampling_rules():
    head = CodeHead(8, 50)
    hidden = torch.randn(400, 8) * 3
    logits = dense_logits(head, hidden)
    assert torch.equal(head.sample(hidden, temperature=0.0), logits.argmax(-1))
    draw = head.sample(hidden, temperature=1.0, seed=3)
    assert torch.equal(draw, head.sample(hidden, temperature=1.0, seed=3))
    assert (draw != logits.argmax(-1)).any() and draw.min() >= 0
    top3 = logits.topk(3, dim=-1).indices
    picked = head.sample(hidden, temperature=5.0, top_k=3, seed=1)
    assert (picked[:, None] == top3).any(-1).all(), "top-k sampling left the k most likely codes"
    assert (picked != top3[:, 0]).any(), "top-k sampling never left the argmax"
    with pytest.raises(ValueError, match="last dim of 8"):
        head.sample(torch.randn(4, 7))


def _prior(**kwargs):
    torch.manual_seed(0)
    return CodePrior(
        num_codes=kwargs.pop("num_codes", 32),
        grid=kwargs.pop("grid", (3, 4)),
        dim=32,
        depth=2,
        heads=4,
        backend="torch",
        **kwargs,
    )


def test_prior_loss_is_the_dense_cross_entropy():
    prior = _prior()
    codes = torch.randint(0, 32, (5, 3, 4))
    hidden = prior.hidden_states(codes)
    want = F.cross_entropy(dense_logits(prior.head, hidden).flatten(0, 1), codes.flatten())
    torch.testing.assert_close(prior(codes), want, rtol=1e-5, atol=1e-6)


def test_cached_sampling_equals_full_recomputation():
    """At temperature 0 every sampled code is the argmax of the teacher-forced logits of the sampled
    prefix: the key/value cache gives the same states as recomputing the whole sequence."""
    prior = _prior(num_classes=3).eval()
    labels = torch.tensor([0, 2, 1, 2])
    codes = prior.sample(4, labels=labels, temperature=0.0)
    assert codes.shape == (4, 3, 4) and codes.dtype == torch.int64
    logits = dense_logits(prior.head, prior.hidden_states(codes, labels))
    assert torch.equal(logits.argmax(-1), codes.flatten(1))


def test_sampling_is_seeded_and_labels_condition():
    prior = _prior(num_classes=2).eval()
    a = prior.sample(6, labels=torch.zeros(6, dtype=torch.long), seed=5, top_k=4)
    assert torch.equal(a, prior.sample(6, labels=torch.zeros(6, dtype=torch.long), seed=5, top_k=4))
    b = prior.sample(6, labels=torch.ones(6, dtype=torch.long), seed=5, top_k=4)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        prior.sample(2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=2\)"):
        prior(torch.zeros(2, 3, 4, dtype=torch.long), torch.tensor([0, 2]))


def test_training_learns_the_sequences():
    prior = _prior(num_codes=16, grid=6)
    data = torch.randint(0, 16, (4, 6))
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    first = prior(data).item()
    for _ in range(150):
        loss = prior(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    prior.eval()
    greedy = prior.sample(64, temperature=0.0)
    assert (greedy == data[:, None, :]).all(-1).any(), "greedy decoding reproduces none of the 4 sequences"


def test_codebook_initialises_the_head():
    codebook = torch.randn(32, 5)
    prior = _prior(codebook=codebook)
    assert torch.equal(prior.head.weight.detach(), codebook) and prior.to_head.out_features == 5
    assert prior(torch.randint(0, 32, (2, 3, 4))).isfinite()
    with pytest.raises(ValueError, match=r"codebook must have shape \(num_codes=32, D\)"):
        _prior(codebook=torch.randn(31, 5))


def test_bad_input_raises_clear_errors():
    prior = _prior()
    with pytest.raises(ValueError, match=r"codes must be an integer tensor of shape \(B, 3, 4\)"):
        prior(torch.zeros(2, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must be in \[0, num_codes=32\)"):
        prior(torch.full((1, 3, 4), 32))
    with pytest.raises(ValueError, match="labels given to a prior without classes"):
        prior(torch.zeros(1, 3, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="dim must be a multiple of heads"):
        CodePrior(8, 4, dim=30, heads=4)


def test_training_and_sampling_build_no_logits_tensor():
    """With K = 8192 codes and B x L = 256 positions, no tensor reaches B x L x K / 4 elements in
    the loss, its backward or sampling (the plain head holds B x L x K logits and as many gradients)."""
    prior = _prior(num_codes=8192, grid=(8, 8))
    codes = torch.randint(0, 8192, (4, 8, 8))
    with LargestTensor() as record:
        prior(codes).backward()
        prior.eval().sample(4, top_k=8, seed=0)
        prior.sample(4, seed=1)
    assert 0 < record.largest < 4 * 64 * 8192 // 4, record.largest
