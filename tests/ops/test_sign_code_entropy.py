"""fastvq.sign_code_entropy: the exact per-token entropy over the 2^d sign codes {-s, +s}^d in O(N d),
against the dense float64 oracle (fastvq.ops.naive.code_entropy over the materialised codebook),
value and gradient, on odd d, scales and temperatures, 16-bit inputs and extreme logits."""

import pytest
import torch

import fastvq
from fastvq.ops import naive


def sign_codebook(d: int, scale: float) -> torch.Tensor:
    """(2^d, d) float64: every code in {-scale, +scale}^d."""
    bits = (torch.arange(2**d)[:, None] >> torch.arange(d - 1, -1, -1)) & 1
    return (bits * 2 - 1).double() * scale


def oracle(x: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """The exact entropy (N,) float64 of softmax(x . c / T) over the dense codebook."""
    entropy, _ = naive.code_entropy(
        x.double()[None], sign_codebook(x.shape[-1], scale)[None], temperature=temperature, metric="dot"
    )
    return entropy[0]


@pytest.mark.parametrize("d", [1, 5, 7, 10])
@pytest.mark.parametrize("scale,temperature", [(1.0, 1.0), (1.0, 0.005), (0.37, 0.2), (2.5, 3.0)])
def test_value_and_gradient_match_the_dense_oracle(d, scale, temperature):
    torch.manual_seed(d)
    x = torch.randn(37, d) * 0.1
    x[0] = 0  # every code equally likely: d log 2
    x[1] = 50  # one code: entropy 0 (no NaN from 0 log 0)
    x64 = x.double().requires_grad_()
    expected = oracle(x64, scale, temperature)
    x32 = x.clone().requires_grad_()
    entropy = fastvq.sign_code_entropy(x32, scale=scale, temperature=temperature)
    assert entropy.dtype == torch.float32 and entropy.shape == (37,)
    torch.testing.assert_close(entropy.double(), expected, rtol=1e-5, atol=1e-6)
    assert abs(entropy[0].item() - d * torch.log(torch.tensor(2.0)).item()) < 1e-5
    weights = torch.linspace(-1, 2, 37)
    (grad,) = torch.autograd.grad((entropy * weights).sum(), x32)
    (expected_grad,) = torch.autograd.grad((expected * weights.double()).sum(), x64)
    assert grad.isfinite().all()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_leading_dims(dtype):
    """Any float dtype, any leading dims, any strides: fp32 result (fp64 for fp64) of the input's values."""
    wide = torch.randn(3, 11, 12, dtype=dtype) * 0.3
    x = wide[..., ::2]  # non-contiguous (3, 11, 6)
    entropy = fastvq.sign_code_entropy(x, scale=1.0, temperature=0.5)
    assert entropy.shape == (3, 11)
    assert entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = oracle(x.reshape(-1, 6), 1.0, 0.5).reshape(3, 11)
    torch.testing.assert_close(entropy.double(), expected, rtol=1e-5, atol=1e-6)


def test_nan_token_gives_nan_and_input_is_not_modified():
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    before = x.clone()
    entropy = fastvq.sign_code_entropy(x)
    assert entropy[2].isnan() and entropy[[0, 1, 3]].isfinite().all()
    assert torch.equal(x.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.zeros(3, dtype=torch.long)), TypeError, "x must be a floating tensor"),
        (dict(x=torch.tensor(1.0)), ValueError, r"x must have a trailing code dimension"),
        (dict(scale=0.0), ValueError, "scale must be a finite float > 0, got 0.0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite float > 0"),
    ],
    ids=lambda v: None,
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(x=torch.randn(2, 3), scale=1.0, temperature=1.0) | kwargs
    x = args.pop("x")
    with pytest.raises(error, match=match):
        fastvq.sign_code_entropy(x, **args)


@pytest.mark.parametrize("d", [1, 4, 7, 10])
@pytest.mark.parametrize("log_clamp_min", [None, 1e-5, 0.3])
@pytest.mark.parametrize("spread", [0.02, 0.3, 3.0])
def test_distribution_matches_the_dense_oracle(d, log_clamp_min, spread):
    """sign_code_distribution = naive.code_entropy over the materialised sign codebook (dot metric):
    per-token entropy (exact or clamped) and the mean over tokens, values and gradients, two heads."""
    torch.manual_seed(d)
    scale, temperature = 0.7, 0.1
    x = torch.randn(2, 23, d) * spread
    x64 = x.double().requires_grad_()
    codebook = sign_codebook(d, scale)[None].expand(2, -1, -1)
    expected, expected_mean = naive.code_entropy(
        x64, codebook, temperature=temperature, metric="dot", log_clamp_min=log_clamp_min
    )
    x32 = x.clone().requires_grad_()
    entropy, mean_probs = fastvq.sign_code_distribution(
        x32, scale=scale, temperature=temperature, log_clamp_min=log_clamp_min
    )
    assert entropy.shape == (2, 23) and mean_probs.shape == (2, 2**d) and mean_probs.dtype == torch.float32
    torch.testing.assert_close(entropy.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_probs.double(), expected_mean, rtol=1e-5, atol=1e-7)
    w, v = torch.randn(2, 23), torch.randn(2, 2**d)
    (grad,) = torch.autograd.grad((entropy * w).sum() + (mean_probs * v).sum(), x32)
    (expected_grad,) = torch.autograd.grad((expected * w.double()).sum() + (expected_mean * v.double()).sum(), x64)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item())


def test_distribution_of_one_token_set_and_bad_arguments():
    """(N, d) gives (N,) and (K,); no token gives a NaN mean; a bad log_clamp_min is named."""
    entropy, mean_probs = fastvq.sign_code_distribution(torch.randn(5, 3))
    assert entropy.shape == (5,) and mean_probs.shape == (8,)
    torch.testing.assert_close(mean_probs.sum(), torch.tensor(1.0))
    _, empty_mean = fastvq.sign_code_distribution(torch.randn(0, 3))
    assert empty_mean.isnan().all()
    with pytest.raises(ValueError, match=r"log_clamp_min must be None or a float in \(0, 1\), got 1.5"):
        fastvq.sign_code_distribution(torch.randn(5, 3), log_clamp_min=1.5)
    with pytest.raises(ValueError, match=r"x must be \(N, d\) or \(H, N, d\)"):
        fastvq.sign_code_distribution(torch.randn(5))
