"""Public ops: argument checks, backend dispatch and autograd.

Each op is registered as a `torch.library` custom op (namespace `fastvq`) so that `torch.compile`
keeps it in the graph. Every check here runs before any kernel launches. Each public op checks
its own arguments, then `_search_prelude` (the shared checks, precision and backend) and `_run`
(the call on canonical shapes, N = 0, the shape of the result) do the rest.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from .backend import implementation, resolve_backend
from .common import MAX_TOPK, METRICS, PRECISIONS, gather_codes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def _check_tensor(t, name: str, *, floating: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got dtype {t.dtype}"
        )


def _check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def _check_code_indices(indices, x: torch.Tensor, num_codes: int, check_range: bool) -> None:
    """The one check of the ops' code indices: an int64 or int32 tensor shaped x.shape[:-1] on x's device;
    with check_range, `check_index_range`."""
    _check_tensor(indices, "indices", floating=False)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be an integer tensor (int64 or int32), got dtype {indices.dtype}")
    if indices.shape != x.shape[:-1]:
        raise ValueError(f"indices must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(indices.shape)}")
    _check_same_device(x, "x", indices, "indices")
    if check_range:
        check_index_range(indices, num_codes)


def check_index_range(indices: torch.Tensor, num_codes: int, bound: str = "num_codes") -> None:
    """The one range check of code indices, for the ops and the layers: every value in [-1, num_codes), else
    a ValueError naming `bound` and the values found (one device sync; meta tensors have no values)."""
    if indices.numel() > 0 and indices.device.type != "meta":
        low, high = (int(value) for value in torch.aminmax(indices))
        if low < -1 or high >= num_codes:
            raise ValueError(f"indices must be in [-1, {bound}={num_codes}), got values in [{low}, {high}]")


def _canonical_args(x, codebook) -> tuple[torch.Tensor, torch.Tensor]:
    """Check x (N, D) | (H, N, D) and codebook (K, D) | (H, K, D); return (H, N, D), (Hc, K, D)."""
    _check_tensor(x, "x", floating=True)
    _check_tensor(codebook, "codebook", floating=True)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (N, D) or (H, N, D), got {tuple(x.shape)}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook must have shape (K, D) or (H, K, D), got {tuple(codebook.shape)}")
    if codebook.dim() == 3 and x.dim() == 2:
        raise ValueError(
            f"codebook has one codebook per head, shape {tuple(codebook.shape)}, so x must have "
            f"shape (H, N, D) with H={codebook.shape[0]}; got {tuple(x.shape)}"
        )
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    cb3 = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    if cb3.shape[0] not in (1, x3.shape[0]):
        raise ValueError(
            f"codebook heads ({cb3.shape[0]}) must match x heads ({x3.shape[0]}): "
            f"x {tuple(x.shape)}, codebook {tuple(codebook.shape)}"
        )
    if cb3.shape[-1] != x3.shape[-1]:
        raise ValueError(
            f"x and codebook must share the last dimension D, got x {tuple(x.shape)} "
            f"and codebook {tuple(codebook.shape)}"
        )
    if cb3.shape[1] == 0:
        raise ValueError(f"codebook is empty: expected (K, D) with K >= 1, got {tuple(codebook.shape)}")
    if x3.shape[-1] == 0:
        raise ValueError(f"x must have D >= 1, got {tuple(x.shape)}")
    _check_same_device(x, "x", codebook, "codebook")
    return x3, cb3


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def resolve_precision(precision: str | None, x_dtype: torch.dtype, codebook_dtype: torch.dtype) -> str:
    """The matrix-product precision a search uses.

    None (default): the inputs' own dtype when x and codebook are both fp16 or both bf16 (products
    of 16-bit values are exact in fp32, and accumulation is fp32); otherwise "tf32" when
    `torch.get_float32_matmul_precision()` is not "highest" (the user opted into TF32 globally),
    else "ieee" (exact fp32).
    """
    if precision is None:
        if x_dtype == codebook_dtype and x_dtype in (torch.float16, torch.bfloat16):
            return "fp16" if x_dtype == torch.float16 else "bf16"
        return "tf32" if _tf32_allowed() else "ieee"
    check_precision(precision)
    return precision


def check_precision(precision: str | None) -> None:
    """Raise ValueError unless precision is None or one of PRECISIONS."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")


