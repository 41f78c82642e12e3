"""fastvq.nn.TokenQuantizer, the token-level core, against dense float64 oracles: quantize (nearest,
top-k, sampled; whole tokens, masks) over shared and per-head codebooks, decoding, cross-entropy,
usage statistics and the EMA step of `Codebook`; a learned codebook and a computed one (a frozen
codebook through a learned map) built on the public API only."""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases, case

from fastvq.nn import Codebook, LearnedCodebook, TokenQuantizer, VectorQuantize
from fastvq.nn.token_quantizer import finite_rows

N, K, D = 37, 19, 5


def dense_distances(tokens: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """(H, N, K) float64 distances of tokens (H, N, D) to codes (C, K, D), C = 1 or H."""
    x, c = tokens.double(), codes.double().expand(tokens.shape[0], -1, -1)
    if metric == "l2":
        return (x.unsqueeze(2) - c.unsqueeze(1)).pow(2).sum(-1)
    if metric == "dot":
        return -(x @ c.transpose(1, 2))
    return 1 - F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).transpose(1, 2)


def integer_quantizer(metric="l2", num_codebooks=1, cls=LearnedCodebook, **kwargs):
    """A quantizer with small integer codes: distances are exact in every dtype and ties are common."""
    quantizer = cls(D, K, num_codebooks, metric=metric, backend="torch", **kwargs)
    with torch.no_grad():
        quantizer.codes.copy_(torch.randint(-3, 4, quantizer.codes.shape).float())
    return quantizer


def integer_tokens(heads, dtype=torch.float32, n=N):
    return torch.randint(-3, 4, (heads, n, D)).to(dtype)


@pytest.mark.parametrize(
    "heads,num_codebooks,dtype,metric",
    [
        case(H=1, C=1, dtype=torch.float32, metric="l2"),
        case(H=3, C=1, dtype=torch.bfloat16, metric="l2"),
        case(H=3, C=3, dtype=torch.float16, metric="l2"),
        case(H=2, C=2, dtype=torch.float32, metric="dot"),
        case(H=3, C=1, dtype=torch.float32, metric="dot"),
    ],
)
def test_nearest_codes_equal_the_dense_oracle_with_ties_to_the_lowest_index(heads, num_codebooks, dtype, metric):
    torch.manual_seed(0)
    quantizer = integer_quantizer(metric, num_codebooks)
    tokens = integer_tokens(heads, dtype)
    found = quantizer.quantize(tokens)
    distances = dense_distances(tokens, quantizer.codes, metric)
    want = distances.argmin(-1)  # the first minimum
    assert (distances == distances.min(-1, keepdim=True).values).sum(-1).max() > 1, "no tie was tested"
    assert torch.equal(found.indices, want)
    torch.testing.assert_close(found.distances.double(), distances.gather(-1, want.unsqueeze(-1))[..., 0])
    assert found.codes.dtype == torch.float32
    assert torch.equal(found.codes, quantizer.codes_from_indices(found.indices))


