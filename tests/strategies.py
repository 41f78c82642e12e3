"""Hypothesis strategies of the property suites (tests/ops/test_op_properties.py, tests/nn/test_layer_properties.py).

Hypothesis draws what a case is (shapes, dtypes, metric, layout, which values to plant) and a seed;
the tensors come from a `torch.Generator` seeded with it, so an example is small to print and to
shrink. Profiles (tests/conftest.py): "ci" by default, "long" with HYPOTHESIS_PROFILE=long.

Regimes of the search ops' inputs:
    "random"    -- randn times a scale (1e-3, 1 or 30) plus an offset (0 or 3: the data share a
                   large mean, where low precision flips most codes).
    "ties"      -- integers in [-3, 3] (every product, |c|^2 and l2 or dot score exact in fp32,
                   fp16 and bf16) with planted twin codes (an exact copy; for cosine a copy
                   times 2, which has exactly the same cosine) and tokens sitting on a twin.
    "nonfinite" -- "random" with NaN, +inf or -inf planted in some tokens and codes (sometimes in
                   every code).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastvq.ops.common import MAX_TOPK, METRICS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = (None, "ieee", "tf32", "bf16", "fp16")
"""What `precision=` may be: None resolves from the dtypes (`fastvq.ops.functional.resolve_precision`)."""
NON_FINITE = (float("nan"), float("inf"), float("-inf"))
REGIMES = ("random", "ties", "nonfinite")

seeds = st.integers(0, 2**32 - 1)


def fewer_examples(fraction: float) -> settings:
    """The active profile's settings with `fraction` of its examples (at least 3)."""
    return settings(max_examples=max(3, round(settings().max_examples * fraction)))


def backend_property(backends, *, share: float = 1.0, interpreter_share: float = 0.4, **drawn):
    """Decorator: a pytest test over the (device, backend) params `backends` that runs
    `body(device, backend, **examples of drawn)` under hypothesis, with `share` of the profile's
    examples (`interpreter_share` on the Triton backend, whose interpreter is slower per call)."""

    def decorate(body):
        full = fewer_examples(share)(given(**drawn)(body))
        few = fewer_examples(interpreter_share)(given(**drawn)(body))

        @pytest.mark.parametrize("device,backend", backends)
        def test(device, backend):
            (few if backend == "triton" else full)(device=device, backend=backend)

        test.__name__, test.__qualname__, test.__doc__ = body.__name__, body.__qualname__, body.__doc__
        return test

    return decorate


@dataclasses.dataclass
class SearchCase:
    """Inputs of a search op as the caller passes them: x (N, D) or (H, N, D), codebook (K, D) or
    (Hc, K, D) with Hc in (1, H); strided views when `layout` is "strided"."""

    regime: str
    metric: str
    x: torch.Tensor
    codebook: torch.Tensor
    layout: str

    def on(self, device: str) -> SearchCase:
        """The same case on `device`, in the same layout."""
        return dataclasses.replace(
            self,
            x=strided(self.x.contiguous().to(device), self.layout, transpose=False),
            codebook=strided(self.codebook.contiguous().to(device), self.layout, transpose=True),
        )

    @property
    def x3(self) -> torch.Tensor:
        """x as (H, N, D)."""
        return self.x if self.x.dim() == 3 else self.x.unsqueeze(0)

    @property
    def codebook3(self) -> torch.Tensor:
        """codebook as (Hc, K, D)."""
        return self.codebook if self.codebook.dim() == 3 else self.codebook.unsqueeze(0)