def _search_prelude(
    x, codebook, metric: str, precision: str | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """What every op that scores codes does first: check x, codebook and metric, resolve the
    precision and the backend -> (x (H, N, D), codebook (Hc, K, D), precision, backend)."""
    x3, cb3 = _canonical_args(x, codebook)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return x3, cb3, resolve_precision(precision, x.dtype, codebook.dtype), resolve_backend(backend, x.device)


def _run(op: Callable, empty: Callable | None, x: torch.Tensor, x3: torch.Tensor, *args):
    """op(x3, *args) on canonical shapes, or, with no token, `empty` (the op's fake: outputs of the
    right shapes, no launch; None: call op anyway); the head dim is dropped again for 2-D x."""
    outputs = op(x3, *args) if x3.shape[1] or empty is None else empty(x3, *args)
    if x.dim() == 3:
        return outputs
    return tuple(o[0] for o in outputs) if isinstance(outputs, tuple) else outputs[0]


# ---------------------------------------------------------------------------------------------
# custom ops (canonical shapes; the public functions below check and reshape)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvq::nearest_code", mutates_args=())
def _nearest_code_op(
    x: torch.Tensor, codebook: torch.Tensor, metric: str, precision: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation(backend, "nearest_code")(x, codebook, metric=metric, precision=precision)


@_nearest_code_op.register_fake
def _nearest_code_empty(x, codebook, metric, precision, backend):
    shape = x.shape[:2]
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("fastvq::code_stats", mutates_args=())
def _code_stats_op(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, mask: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation(backend, "code_stats")(x, indices, num_codes, mask=mask)


@_code_stats_op.register_fake
def _(x, indices, num_codes, mask, backend):
    heads, _, dim = x.shape
    return x.new_empty((heads, num_codes), dtype=torch.float32), x.new_empty(
        (heads, num_codes, dim), dtype=torch.float32
    )


@torch.library.custom_op("fastvq::lookup_codes", mutates_args=())
def _lookup_codes_op(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> torch.Tensor:
    codes = gather_codes(codebook, indices).to(x.dtype)
    return torch.where((indices < 0).unsqueeze(-1), x, codes)


@_lookup_codes_op.register_fake
def _(x, codebook, indices, backend):
    return torch.empty_like(x)


def _lookup_codes_setup(ctx, inputs, output):
    _, codebook, indices, backend = inputs
    ctx.save_for_backward(indices)
    ctx.codebook_shape, ctx.codebook_dtype, ctx.backend = codebook.shape, codebook.dtype, backend


def _lookup_codes_backward(ctx, grad):
    """Straight-through to x; per-code sum of output gradients to the codebook (no one-hot)."""
    (indices,) = ctx.saved_tensors
    grad_codebook = None
    if ctx.needs_input_grad[1]:
        heads, num_codes, dim = ctx.codebook_shape
        # a shared codebook (Hc == 1) takes the gradients of every head
        _, sums = _code_stats_op(grad.reshape(heads, -1, dim), indices.reshape(heads, -1), num_codes, None, ctx.backend)
        grad_codebook = sums.to(ctx.codebook_dtype)
    return grad, grad_codebook, None, None


_lookup_codes_op.register_autograd(_lookup_codes_backward, setup_context=_lookup_codes_setup)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", precision: str | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and distance to the nearest code of every token, never building an N x K tensor.

    Args:
        x: (N, D) or (H, N, D) tokens; float32, float16, bfloat16 (or float64); any strides.
        codebook: (K, D) shared, or (H, K, D) one codebook per head; float, same device as x.
        metric: "l2" (squared Euclidean distance), "cosine" (x and codes are treated as
            l2-normalised, without copying x; distance = 1 - cosine similarity) or "dot" (maximum
            inner product: distance = -(x . c)).
        precision: what the matrix product may use to rank codes: "ieee" (exact fp32), "tf32"
            (10-bit mantissa operands: about 2-3x faster on tensor cores; picks a different, at most
            slightly farther, code for ~0.02-3% of tokens on random data), "bf16" / "fp16" (operands
            rounded to that dtype). None: see `resolve_precision`. Accumulation is always fp32 and
            the returned distance is always recomputed exactly in fp32 for the chosen code.
        backend: "auto", "torch", "triton" or "cuda" (see `fastvq.ops.backend`).

    Returns:
        indices: int64, (N,) or (H, N). Ties go to the lowest index. A token with no finite
            distance to any code (NaN/inf in the token, or in every code) gets -1; codes with a
            non-finite entry are never chosen.
        distances: float32, same shape; NaN where the index is -1. Neither output carries a
            gradient (use `lookup_codes` for the differentiable quantize step).
    """
    x3, cb3, precision, backend = _search_prelude(x, codebook, metric, precision, backend)
    return _run(_nearest_code_op, _nearest_code_empty, x, x3.detach(), cb3.detach(), metric, precision, backend)


def code_stats(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    check_indices: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts and sums of the vectors assigned to each code, without a one-hot matrix.

    Args:
        x: (N, D) or (H, N, D) float vectors (any float dtype; summed in fp32).
        indices: (N,) or (H, N) integer code of each vector in [-1, num_codes); -1 means skip.
        num_codes: K >= 1.
        mask: optional bool tensor shaped like `indices`; False means skip.
        check_indices: verify that every index is in [-1, num_codes) (costs one device sync; turn
            off inside a training loop when the indices come from `nearest_code`).

    Returns:
        counts: float32 (K,) or (H, K); sums: float32 (K, D) or (H, K, D).
    """
    _check_tensor(x, "x", floating=True)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (N, D) or (H, N, D), got {tuple(x.shape)}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    _check_code_indices(indices, x, num_codes, check_indices)
    if mask is not None:
        _check_tensor(mask, "mask", floating=False)
        if mask.dtype != torch.bool or mask.shape != indices.shape:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(indices.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        _check_same_device(x, "x", mask, "mask")
    backend = resolve_backend(backend, x.device)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    indices3 = (indices if indices.dim() == 2 else indices.unsqueeze(0)).long()
    mask3 = None if mask is None else (mask if mask.dim() == 2 else mask.unsqueeze(0))
    return _run(_code_stats_op, None, x, x3, indices3, num_codes, mask3, backend)


def lookup_codes(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, *, backend: str = "auto", check_indices: bool = True
) -> torch.Tensor:
    """The code rows chosen for x, differentiable as the quantize step of a VQ layer.

    x: (N, D) or (H, N, D); codebook (K, D) or (H, K, D); indices int64 or int32 shaped x.shape[:-1].
    Returns codebook[indices] in x's dtype, shaped like x (rows with index -1 pass x through).
    Backward: the gradient goes straight through to x and, when the codebook requires grad, to
    each code as the sum of the gradients of the rows that chose it. check_indices: verify that every
    index is in [-1, K) (one device sync; off inside a training loop, for indices from a search).
    """
    x3, cb3 = _canonical_args(x, codebook)
    _check_code_indices(indices, x, cb3.shape[1], check_indices)
    backend = resolve_backend(backend, x.device)
    indices3 = (indices if indices.dim() == 2 else indices.unsqueeze(0)).long()
    return _run(_lookup_codes_op, None, x, x3, cb3, indices3, backend)


def quantize(
    x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", precision: str | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nearest_code` followed by `lookup_codes`: (quantized like x, indices, distances)."""
    indices, distances = nearest_code(x, codebook, metric=metric, precision=precision, backend=backend)
    return lookup_codes(x, codebook, indices, backend=backend, check_indices=False), indices, distances


# ---------------------------------------------------------------------------------------------
# ops on the logits: sampling, top-k, cross-entropy
# ---------------------------------------------------------------------------------------------


def _check_k(k, n_codes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(MAX_TOPK, n_codes):
        raise ValueError(f"k must be in [1, min({MAX_TOPK}, K={n_codes})], got {k}")


@torch.library.custom_op("fastvq::sample_code", mutates_args=())
def _sample_code_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float,
    seed: int,
    k: int,
    metric: str,
    precision: str,
    backend: str,
) -> torch.Tensor:
    """k = 0: one draw per token, (H, N); k >= 1: the k best perturbed logits, (H, N, k)."""
    return implementation(backend, "sample_code")(
        x, codebook, temperature=temperature, seed=seed, k=k or None, metric=metric, precision=precision
    )


@_sample_code_op.register_fake
def _sample_code_empty(x, codebook, temperature, seed, k, metric, precision, backend):
    return x.new_empty((*x.shape[:2], k) if k else x.shape[:2], dtype=torch.int64)


@torch.library.custom_op("fastvq::topk_codes", mutates_args=())
def _topk_codes_op(
    x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str, precision: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation(backend, "topk_codes")(x, codebook, k, metric=metric, precision=precision)


@_topk_codes_op.register_fake
def _topk_codes_empty(x, codebook, k, metric, precision, backend):
    shape = (*x.shape[:2], k)
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("fastvq::code_cross_entropy", mutates_args=())
def _code_cross_entropy_op(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str, precision: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation(backend, "code_cross_entropy")(x, codebook, indices, metric=metric, precision=precision)


@_code_cross_entropy_op.register_fake
def _(x, codebook, indices, metric, precision, backend):
    return x.new_empty(x.shape[:2], dtype=torch.float32), x.new_empty(x.shape[:2], dtype=torch.float32)


@torch.library.custom_op("fastvq::code_cross_entropy_grad", mutates_args=())
def _code_cross_entropy_grad_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    wrt: str,
    metric: str,
    precision: str,
    backend: str,
) -> torch.Tensor:
    return implementation(backend, "code_cross_entropy_grad")(
        x, codebook, indices, lse, grad, wrt, metric=metric, precision=precision
    )


@_code_cross_entropy_grad_op.register_fake
def _(x, codebook, indices, lse, grad, wrt, metric, precision, backend):
    like = x if wrt == "x" else codebook
    return like.new_empty(like.shape, dtype=torch.float32)


def _code_cross_entropy_setup(ctx, inputs, output):
    x, codebook, indices, metric, precision, backend = inputs
    ctx.save_for_backward(x, codebook, indices, output[1])
    ctx.metric, ctx.precision, ctx.backend = metric, precision, backend
    ctx.mark_non_differentiable(output[1])


def _code_cross_entropy_backward(ctx, grad_loss, _grad_lse):
    """Streamed softmax-weighted sums (see `fastvq.ops.chunked.code_cross_entropy_grad`); no N x K tensor."""
    x, codebook, indices, lse = ctx.saved_tensors
    grads = [None, None]
    for i, wrt, like in ((0, "x", x), (1, "codebook", codebook)):
        if ctx.needs_input_grad[i]:
            grads[i] = _code_cross_entropy_grad_op(
                x, codebook, indices, lse, grad_loss, wrt, ctx.metric, ctx.precision, ctx.backend
            ).to(like.dtype)
    return grads[0], grads[1], None, None, None, None


_code_cross_entropy_op.register_autograd(_code_cross_entropy_backward, setup_context=_code_cross_entropy_setup)


def sample_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    temperature: float = 1.0,
    k: int | None = None,
    metric: str = "l2",
    seed: int | None = None,
    precision: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Draw one code per token from softmax(logits / temperature) (vector-quantize-pytorch 1.32.0's
    Gumbel sampling),
    or k codes without replacement (Gumbel top-k), without an N x K tensor of logits or noise.

    Args:
        x: (N, D) or (H, N, D) tokens; codebook: (K, D) shared or (H, K, D) (as `nearest_code`).
        temperature: > 0 samples argmax_k(logit_k / temperature + Gumbel noise); <= 0 returns the
            nearest code (`nearest_code`'s indices, or `topk_codes`' with k).
        k: None draws one code; 1 <= k <= min(16, K) returns the k codes with the highest
            logit / temperature + Gumbel noise (the same noise as k=None, so column 0 is the k=None
            draw), highest first, ties to the lowest index.
        metric: logits are -sqrt(max(|x - c|^2, 1e-8)) ("l2"), the cosine similarity ("cosine") or
            x . c ("dot": softmax(x W^T / T) of an output layer W = codebook).
        seed: int in [0, 2^63): the noise is Philox keyed by the seed and counted by (token, code),
            so the same seed gives the same draw, on either backend (up to float rounding near
            ties). None draws a seed from torch's default generator (`torch.manual_seed` repeats it).
        precision, backend: as `nearest_code`; logits are fp32.

    Returns:
        indices: int64, (N,) or (H, N), or (N, k) or (H, N, k) with k; -1 for a token with no
        finite logit, or in the slots past the codes with one (codes with a non-finite logit are
        never drawn).
    """
    x3, cb3, precision, backend = _search_prelude(x, codebook, metric, precision, backend)
    if k is not None:
        _check_k(k, cb3.shape[1])
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be None or an int, got {type(seed).__name__}")
    if seed is not None and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    seed = None if seed is None else int(seed)
    if temperature <= 0:
        if k is not None:
            return _run(_topk_codes_op, _topk_codes_empty, x, x3, cb3, k, metric, precision, backend)[0]
        return _run(_nearest_code_op, _nearest_code_empty, x, x3.detach(), cb3.detach(), metric, precision, backend)[0]
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    return _run(
        _sample_code_op, _sample_code_empty, x, x3, cb3, float(temperature), seed, k or 0, metric, precision, backend
    )


def topk_codes(
    x: torch.Tensor,
    codebook: torch.Tensor,
    k: int,
    *,
    metric: str = "l2",
    precision: str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codes of every token, nearest first, without an N x K tensor.

    Args:
        x, codebook, metric, precision, backend: as `nearest_code`.
        k: 1 <= k <= min(16, K).

    Returns:
        indices: int64, (N, k) or (H, N, k); ties go to the lowest index; -1 in the slots past the
            codes with a finite distance.
        distances: float32, same shape, as `nearest_code` (recomputed exactly in fp32); NaN where
            the index is -1.
    """
    x3, cb3, precision, backend = _search_prelude(x, codebook, metric, precision, backend)
    _check_k(k, cb3.shape[1])
    return _run(_topk_codes_op, _topk_codes_empty, x, x3, cb3, k, metric, precision, backend)


def code_cross_entropy(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    *,
    metric: str = "l2",
    precision: str | None = None,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Per-token cross-entropy of the code logits against target codes (vector-quantize-pytorch
    1.32.0's cross-entropy loss),
    with an online log-sum-exp: no N x K tensor, forward or backward.

    Args:
        x, codebook, metric, precision, backend: as `sample_code` (logits in fp32).
        indices: (N,) or (H, N) integer target code of each token in [-1, K); -1 is ignored.
        check_indices: verify the range (one device sync; turn off inside a training loop).

    Returns:
        loss: float32, (N,) or (H, N): logsumexp_k(logit_k) - logit_target, 0 where the index is -1
        (average over the non-ignored tokens for vector-quantize-pytorch's mean). Differentiable w.r.t. x and
        codebook; the gradients come back in their dtypes.
    """
    x3, cb3, precision, backend = _search_prelude(x, codebook, metric, precision, backend)
    _check_code_indices(indices, x, cb3.shape[1], check_indices)
    indices3 = (indices if indices.dim() == 2 else indices.unsqueeze(0)).long()
    loss, _ = _run(_code_cross_entropy_op, None, x, x3, cb3, indices3, metric, precision, backend)
    return loss
