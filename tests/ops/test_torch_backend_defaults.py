"""The torch backend's keyword defaults (`fastvq.ops.chunked`, `fastvq.ops.chunked_soft`) are the oracle's
(`fastvq.ops.naive`): metric "l2", precision "ieee", k None, mask None, both gradients. A call that
leaves them out gives the same bits as one that spells them out."""

import torch

from fastvq.ops import chunked, chunked_soft

L2_IEEE = {"metric": "l2", "precision": "ieee"}


def _inputs():
    torch.manual_seed(0)
    x, codebook = torch.randn(2, 9, 3), torch.randn(2, 6, 3)
    return x, codebook, torch.randint(0, 6, (2, 9))


def _assert_same(got, want):
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_search_and_cross_entropy_defaults():
    x, codebook, indices = _inputs()
    _assert_same(chunked.nearest_code(x, codebook), chunked.nearest_code(x, codebook, **L2_IEEE))
    _assert_same(chunked.topk_codes(x, codebook, 3), chunked.topk_codes(x, codebook, 3, **L2_IEEE))
    _assert_same(
        chunked.sample_code(x, codebook, temperature=0.5, seed=3),
        chunked.sample_code(x, codebook, temperature=0.5, seed=3, k=None, **L2_IEEE),
    )
    _assert_same(chunked.code_stats(x, indices, 6), chunked.code_stats(x, indices, 6, mask=None))
    loss, lse = chunked.code_cross_entropy(x, codebook, indices)
    _assert_same((loss, lse), chunked.code_cross_entropy(x, codebook, indices, **L2_IEEE))
    grad = torch.randn(2, 9)
    for wrt in ("x", "codebook"):
        _assert_same(
            chunked.code_cross_entropy_grad(x, codebook, indices, lse, grad, wrt),
            chunked.code_cross_entropy_grad(x, codebook, indices, lse, grad, wrt, **L2_IEEE),
        )


def test_soft_op_defaults():
    x, codebook, _ = _inputs()
    entropy_options = {"temperature": 0.5, "log_clamp_min": None}
    forward = chunked_soft.code_entropy(x, codebook, None, **entropy_options)
    _assert_same(forward, chunked_soft.code_entropy(x, codebook, None, **entropy_options, **L2_IEEE))
    entropy, _, norm, kept_mass = forward
    grads = (torch.randn(2, 9), torch.randn(2, 6))
    _assert_same(
        chunked_soft.code_entropy_grad(x, codebook, None, norm, entropy, kept_mass, *grads, **entropy_options),
        chunked_soft.code_entropy_grad(
            x,
            codebook,
            None,
            norm,
            entropy,
            kept_mass,
            *grads,
            **entropy_options,
            **L2_IEEE,
            x_grad=True,
            codebook_grad=True,
        ),
    )
    indices, norm, values = chunked_soft.soft_quantize(x, codebook, temperature=0.5)
    _assert_same((indices, norm, values), chunked_soft.soft_quantize(x, codebook, temperature=0.5, **L2_IEEE))
    grad = torch.randn(2, 9, 3)
    _assert_same(
        chunked_soft.soft_quantize_grad(x, codebook, indices, norm, values, grad, hard=True, temperature=0.5),
        chunked_soft.soft_quantize_grad(
            x,
            codebook,
            indices,
            norm,
            values,
            grad,
            hard=True,
            temperature=0.5,
            **L2_IEEE,
            x_grad=True,
            codebook_grad=True,
        ),
    )