def strided(t: torch.Tensor, layout: str, transpose: bool) -> torch.Tensor:
    """`t` itself ("contiguous"), or an equal view with other strides ("strided"): every second row
    of a wider tensor starting at column 1, or (transpose) the transpose of a contiguous transpose."""
    if layout == "contiguous":
        return t
    if transpose:
        return t.mT.contiguous().mT
    wide = torch.zeros(*t.shape[:-2], 2 * t.shape[-2], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    wide[..., ::2, 1:] = t
    return wide[..., ::2, 1:]


def _values(generator: torch.Generator, regime: str, shape, scale: float, offset: float) -> torch.Tensor:
    if regime == "ties":
        return torch.randint(-3, 4, shape, generator=generator).float()
    return torch.randn(shape, generator=generator) * scale + offset


def _plant_twins(generator: torch.Generator, x: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    """Make up to 4 codes per codebook copies of lower-index codes (for cosine: times 2, the same
    cosine exactly), and put every third token on one of the originals."""
    n_codes = codebook.shape[1]
    if n_codes < 2:
        return
    originals = []
    for head in range(codebook.shape[0]):
        pairs = torch.randperm(n_codes, generator=generator)[: min(8, n_codes // 2 * 2)].view(-1, 2).sort(dim=-1).values
        for low, high in pairs.tolist():
            codebook[head, high] = codebook[head, low] * (2.0 if metric == "cosine" else 1.0)
        originals.append(pairs[:, 0].tolist())
    for head in range(x.shape[0]):
        codes = originals[head % len(originals)]
        for token in range(0, x.shape[1], 3):
            x[head, token] = codebook[head % codebook.shape[0], codes[token // 3 % len(codes)]]


def _plant_non_finite(
    generator: torch.Generator, t: torch.Tensor, share: float, rows: torch.Tensor | None = None
) -> None:
    """Set one entry of about `share` of the rows of t (..., rows, D) (of those where `rows` is True)
    to NaN, +inf or -inf."""
    if t.shape[-1] == 0:
        return
    flat = t.view(-1, t.shape[-1])
    hit = torch.rand(flat.shape[0], generator=generator) < share
    columns = torch.randint(0, t.shape[-1], (flat.shape[0],), generator=generator)
    kinds = torch.randint(0, len(NON_FINITE), (flat.shape[0],), generator=generator)
    if rows is not None:
        hit &= rows
    for row in hit.nonzero().flatten().tolist():
        flat[row, columns[row]] = NON_FINITE[kinds[row]]


@st.composite
def search_cases(draw, regimes=REGIMES, max_tokens: int = 40, max_codes: int = 40, max_dim: int = 40) -> SearchCase:
    """x and codebook of a search op (`SearchCase`): N in [0, max_tokens], K in [1, max_codes], D in
    [1, max_dim], H in 1..3 with a shared or per-head codebook (2-D x and codebook when H = 1 and
    shared, half the time), fp32/fp16/bf16 (the codebook in another dtype than x a quarter of the
    time), a metric, a regime, contiguous or strided."""
    regime, metric = draw(st.sampled_from(regimes)), draw(st.sampled_from(METRICS))
    heads = draw(st.integers(1, 3))
    codebook_heads = draw(st.sampled_from((1, heads)))
    n_tokens, n_codes, dim = (
        draw(st.integers(0, max_tokens)),
        draw(st.integers(1, max_codes)),
        draw(st.integers(1, max_dim)),
    )
    dtype = draw(st.sampled_from(DTYPES))
    codebook_dtype = draw(st.sampled_from(DTYPES)) if draw(st.integers(0, 3)) == 0 else dtype
    scale, offset = draw(st.sampled_from((1.0, 1e-3, 30.0))), draw(st.sampled_from((0.0, 3.0)))
    layout = draw(st.sampled_from(("contiguous", "strided")))
    flat = heads == codebook_heads == 1 and draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(seeds))
    x = _values(generator, regime, (heads, n_tokens, dim), scale, offset)
    codebook = _values(generator, regime, (codebook_heads, n_codes, dim), scale, offset)
    if regime == "ties":
        _plant_twins(generator, x, codebook, metric)
    if regime == "nonfinite":
        _plant_non_finite(generator, x, 0.25)
        _plant_non_finite(generator, codebook, 1.0 if draw(st.integers(0, 7)) == 0 else 0.25)
    x, codebook = x.to(dtype), codebook.to(codebook_dtype)
    if flat:
        x, codebook = x[0], codebook[0]
    return SearchCase(
        regime, metric, strided(x, layout, transpose=False), strided(codebook, layout, transpose=True), layout
    )


def topk_ks(case: SearchCase):
    """k of `topk_codes` / `sample_code` for a case: 1 <= k <= min(16, K)."""
    return st.integers(1, min(MAX_TOPK, case.codebook3.shape[1]))


NEAR_LIMIT_MAGNITUDES = (0.0, 1.0, 2.5, 1e19, 1.5e19, 1e38, 2e38, 3e38)
"""Magnitudes of the near-limit batches: products of two of them reach past 3.4e38 or not, sums too."""
EXACT_NEAR_LIMIT_MAGNITUDES = (0.0, 1.0, 2.5, 2.0**63, 1.5 * 2.0**63, 2.0**126, 1.5 * 2.0**127, 1.75 * 2.0**127)
"""The same range (up to 3e38) with at most 3 significant bits: products, squares and quotients of
them (and of them times 0.75) are exact in fp32, so that a tie in exact arithmetic is one in fp32."""


@st.composite
def near_limit_cases(draw, max_dim: int = 5, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, str]:
    """x (N, D) and codebook (K, D) fp32 of magnitudes from NEAR_LIMIT_MAGNITUDES (exact:
    EXACT_NEAR_LIMIT_MAGNITUDES), both signs, half of them scaled by 0.37 (exact: 0.75), D in [1,
    max_dim], each token twice (the copies at random rows), and a metric."""
    dim, n_unique, n_codes = draw(st.integers(1, max_dim)), draw(st.integers(1, 8)), draw(st.integers(1, 12))
    generator = torch.Generator().manual_seed(draw(seeds))
    magnitudes = torch.tensor(EXACT_NEAR_LIMIT_MAGNITUDES if exact else NEAR_LIMIT_MAGNITUDES)
    factor = 0.75 if exact else 0.37

    def rows(count):
        picked = magnitudes[torch.randint(0, len(magnitudes), (count, dim), generator=generator)]
        sign = torch.where(torch.rand(count, dim, generator=generator) < 0.5, -1.0, 1.0)
        return picked * sign * torch.where(torch.rand(count, dim, generator=generator) < 0.5, 1.0, factor)

    x = rows(n_unique)
    x = torch.cat([x, x])[torch.randperm(2 * n_unique, generator=generator)]
    return x, rows(n_codes), draw(st.sampled_from(METRICS))


@dataclasses.dataclass
class StatsCase:
    """Arguments of `code_stats`: x (N, D) or (H, N, D), indices and mask shaped x.shape[:-1]."""

    x: torch.Tensor
    indices: torch.Tensor
    num_codes: int
    mask: torch.Tensor | None
    check_indices: bool
    layout: str

    def on(self, device: str) -> StatsCase:
        """The same case on `device`, x in the same layout."""
        return dataclasses.replace(
            self,
            x=strided(self.x.contiguous().to(device), self.layout, transpose=False),
            indices=self.indices.to(device),
            mask=None if self.mask is None else self.mask.to(device),
        )

    def skipped(self) -> torch.Tensor:
        """Tokens that code_stats leaves out: index outside [0, K) or mask False."""
        out = (self.indices < 0) | (self.indices >= self.num_codes)
        return out if self.mask is None else out | ~self.mask


@st.composite
def stats_cases(draw, max_tokens: int = 60, max_codes: int = 40, max_dim: int = 40) -> StatsCase:
    """code_stats' arguments: N in [0, max_tokens], K in [1, max_codes], D in [0, max_dim] (zero-width
    rows are still counted), H in 1..3 (2-D when H = 1, half the time), fp32/fp16/bf16, contiguous or
    strided, indices in [-1, K) (int64 or int32), a mask or none; a quarter of the time some indices
    out of range and check_indices=False; NaN or inf planted in skipped tokens only."""
    heads, n_tokens = draw(st.integers(1, 3)), draw(st.integers(0, max_tokens))
    num_codes, dim = draw(st.integers(1, max_codes)), draw(st.integers(0, max_dim))
    dtype, layout = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(("contiguous", "strided")))
    with_mask, out_of_range = draw(st.booleans()), draw(st.integers(0, 3)) == 0
    index_dtype = torch.int64 if out_of_range else draw(st.sampled_from((torch.int64, torch.int32)))
    generator = torch.Generator().manual_seed(draw(seeds))
    x = torch.randn(heads, n_tokens, dim, generator=generator) * draw(st.sampled_from((1.0, 1e-3, 1e3)))
    indices = torch.randint(-1, num_codes, (heads, n_tokens), generator=generator)
    if out_of_range:
        wild = torch.tensor([-7, num_codes, num_codes + 5, 2**40])
        wild = wild[torch.randint(0, len(wild), indices.shape, generator=generator)]
        indices = torch.where(torch.rand(indices.shape, generator=generator) < 0.2, wild, indices)
    mask = torch.rand(heads, n_tokens, generator=generator) > 0.3 if with_mask else None
    case = StatsCase(x, indices.to(index_dtype), num_codes, mask, check_indices=not out_of_range, layout=layout)
    _plant_non_finite(generator, x, 0.5, rows=case.skipped().flatten())  # only where code_stats must not look
    case.x = strided(x.to(dtype), layout, transpose=False)
    if heads == 1 and draw(st.booleans()):
        case.x, case.indices, case.mask = case.x[0], case.indices[0], None if mask is None else mask[0]
    return case


@dataclasses.dataclass
class LayerCase:
    """A layer to build (the name of its class in both packages and `kwargs`, dim and codebook_size
    included), the shape of its inputs, the keywords of its forward (a padding mask), and the seed of
    its weights and inputs."""

    name: str
    kwargs: dict
    shape: tuple[int, ...]
    forward: dict
    seed: int

    def inputs(self, steps: int) -> list[torch.Tensor]:
        """`steps` input batches, randn * 1.5 as the parity tests draw them, from the case's seed."""
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.randn(self.shape, generator=generator) * 1.5 for _ in range(steps)]


LAYOUTS = {  # constructor keywords, input shape from (batch, tokens, dim)
    "tokens": ({}, lambda b, n, d: (b, n, d)),
    "one-token": ({}, lambda b, n, d: (b, d)),
    "channel-first": (dict(channel_last=False), lambda b, n, d: (b, d, n)),
    "image": (dict(accept_image_fmap=True), lambda b, n, d: (b, d, 1, n)),
}


@st.composite
def vector_quantize_cases(draw) -> LayerCase:
    """VectorQuantize configurations where vector-quantize-pytorch 1.32.0 defines the answer (no k-means,
    no dead-code replacement: their random draws differ by design): dim 1..10, K 1..30, 1-3 heads
    shared or separate, a codebook_dim projection (with or without layernorm) or none, cosine or l2,
    rotation trick or straight-through, EMA decays and eps, commitment and orthogonal weights, a
    learnable l2 codebook, 4 input layouts; a padding
    mask only where 1.32.0's masked loss is right (tokens, one head, no projection, l2:
    docs/quantizers.md)."""
    heads = draw(st.integers(1, 3))
    kwargs = dict(
        dim=draw(st.integers(1, 10)),
        codebook_size=draw(st.integers(1, 30)),
        heads=heads,
        separate_codebook_per_head=heads > 1 and draw(st.booleans()),
        codebook_dim=draw(st.one_of(st.none(), st.integers(1, 6))),
        use_cosine_sim=draw(st.booleans()),
        rotation_trick=draw(st.sampled_from((None, False))),
        decay=draw(st.sampled_from((0.8, 0.5, 0.99))),
        eps=draw(st.sampled_from((1e-5, 1e-3))),
        commitment_weight=draw(st.sampled_from((1.0, 0.25, 0.0))),
        orthogonal_reg_weight=draw(st.sampled_from((0.0, 0.5))),
    )
    projected = (kwargs["codebook_dim"] or kwargs["dim"]) * heads != kwargs["dim"]
    if projected:
        kwargs["layernorm_after_project_in"] = draw(st.booleans())
    if not kwargs["use_cosine_sim"] and draw(st.integers(0, 3)) == 0:  # 1.32.0 refuses a learnable cosine codebook
        kwargs.update(learnable_codebook=True, ema_update=False)
    layout = draw(st.sampled_from(tuple(LAYOUTS)))
    layout_kwargs, shape = LAYOUTS[layout]
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    forward = {}
    if layout == "tokens" and heads == 1 and not projected and not kwargs["use_cosine_sim"] and draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, tokens), min_size=batch, max_size=batch))
        forward["mask"] = torch.arange(tokens) < torch.tensor(lengths)[:, None]
        kwargs["return_zeros_for_masked_padding"] = draw(st.booleans())
    return LayerCase(
        "VectorQuantize", {**kwargs, **layout_kwargs}, shape(batch, tokens, kwargs["dim"]), forward, draw(seeds)
    )


