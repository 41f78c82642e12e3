"""Public soft ops over a codebook: `code_entropy` (per-token entropy of the distribution over codes
and its mean over the batch) and `soft_quantize` (IBQ's index backpropagation: the hard code's value,
the softmax's gradient). Argument checks, backend dispatch and `torch.library` custom ops as in
`fastvq.ops.functional` (whose checks they share); neither forward nor backward holds an N x K tensor.
The math, shared by every backend, is in the docstring of `fastvq.ops.chunked_soft`.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint

from .backend import implementation
from .common import gather_codes
from .functional import _check_same_device, _check_tensor, _run, _search_prelude


def _check_temperature(temperature, name: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {temperature}")
    return float(temperature)


def _check_mask(mask, x: torch.Tensor) -> torch.Tensor | None:
    """mask: None or a bool tensor shaped x.shape[:-1] on x's device -> (H, N) or None."""
    if mask is None:
        return None
    _check_tensor(mask, "mask", floating=False)
    if mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
        raise ValueError(
            f"mask must be a bool tensor of shape x.shape[:-1] = {tuple(x.shape[:-1])}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    _check_same_device(x, "x", mask, "mask")
    return mask if mask.dim() == 2 else mask.unsqueeze(0)


def _empty_grad(like: torch.Tensor, needed: bool) -> torch.Tensor:
    return like.new_empty(like.shape if needed else (0,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# code_entropy
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvq::code_entropy", mutates_args=())
def _code_entropy_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    log_clamp_min: float | None,
    metric: str,
    precision: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy (H, N), mean_probs (H, K), norm (2, H, N), kept_mass (H, N)), all fp32."""
    return implementation(backend, "code_entropy")(
        x, codebook, mask, temperature=temperature, log_clamp_min=log_clamp_min, metric=metric, precision=precision
    )


@_code_entropy_op.register_fake
def _(x, codebook, mask, temperature, log_clamp_min, metric, precision, backend):
    per_token = x.new_empty(x.shape[:2], dtype=torch.float32)
    return (
        per_token,
        x.new_empty((x.shape[0], codebook.shape[1]), dtype=torch.float32),
        x.new_empty((2, *x.shape[:2]), dtype=torch.float32),
        per_token.clone(),
    )


@torch.library.custom_op("fastvq::code_entropy_grad", mutates_args=())
def _code_entropy_grad_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    norm: torch.Tensor,
    entropy: torch.Tensor,
    kept_mass: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_mean_probs: torch.Tensor | None,
    temperature: float,
    log_clamp_min: float | None,
    metric: str,
    precision: str,
    backend: str,
    x_grad: bool,
    codebook_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation(backend, "code_entropy_grad")(
        x,
        codebook,
        mask,
        norm,
        entropy,
        kept_mass,
        grad_entropy,
        grad_mean_probs,
        temperature=temperature,
        log_clamp_min=log_clamp_min,
        metric=metric,
        precision=precision,
        x_grad=x_grad,
        codebook_grad=codebook_grad,
    )


@_code_entropy_grad_op.register_fake
def _(
    x,
    codebook,
    mask,
    norm,
    entropy,
    kept_mass,
    grad_entropy,
    grad_mean_probs,
    temperature,
    log_clamp_min,
    metric,
    precision,
    backend,
    x_grad,
    codebook_grad,
):
    return _empty_grad(x, x_grad), _empty_grad(codebook, codebook_grad)


def _code_entropy_setup(ctx, inputs, output):
    x, codebook, mask, temperature, log_clamp_min, metric, precision, backend = inputs
    entropy, _, norm, kept_mass = output
    ctx.save_for_backward(x, codebook, mask, norm, entropy, kept_mass)
    ctx.options = dict(
        temperature=temperature, log_clamp_min=log_clamp_min, metric=metric, precision=precision, backend=backend
    )
    ctx.mark_non_differentiable(norm, kept_mass)
    ctx.set_materialize_grads(False)


def _code_entropy_backward(ctx, grad_entropy, grad_mean_probs, _grad_norm, _grad_kept_mass):
    """Two streamed passes (fastvq.ops.chunked_soft); the mean's pass is skipped when it has no gradient."""
    x, codebook, mask, norm, entropy, kept_mass = ctx.saved_tensors
    x_grad, codebook_grad = ctx.needs_input_grad[:2]
    if grad_entropy is None and grad_mean_probs is None or not (x_grad or codebook_grad):
        return None, None, None, None, None, None, None, None
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(entropy)
    opts = ctx.options
    grad_x, grad_codebook = _code_entropy_grad_op(
        x,
        codebook,
        mask,
        norm,
        entropy,
        kept_mass,
        grad_entropy,
        grad_mean_probs,
        opts["temperature"],
        opts["log_clamp_min"],
        opts["metric"],
        opts["precision"],
        opts["backend"],
        x_grad,
        codebook_grad,
    )
    return (
        grad_x.to(x.dtype) if x_grad else None,
        grad_codebook.to(codebook.dtype) if codebook_grad else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_code_entropy_op.register_autograd(_code_entropy_backward, setup_context=_code_entropy_setup)


def code_entropy(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    temperature: float = 1.0,
    metric: str = "l2",
    mask: torch.Tensor | None = None,
    log_clamp_min: float | None = None,
    precision: str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of every token's distribution over the codes, p = softmax(logits / temperature), and that
    distribution's mean over the batch, without an N x K tensor, forward or backward.

    Args:
        x: (N, D) or (H, N, D) tokens; codebook: (K, D) shared or (H, K, D) (as `nearest_code`).
        temperature: T > 0; the logits (fp32 whatever the dtypes, as `sample_code`: -sqrt(max(|x - c|^2,
            1e-8)) for "l2", the cosine similarity, or x . c for "dot") are divided by it.
        mask: optional bool tensor shaped x.shape[:-1]; False leaves a token out.
        log_clamp_min: None: the exact entropy -sum_k p_k log p_k (IBQ's and MAGVIT's
            `compute_entropy_loss`: its log_softmax(logits / T + eps) is log p exactly). A float c in
            (0, 1): -sum_k p_k log(max(p_k, c)) (vector-quantize-pytorch's LFQ and codebook-diversity
            entropy, c = 1e-5). It costs one more pass over the codes.
        precision, backend: as `nearest_code` (the products that make the logits; at low temperatures
            prefer "ieee": TF32's rounding of a logit is multiplied by 1 / T).

    Returns:
        entropy: float32, (N,) or (H, N). A masked token gets 0; a token whose logits are not all finite
            or -inf (NaN or inf in the token, an overflowing logit; a code with a non-finite entry does
            it to every token) gets NaN. Neither is counted in the mean nor gets a gradient.
        mean_probs: float32, (K,) or (H, K): the mean of p over the other tokens of each head (NaN where
            a head has none, as torch's mean of nothing). Its entropy, e.g. -(m * m.clamp(min=c).log()).sum(),
            is the codebook (batch) entropy that quantizers maximise.
        Both are differentiable w.r.t. x and codebook (gradients come back in their dtypes).
    """
    x3, cb3, precision, backend = _search_prelude(x, codebook, metric, precision, backend)
    temperature = _check_temperature(temperature)
    if log_clamp_min is not None:
        if isinstance(log_clamp_min, bool) or not isinstance(log_clamp_min, (int, float)) or not 0 < log_clamp_min < 1:
            raise ValueError(f"log_clamp_min must be None or a float in (0, 1), got {log_clamp_min!r}")
        log_clamp_min = float(log_clamp_min)
    mask3 = _check_mask(mask, x)
    entropy, mean_probs, _, _ = _run(
        _code_entropy_op, None, x, x3, cb3, mask3, temperature, log_clamp_min, metric, precision, backend
    )
    return entropy, mean_probs


# ---------------------------------------------------------------------------------------------
# soft_quantize
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvq::soft_quantize", mutates_args=())
def _soft_quantize_op(
    x: torch.Tensor, codebook: torch.Tensor, temperature: float, hard: bool, metric: str, precision: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quantized (H, N, D) in x's dtype, indices (H, N) int64, norm (2, H, N) fp32, soft values (H, N, D) fp32)."""
    indices, norm, soft_values = implementation(backend, "soft_quantize")(
        x, codebook, temperature=temperature, metric=metric, precision=precision
    )
    value = gather_codes(codebook, indices) if hard else soft_values
    return torch.where((indices < 0)[..., None], x, value.to(x.dtype)), indices, norm, soft_values


@_soft_quantize_op.register_fake
def _(x, codebook, temperature, hard, metric, precision, backend):
    return (
        torch.empty_like(x),
        x.new_empty(x.shape[:2], dtype=torch.int64),
        x.new_empty((2, *x.shape[:2]), dtype=torch.float32),
        x.new_empty(x.shape, dtype=torch.float32),
    )


@torch.library.custom_op("fastvq::soft_quantize_grad", mutates_args=())
def _soft_quantize_grad_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    norm: torch.Tensor,
    soft_values: torch.Tensor,
    grad: torch.Tensor,
    hard: bool,
    temperature: float,
    metric: str,
    precision: str,
    backend: str,
    x_grad: bool,
    codebook_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation(backend, "soft_quantize_grad")(
        x,
        codebook,
        indices,
        norm,
        soft_values,
        grad,
        hard=hard,
        temperature=temperature,
        metric=metric,
        precision=precision,
        x_grad=x_grad,
        codebook_grad=codebook_grad,
    )


@_soft_quantize_grad_op.register_fake
def _(
    x, codebook, indices, norm, soft_values, grad, hard, temperature, metric, precision, backend, x_grad, codebook_grad
):
    return _empty_grad(x, x_grad), _empty_grad(codebook, codebook_grad)


def _soft_quantize_setup(ctx, inputs, output):
    x, codebook, temperature, hard, metric, precision, backend = inputs
    _, indices, norm, soft_values = output
    ctx.save_for_backward(x, codebook, indices, norm, soft_values)
    ctx.options = (hard, temperature, metric, precision, backend)
    ctx.mark_non_differentiable(indices, norm, soft_values)


def _soft_quantize_backward(ctx, grad, _grad_indices, _grad_norm, _grad_soft_values):
    """Streamed as attention's backward with the codebook as keys and values (fastvq.ops.chunked_soft)."""
    x, codebook, indices, norm, soft_values = ctx.saved_tensors
    x_grad, codebook_grad = ctx.needs_input_grad[:2]
    if not (x_grad or codebook_grad):
        return None, None, None, None, None, None, None
    grad_x, grad_codebook = _soft_quantize_grad_op(
        x, codebook, indices, norm, soft_values, grad, *ctx.options, x_grad, codebook_grad
    )
    return (
        grad_x.to(x.dtype) if x_grad else None,
        grad_codebook.to(codebook.dtype) if codebook_grad else None,
        None,
        None,
        None,
        None,
        None,
    )


_soft_quantize_op.register_autograd(_soft_quantize_backward, setup_context=_soft_quantize_setup)


def soft_quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    temperature: float = 1.0,
    metric: str = "l2",
    hard: bool = True,
    precision: str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index backpropagation (IBQ): the nearest code as the value, the gradient of the soft code
    softmax(logits / temperature) @ codebook, to x and to every code, without an N x K tensor.

    The same as IBQ's `one_hot = hard - soft.detach() + soft; quantized = one_hot @ codebook` (with
    metric="dot", temperature=1), whose N x K one-hot and softmax this never builds: the forward is
    one online-softmax pass (the argmax, a running normaliser and sum_k p_k c_k), the backward streams
    as attention's does with the codebook as keys and values.

    Args:
        x, codebook, metric, precision, backend: as `code_entropy` (logits in fp32).
        temperature: T > 0 of the softmax whose gradient flows (not of the argmax).
        hard: True: the value is the code with the highest logit (ties to the lowest index); its
            gradient reaches the codebook both through the softmax and, as a lookup's, to the chosen
            code. False: the value is the soft code sum_k p_k c_k itself (gradients of that).

    Returns:
        quantized: like x (shape, dtype). A token whose logits are not all finite passes x through
            (value and gradient, as `lookup_codes` does for index -1).
        indices: int64, (N,) or (H, N): the argmax, -1 for such a token; no gradient.
    """
    x3, cb3, precision, backend = _search_prelude(x, codebook, metric, precision, backend)
    temperature = _check_temperature(temperature)
    if not isinstance(hard, bool):
        raise TypeError(f"hard must be a bool, got {type(hard).__name__}")
    quantized, indices, _, _ = _run(_soft_quantize_op, None, x, x3, cb3, temperature, hard, metric, precision, backend)
    return quantized, indices


# ---------------------------------------------------------------------------------------------
# sign_code_entropy
# ---------------------------------------------------------------------------------------------


def sign_code_entropy(x: torch.Tensor, *, scale: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Exact entropy of every token's distribution over the 2^d sign codes {-scale, +scale}^d (LFQ's and
    BSQ's codebooks), p = softmax(x . c / temperature), in O(N d) time and memory.

    That softmax factorises into d independent bits: bit j is + with probability sigmoid(u_j),
    u_j = 2 scale x_j / T, so the entropy is sum_j H(sigmoid(u_j)) with the binary entropy
    H = log(1 + e^-|u|) + |u| / (1 + e^|u|) (two non-negative terms: no cancellation at large |u|).
    It equals `code_entropy(x, codebook, metric="dot", temperature=T)`'s exact (unclamped) entropy
    without visiting a code; the clamped formula (log_clamp_min) does not factorise.

    Args:
        x: (..., d) tokens, any float dtype and strides; differentiable.
        scale: s > 0, the codes' absolute value per dimension.
        temperature: T > 0.

    Returns:
        entropy (...) float32 (float64 for float64 x), in nats; NaN for a token with a NaN value.
    """
    _check_tensor(x, "x", floating=True)
    if x.dim() < 1:
        raise ValueError(f"x must have a trailing code dimension (..., d), got shape {tuple(x.shape)}")
    scale = _check_temperature(scale, "scale")
    temperature = _check_temperature(temperature)
    u = (x.to(torch.float64 if x.dtype == torch.float64 else torch.float32) * (2 * scale / temperature)).abs()
    return (torch.nn.functional.softplus(-u) + u * torch.sigmoid(-u)).sum(-1)


CHUNK_TOKENS = 1024
"""Tokens per chunk of sign_code_distribution (its temporaries: ~10 (chunk, 2^(d/2)) float64)."""


def sign_code_distribution(
    x: torch.Tensor, *, scale: float = 1.0, temperature: float = 1.0, log_clamp_min: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`code_entropy(x, codebook, metric="dot", temperature=T, log_clamp_min=c)` for the sign codebook
    {-scale, +scale}^d (index bits most significant first, bit 1 for +) without its O(N K d) work: p
    factorises over the bits, so over the two halves of an index, p_nk = A_n(h) B_n(l) with h the high
    d // 2 bits and l the others; a chunk of CHUNK_TOKENS tokens at a time (recomputed in the backward),
    so beside the (K,) means only O(chunk 2^(d/2)) is held (2^9 per token at d = 18).

    - mean_probs = A^T B / N, one matrix product per head;
    - the exact entropy is `sign_code_entropy`'s (per-bit binary entropies);
    - with log_clamp_min c: -sum p max(log p, log c) = exact - sum_k p_k relu(log c - log p_k), and per
      token and high half h the codes l with log B_l < log c - log A_h are a prefix of B sorted by
      value, so the sum is A_h ((log c - log A_h) S1 - S2) with prefix sums S1 of B and S2 of B log B
      found by a binary search, in float64 (the difference would lose fp32 digits).

    Args:
        x: (N, d) or (H, N, d) tokens, any float dtype; differentiable (autograd through the above).
        scale, temperature: s > 0 and T > 0 (logits x . c / T).
        log_clamp_min: None (exact entropy) or c in (0, 1) (vector-quantize-pytorch's log(max(p, c))).

    Returns:
        entropy (N,) or (H, N) and mean_probs (K,) or (H, K), float32 (float64 for float64 x); the mean
        is over the N tokens (NaN for N = 0, as torch's mean of nothing).
    """
    _check_tensor(x, "x", floating=True)
    if x.dim() not in (2, 3) or x.shape[-1] < 1:
        raise ValueError(f"x must be (N, d) or (H, N, d) with d >= 1, got shape {tuple(x.shape)}")
    if log_clamp_min is not None and not (
        isinstance(log_clamp_min, (int, float)) and not isinstance(log_clamp_min, bool) and 0 < log_clamp_min < 1
    ):
        raise ValueError(f"log_clamp_min must be None or a float in (0, 1), got {log_clamp_min!r}")
    scale, temperature = _check_temperature(scale, "scale"), _check_temperature(temperature)
    x3 = (x if x.dim() == 3 else x.unsqueeze(0)).double()  # float64 inside: the clamped entropy is a difference
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = x3 * (2 * scale / temperature)  # bit j is + with probability sigmoid(u_j)
    log_c = None if log_clamp_min is None else math.log(log_clamp_min)
    # per token chunk, recomputed in the backward: O(chunk 2^(d/2)) temporaries, never O(N 2^(d/2))
    parts = [
        torch.utils.checkpoint.checkpoint(_chunk_terms, chunk, log_c, use_reentrant=False)
        for chunk in u.split(CHUNK_TOKENS, 1)
    ]
    mean_probs = sum(part[0] for part in parts).flatten(1) / u.shape[1]  # (H, K), index h 2^low + l
    entropy = sign_code_entropy(x3, scale=scale, temperature=temperature)
    if log_c is not None:
        entropy = entropy - torch.cat([part[1] for part in parts], 1)
    entropy, mean_probs = entropy.to(dtype), mean_probs.to(dtype)
    return (entropy, mean_probs) if x.dim() == 3 else (entropy[0], mean_probs[0])


def _chunk_terms(u: torch.Tensor, log_c: float | None) -> tuple[torch.Tensor, ...]:
    """Per-bit logits u (H, n, d) of a token chunk -> (sum over its tokens of A^T B (H, 2^high, 2^low),
    and with log_c the mass below the clamp per token (H, n))."""
    high = u.shape[-1] // 2
    log_a, log_b = _half_log_probs(u[..., :high]), _half_log_probs(u[..., high:])  # (H, n, 2^half)
    summed = log_a.exp().transpose(1, 2) @ log_b.exp()
    return (summed,) if log_c is None else (summed, _mass_below_clamp(log_a, log_b, log_c))


def _half_log_probs(u: torch.Tensor) -> torch.Tensor:
    """Per-bit logits u (H, N, m) -> log-probabilities (H, N, 2^m) of every m-bit pattern (MSB first)."""
    m = u.shape[-1]
    bits = (torch.arange(2**m, device=u.device)[:, None] >> torch.arange(m - 1, -1, -1, device=u.device)) & 1
    # log q(+) = -softplus(-u) = log q(-) + u, log q(-) = -softplus(u)
    return -torch.nn.functional.softplus(u).sum(-1, keepdim=True) + u @ bits.to(u.dtype).T


def _mass_below_clamp(log_a: torch.Tensor, log_b: torch.Tensor, log_c: float) -> torch.Tensor:
    """sum_(h,l) A_h B_l relu(log_c - log A_h - log B_l) per token (H, N), by sorted prefix sums."""
    log_b_sorted, _ = log_b.sort(dim=-1)
    b_sorted = log_b_sorted.exp()
    zero = log_b_sorted.new_zeros((*log_b_sorted.shape[:-1], 1))
    mass = torch.cat([zero, b_sorted.cumsum(-1)], -1)  # S1[i]: sum of the i smallest B
    weighted = torch.cat([zero, (b_sorted * log_b_sorted).cumsum(-1)], -1)  # S2[i]
    threshold = log_c - log_a  # (H, N, 2^high): B_l counts where log B_l < threshold
    count = torch.searchsorted(log_b_sorted.detach().contiguous(), threshold.detach().contiguous())
    below = threshold * mass.gather(-1, count) - weighted.gather(-1, count)
    return (log_a.exp() * below).sum(-1)