def test_cosine_codes_equal_the_dense_oracle_where_the_gap_allows():
    torch.manual_seed(1)
    quantizer = LearnedCodebook(D, K, 2, metric="cosine", backend="torch")
    tokens = torch.randn(2, 301, D)
    found = quantizer.quantize(tokens)
    distances = dense_distances(tokens, quantizer.codes, "cosine")
    best2 = distances.topk(2, dim=-1, largest=False).values
    clear = best2[..., 1] - best2[..., 0] > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(found.indices[clear], distances.argmin(-1)[clear])
    chosen = distances.gather(-1, found.indices.unsqueeze(-1))[..., 0]
    assert (chosen - best2[..., 0]).max() < 1e-5
    torch.testing.assert_close(found.distances.double(), chosen, rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads,num_codebooks", [(1, 1), (2, 1), (2, 2)])
def test_topk_codes_are_the_dense_oracle_order(heads, num_codebooks):
    torch.manual_seed(2)
    quantizer = integer_quantizer("l2", num_codebooks)
    tokens = integer_tokens(heads)
    found = quantizer.quantize(tokens, topk=4)
    distances = dense_distances(tokens, quantizer.codes, "l2")
    want = distances.sort(dim=-1, stable=True).indices[..., :4]
    assert found.indices.shape == found.distances.shape == (heads, N, 4)
    assert torch.equal(found.indices, want)
    assert torch.equal(found.distances.double(), distances.gather(-1, want))
    assert torch.equal(found.codes, quantizer.codes_from_indices(found.indices))


def test_sampled_codes_follow_the_temperature_and_torch_seed():
    torch.manual_seed(3)
    quantizer = LearnedCodebook(D, K, backend="torch")
    tokens = torch.randn(1, 400, D)
    nearest = quantizer.quantize(tokens).indices
    cold = quantizer.quantize(tokens, temperature=1e-6)
    assert torch.equal(cold.indices, nearest) and cold.distances is None
    torch.manual_seed(4)
    hot = quantizer.quantize(tokens, temperature=100.0).indices
    torch.manual_seed(4)
    assert torch.equal(quantizer.quantize(tokens, temperature=100.0).indices, hot)
    assert (hot != nearest).float().mean() > 0.5 and hot.min() >= 0
    drawn = quantizer.quantize(tokens, topk=3, temperature=100.0).indices
    assert drawn.shape == (1, 400, 3) and (drawn.sort(-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_a_token_bad_in_one_head_or_masked_gets_no_code_and_passes_through(device, backend, num_codebooks):
    torch.manual_seed(5)
    quantizer = LearnedCodebook(D, K, num_codebooks, backend=backend).to(device)
    tokens = torch.randn(2, 9, D, device=device)
    tokens[1, 3, 2] = float("nan")
    tokens[0, 4, 0] = float("inf")
    mask = torch.ones(9, dtype=torch.bool, device=device)
    mask[6] = False
    found = quantizer.quantize(tokens, mask)
    missing = torch.zeros(9, dtype=torch.bool, device=device)
    missing[[3, 4, 6]] = True
    assert (found.indices[:, missing] == -1).all() and (found.indices[:, ~missing] >= 0).all()
    assert torch.isnan(found.distances[:, missing]).all() and torch.isfinite(found.distances[:, ~missing]).all()
    torch.testing.assert_close(found.codes[:, missing], tokens[:, missing], equal_nan=True)
    assert torch.equal(found.codes[:, ~missing], quantizer.codes_from_indices(found.indices)[:, ~missing])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_rows_is_isfinite_of_every_value(dtype):
    x = torch.randn(6, 9).to(dtype)
    x[0] = torch.finfo(dtype).max  # large but finite: x * 0 is still 0
    x[1, 3], x[2, 0], x[3, 8] = float("nan"), float("inf"), float("-inf")
    assert finite_rows(x).tolist() == torch.isfinite(x).all(-1).tolist() == [True, False, False, False, True, True]


def test_codes_carry_the_gradient_to_the_codebook_only():
    """d(sum(codes * g))/d weight is the per-code sum of g (a float64 one-hot oracle); tokens get none."""
    torch.manual_seed(6)
    quantizer = LearnedCodebook(D, K, 2, metric="dot", backend="torch")
    tokens = torch.randn(2, N, D, requires_grad=True)
    found = quantizer.quantize(tokens)
    grad = torch.randn_like(found.codes)
    (found.codes * grad).sum().backward()
    one_hot = F.one_hot(found.indices, K).double()  # test-side oracle only
    torch.testing.assert_close(quantizer.weight.grad.double(), one_hot.transpose(1, 2) @ grad.double())
    assert tokens.grad is None


def test_codes_from_indices_decode_minus_one_to_zeros_and_check_the_range():
    quantizer = integer_quantizer("l2", 2)
    indices = torch.tensor([[0, -1, 18], [5, 5, -1]], dtype=torch.int32)
    codes = quantizer.codes_from_indices(indices)
    assert codes.shape == (2, 3, D)
    assert torch.equal(codes[0, 0], quantizer.codes[0, 0]) and torch.equal(codes[1, 1], quantizer.codes[1, 5])
    assert (codes[0, 1] == 0).all() and (codes[1, 2] == 0).all()
    with pytest.raises(ValueError, match=r"indices must be in \[-1, codebook_size=19\)"):
        quantizer.codes_from_indices(indices + 1)
    with pytest.raises(ValueError, match="one head per codebook"):
        quantizer.codes_from_indices(indices[:1])
    with pytest.raises(TypeError, match="integer tensor"):
        quantizer.codes_from_indices(indices.float())


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_cross_entropy_equals_the_dense_log_softmax(metric):
    """Logits as vector-quantize-pytorch 1.32.0: -sqrt(|x - c|^2) (l2), cosine similarity, x.c (dot);
    loss and gradients (tokens and codes) against float64 autograd of the dense formula."""
    torch.manual_seed(7)
    quantizer = LearnedCodebook(D, K, backend="torch", metric=metric)
    tokens = torch.randn(2, N, D, requires_grad=True)
    targets = torch.randint(-1, K, (2, N))
    loss = quantizer.cross_entropy(tokens, targets)
    grad = torch.rand_like(loss)
    (loss * grad).sum().backward()
    x64, c64 = tokens.detach().double().requires_grad_(), quantizer.weight.detach().double().requires_grad_()
    logits = {
        "l2": lambda: -dense_distances(x64, c64, "l2").clamp_min(1e-8).sqrt(),
        "cosine": lambda: 1 - dense_distances(x64, c64, "cosine"),
        "dot": lambda: -dense_distances(x64, c64, "dot"),
    }[metric]()
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none").view(2, N)
    (want * grad.double()).sum().backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(quantizer.weight.grad.double(), c64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads,num_codebooks", [(1, 1), (3, 1), (2, 2)])
def test_statistics_count_codes_of_usable_tokens_and_nonfinite_tokens_once(heads, num_codebooks):
    torch.manual_seed(8)
    quantizer = integer_quantizer("l2", num_codebooks)
    assert torch.isnan(quantizer.health()["usage"])
    tokens = integer_tokens(heads)
    tokens[:, 2] = float("nan")  # every head of token 2: one non-finite token
    tokens[0, 5, 1] = float("inf")  # one head of token 5
    mask = torch.ones(N, dtype=torch.bool)
    mask[[7, 8]] = False
    indices = quantizer.quantize(tokens).indices
    quantizer.update_(tokens, indices, mask)
    keep = mask.clone()
    keep[[2, 5]] = False
    counts = torch.stack([torch.bincount(indices[h, keep], minlength=K) for h in range(heads)]).double()
    if num_codebooks == 1:
        counts = counts.sum(0, keepdim=True)
    probs = counts / counts.sum(-1, keepdim=True)
    health = quantizer.health()
    torch.testing.assert_close(health["usage"].double(), (counts > 0).double().mean())
    perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum(-1)).mean()
    torch.testing.assert_close(health["perplexity"].double(), perplexity, rtol=1e-6, atol=0)  # fp32
    assert int(health["dead_codes"]) == int((counts == 0).sum())
    assert int(health["nonfinite_tokens"]) == 2


@pytest.mark.parametrize("heads,num_codebooks,metric", [(1, 1, "l2"), (3, 1, "l2"), (2, 2, "cosine")])
def test_ema_step_equals_the_dense_formula(heads, num_codebooks, metric):
    """cluster_size and embed_avg move toward the per-code counts and sums at rate 1 - decay; embed
    is embed_avg over the Laplace-smoothed cluster sizes (l2-normalised for cosine)."""
    torch.manual_seed(9)
    decay, eps = 0.7, 1e-3
    codebook = Codebook(D, K, num_codebooks, metric=metric, decay=decay, eps=eps, backend="torch")
    before = {name: getattr(codebook, name).double().clone() for name in ("cluster_size", "embed_avg")}
    tokens = codebook.transform_input(torch.randn(heads, N, D))
    mask = torch.rand(N) > 0.2
    indices = codebook.quantize(tokens).indices
    codebook.update_(tokens, indices, mask)
    one_hot = F.one_hot(indices, K).double() * mask.view(1, N, 1)  # test-side oracle only
    counts, sums = one_hot.sum(1), one_hot.transpose(1, 2) @ tokens.double()
    if num_codebooks == 1:
        counts, sums = counts.sum(0, keepdim=True), sums.sum(0, keepdim=True)
    cluster_size = before["cluster_size"] * decay + counts * (1 - decay)
    embed_avg = before["embed_avg"] * decay + sums * (1 - decay)
    total = cluster_size.sum(-1, keepdim=True)
    embed = embed_avg / ((cluster_size + eps) / (total + K * eps) * total).unsqueeze(-1)
    embed = F.normalize(embed, dim=-1) if metric == "cosine" else embed
    for got, want in ((codebook.cluster_size, cluster_size), (codebook.embed_avg, embed_avg), (codebook.embed, embed)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # fp32 sums


class FrozenCodesThroughALinearMap(TokenQuantizer):
    """Codes computed from a frozen codebook by a learned linear map (SimVQ's form), public API only."""

    def __init__(self, dim, codebook_size):
        super().__init__(dim, codebook_size, backend="torch")
        self.register_buffer("frozen", torch.randn(1, codebook_size, dim))
        self.transform = torch.nn.Linear(dim, dim, bias=False)

    @property
    def codes(self):
        return self.transform(self.frozen)


def test_a_computed_codebook_is_searched_as_computed_and_trains_its_map():
    torch.manual_seed(10)
    quantizer = FrozenCodesThroughALinearMap(D, K)
    tokens = torch.randn(1, N, D)
    found = quantizer.quantize(tokens)
    distances = dense_distances(tokens, quantizer.codes.detach(), "l2")
    assert torch.equal(found.indices, distances.argmin(-1))
    F.mse_loss(found.codes, tokens).backward()
    assert quantizer.transform.weight.grad.abs().sum() > 0
    quantizer.update_(tokens, found.indices)  # no EMA: only statistics
    assert 0 < float(quantizer.health()["usage"]) <= 1


def test_bad_settings_and_inputs_raise_naming_them():
    with pytest.raises(TypeError, match="abstract"):
        TokenQuantizer(D, K)
    with pytest.raises(ValueError, match=r"metric must be one of \('l2', 'cosine', 'dot'\)"):
        LearnedCodebook(D, K, metric="euclid")
    with pytest.raises(ValueError, match="num_codebooks must be an int >= 1"):
        LearnedCodebook(D, K, 0)
    with pytest.raises(ValueError, match="backend"):
        LearnedCodebook(D, K, backend="trition")
    quantizer = LearnedCodebook(D, K, 2)
    with pytest.raises(ValueError, match=r"tokens must be a floating-point tensor \(H, N, D=5\)"):
        quantizer.quantize(torch.randn(2, N, D + 1))
    with pytest.raises(ValueError, match="one head per codebook"):
        quantizer.quantize(torch.randn(3, N, D))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(37,\)"):
        quantizer.quantize(torch.randn(2, N, D), torch.ones(2, N, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"indices must be an integer tensor of shape \(2, 37\)"):
        quantizer.update_(torch.randn(2, N, D), torch.zeros(N, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"targets must be an integer tensor of shape \(2, 37\)"):
        quantizer.cross_entropy(torch.randn(2, N, D), torch.zeros(2, N))


def test_layers_share_one_token_quantizer_through_use_codebook():
    first, second = VectorQuantize(dim=D, codebook_size=K), VectorQuantize(dim=D, codebook_size=K, decay=0.5)
    second.use_codebook(first.token_quantizer)
    assert second.token_quantizer is first.token_quantizer
    second.train()(torch.randn(2, 8, D))
    assert torch.equal(first.codebook, second.codebook) and float(first.codebook_health()["usage"]) > 0
    with pytest.raises(ValueError, match=r"codebook must be a Codebook of \(dim, codebook_size, num_codebooks\)"):
        VectorQuantize(dim=D, codebook_size=K + 1).use_codebook(first.token_quantizer)
    with pytest.raises(ValueError, match="got LearnedCodebook"):
        first.use_codebook(LearnedCodebook(D, K))