@st.composite
def residual_cases(draw) -> LayerCase:
    """ResidualVQ and GroupedResidualVQ configurations of 1.32.0: 1-3 stages (or per-stage sizes), a
    shared codebook, a codebook_dim projection, cosine, quantize dropout, quant_grad_frac, the
    straight-through estimator, 1-2 groups; tokens of dim 2..10 (a multiple of the groups)."""
    groups = draw(st.sampled_from((None, 1, 2)))
    stages = draw(st.integers(1, 3))
    kwargs = dict(
        dim=draw(st.integers(1, 5)) * (groups or 1) * draw(st.sampled_from((1, 2))),
        use_cosine_sim=draw(st.booleans()),
        rotation_trick=draw(st.sampled_from((None, False))),
        decay=draw(st.sampled_from((0.8, 0.5))),
        quant_grad_frac=draw(st.sampled_from((0.0, 0.3))),
    )
    if draw(st.booleans()) and not groups:
        kwargs["codebook_size"] = tuple(draw(st.lists(st.integers(1, 20), min_size=stages, max_size=stages)))
    else:
        kwargs.update(
            num_quantizers=stages, codebook_size=draw(st.integers(1, 20)), shared_codebook=draw(st.booleans())
        )
    if draw(st.booleans()):
        kwargs["codebook_dim"] = draw(st.integers(1, 5))
    if stages > 1 and draw(st.booleans()):
        kwargs["quantize_dropout"] = True
    if groups:
        kwargs["groups"] = groups
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    return LayerCase(
        "GroupedResidualVQ" if groups else "ResidualVQ", kwargs, (batch, tokens, kwargs["dim"]), {}, draw(seeds)
    )
