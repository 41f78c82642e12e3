"""`TokenQuantizer`: the token-level core that the quantizer layers build on.

A token quantizer holds codes (`codes`: num_codebooks x K x D) and the settings the ops score them
with (metric, precision, backend), and works on canonical tokens:

    tokens (H, N, D): N tokens of H heads each (H = 1 for plain tokens); head h is scored against
    codebook h, or against the one codebook when num_codebooks = 1 (any H).

It quantizes tokens (`quantize`: nearest, top-k or sampled codes, with a mask), decodes indices
(`codes_from_indices`), scores target codes (`cross_entropy`), learns from a batch (`update_`, from
tokens, indices and mask), records usage (`observe_`) and reports codebook health (`health`).
Subclasses say where the codes come from (`codes`) and what a batch teaches them (`update_`):
`fastvq.nn.Codebook` keeps them by EMA (k-means init, dead-code expiry), `LearnedCodebook` is a
parameter trained by gradient descent, and a new quantizer may compute them (a frozen codebook
through a learned transform, for one). No method builds an N x K tensor.

Rules every method keeps: a token with a non-finite value in any head gets index -1 in every head
(a token is quantized whole or not at all), as does a masked token (mask False); such tokens pass
through `quantize` unchanged and never reach the statistics. Statistics are fp32.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
from torch import nn

from ..ops.backend import check_backend
from ..ops.functional import (
    check_index_range,
    check_precision,
    code_cross_entropy,
    code_stats,
    lookup_codes,
    nearest_code,
    sample_code,
    topk_codes,
)
from . import distributed
from .arguments import check_arguments, describe, is_integer_tensor
from .kmeans import l2norm


class TokenCodes(NamedTuple):
    """What `TokenQuantizer.quantize` returns for tokens (H, N, D).

    codes: (H, N, D), or (H, N, k, D) with top-k, float32: the chosen codes, differentiable in the
        quantizer's codes (never in the tokens); the token itself where the index is -1.
    indices: (H, N) or (H, N, k) int64; -1 for masked tokens and tokens with a non-finite value (in
        every head), and in top-k slots past the codes with a finite distance.
    distances: float32 like indices (the ops' distance: squared Euclidean, 1 - cosine, or -dot), NaN
        where the index is -1; None for sampled codes.
    """

    codes: torch.Tensor
    indices: torch.Tensor
    distances: torch.Tensor | None


def code_counts(indices: torch.Tensor, keep: torch.Tensor | None, num_codes: int) -> torch.Tensor:
    """Per-code counts (H, K) float32 of indices (H, N) int64, skipping -1 and keep False."""
    bins = indices + 1 if keep is None else torch.where(keep, indices + 1, 0)
    counts = torch.zeros(indices.shape[0], num_codes + 1, device=indices.device)
    return counts.scatter_add_(1, bins, torch.ones_like(counts[:, :1]).expand_as(bins))[:, 1:]


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (...) bool: every value of the row is finite. x * 0 is exactly 0 for a finite x
    and NaN for NaN or +-inf, so one multiply and one sum decide it (isfinite().all() costs ~30x
    more on CPU)."""
    return t.mul(0).sum(-1).eq(0)


class TokenQuantizer(nn.Module, abc.ABC):
    """Base of the token quantizers: `num_codebooks` codebooks of `codebook_size` codes of size `dim`.

    Args:
        dim: D, the size of a code and of a token's head.
        codebook_size: K.
        num_codebooks: 1 (shared by every head) or the number of heads H of the tokens.
        metric: "l2", "cosine" (tokens and codes l2-normalised) or "dot" (see `fastvq.nearest_code`).
        precision, backend: passed to every op (see `fastvq.nearest_code`).
        sync_codebook: sum the batch statistics over torch.distributed ranks (one all_reduce).

    Subclasses define `codes`, and `update_` where a batch teaches them more than usage statistics.
    Health buffers (not in the state_dict): usage, perplexity, dead_codes, replaced_codes,
    num_nonfinite_tokens (see `health`).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        *,
        metric: str = "l2",
        precision: str | None = None,
        backend: str = "auto",
        sync_codebook: bool = False,
    ):
        super().__init__()
        check_arguments(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, metric=metric)
        check_backend(backend)
        check_precision(precision)
        self.dim, self.codebook_size, self.num_codebooks = dim, codebook_size, num_codebooks
        self.metric, self.precision, self.backend = metric, precision, backend
        self.sync_codebook = sync_codebook
        self.register_buffer("num_nonfinite_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        for name in ("usage", "perplexity"):
            self.register_buffer(name, torch.full((), float("nan")), persistent=False)
        for name in ("dead_codes", "replaced_codes"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    @abc.abstractmethod
    def codes(self) -> torch.Tensor:
        """The codes, (num_codebooks, K, D) float: what `quantize` scores and returns (with their
        gradient, when they carry one)."""

    def transform_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens as the codes are compared with them: l2-normalised in fp32 for the cosine metric,
        unchanged otherwise. (`quantize` scores cosine without it; losses on the tokens need it.)"""
        return l2norm(tokens) if self.metric == "cosine" else tokens

    # ------------------------------------------------------------------------------------------
    # quantize, decode, score
    # ------------------------------------------------------------------------------------------

    def quantize(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        topk: int | None = None,
        temperature: float = 0.0,
        codes: torch.Tensor | None = None,
    ) -> TokenCodes:
        """Codes for tokens (H, N, D), any float dtype; mask (N,) bool, False: no code (index -1).

        Default: the nearest code. topk=k (1 <= k <= min(16, K)): the k nearest, nearest first.
        temperature > 0: a code drawn from softmax(logits / temperature) (Gumbel-max inside the
        search, seeded from torch's generator), or k codes by Gumbel top-k. codes: the codes to
        search and return, (num_codebooks, K, D) float (default `codes`; a transform of them, for
        one, whose gradient then flows back through it). -> `TokenCodes`.
        """
        heads = self._check_tokens(tokens)
        mask = self._check_mask(mask, tokens)
        codes = self._check_codes(codes)
        rows = self._rows(tokens.detach())
        settings = dict(metric=self.metric, precision=self.precision, backend=self.backend)
        if temperature > 0:
            indices, distances = sample_code(rows, codes.detach(), temperature=temperature, k=topk, **settings), None
        elif topk is None:
            indices, distances = nearest_code(rows, codes.detach(), **settings)
        else:
            indices, distances = topk_codes(rows, codes.detach(), topk, **settings)
        indices = self._from_rows(indices, heads)
        found = (indices if topk is None else indices[..., 0]).ge(0).all(0)  # (N,): every head has a code
        whole = found if mask is None else found & mask
        missing = ~whole.reshape(1, -1, *([1] * (indices.dim() - 2)))
        indices = indices.masked_fill(missing, -1)
        if distances is not None:
            distances = self._from_rows(distances, heads).masked_fill(missing, float("nan"))
        return TokenCodes(self._lookup(tokens, codes, indices), indices, distances)

    def _check_codes(self, codes: torch.Tensor | None) -> torch.Tensor:
        """codes, or `codes` for None; a float tensor shaped as `codes`."""
        if codes is None:
            return self.codes
        expected = (self.num_codebooks, self.codebook_size, self.dim)
        if not isinstance(codes, torch.Tensor) or not codes.is_floating_point() or tuple(codes.shape) != expected:
            raise ValueError(f"codes must be a float tensor of shape {expected}, got {describe(codes)}")
        return codes

    def _lookup(self, tokens: torch.Tensor, codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Codes (H, N, [k,] D) fp32 of indices (H, N[, k]): a gather whose gradient reaches only
        `codes`; rows with index -1 get the token."""
        heads, x = tokens.shape[0], tokens.detach().float()
        if indices.dim() == 2:
            chosen = lookup_codes(self._rows(x), codes, self._rows(indices), backend=self.backend, check_indices=False)
            return self._from_rows(chosen, heads)
        k = indices.shape[-1]  # top-k: one row per (token, candidate)
        x = x.unsqueeze(2).expand(-1, -1, k, -1).flatten(1, 2)
        chosen = lookup_codes(
            self._rows(x), codes, self._rows(indices.flatten(1, 2)), backend=self.backend, check_indices=False
        )
        return self._from_rows(chosen, heads).unflatten(1, (-1, k))

    def codes_from_indices(self, indices: torch.Tensor, *, check_indices: bool = True) -> torch.Tensor:
        """indices (H, N[, k]), any integer dtype, -1 for none -> codes (H, N, [k,] D), zeros for -1,
        differentiable in `codes`. check_indices: verify [-1, K) (one host sync; off for indices
        from `quantize`)."""
        if not is_integer_tensor(indices) or indices.dim() < 2:
            raise TypeError(f"indices must be an integer tensor (H, N[, k]), got {describe(indices)}")
        self._check_heads(indices.shape[0], "indices")
        if check_indices:
            check_index_range(indices, self.codebook_size, bound="codebook_size")
        indices = indices.long()
        codes, safe = self.codes, indices.clamp_min(0)
        if self.num_codebooks == 1:
            chosen = codes[0][safe]
        else:
            chosen = codes[
                torch.arange(indices.shape[0], device=indices.device).view(-1, *[1] * (indices.dim() - 1)), safe
            ]
        return chosen.masked_fill((indices < 0).unsqueeze(-1), 0.0)

    def cross_entropy(
        self, tokens: torch.Tensor, targets: torch.Tensor, *, codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token cross-entropy (H, N) fp32 of softmax over the code logits of tokens (H, N, D)
        against target codes (H, N) int64 in [-1, K) (-1: 0), by an online log-sum-exp;
        differentiable in tokens and codes. codes: the codes to score (default `codes`; pass a
        clone when `update_` will change them in place before the backward)."""
        heads = self._check_tokens(tokens)
        if not is_integer_tensor(targets) or targets.shape != tokens.shape[:2]:
            raise ValueError(
                f"targets must be an integer tensor of shape {tuple(tokens.shape[:2])}, got {describe(targets)}"
            )
        codes = self.codes if codes is None else codes
        loss = code_cross_entropy(
            self._rows(tokens),
            codes,
            self._rows(targets.long()),
            metric=self.metric,
            precision=self.precision,
            backend=self.backend,
        )
        return self._from_rows(loss, heads)

    # ------------------------------------------------------------------------------------------
    # statistics
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def observe_(self, tokens: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Record a batch's code usage and non-finite tokens (see `health`) without changing the
        codes: tokens (H, N, D), indices (H, N) int64 (-1: none), mask (N,) bool or None."""
        rows, keep, num_nonfinite = self._usable_rows(tokens, mask)
        self._batch_statistics_(
            rows, self._rows(self._check_indices(indices, tokens)), keep, num_nonfinite, with_sums=False
        )

    def update_(self, tokens: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Learn from a batch: tokens (H, N, D) in any float dtype, their codes indices (H, N) int64
        (-1: none), mask (N,) bool or None. Codes trained by gradient descent learn nothing here:
        the base records the batch's statistics (`observe_`); `Codebook` takes an EMA step."""
        self.observe_(tokens, indices, mask)

    def _batch_statistics_(
        self,
        rows: torch.Tensor | None,
        indices: torch.Tensor,
        keep: torch.Tensor,
        num_nonfinite: torch.Tensor,
        *,
        with_sums: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-code counts (C, K) fp32 of the kept rows (C, M) and, with_sums, their sums (C, K, D)
        fp32 (else None; mapped by `_code_space_sums`), summed over ranks in one all_reduce that
        also carries the non-finite count; records usage, perplexity, unused codes and
        `num_nonfinite_tokens`."""
        if with_sums:
            counts, sums = code_stats(
                rows, indices, self.codebook_size, mask=keep, backend=self.backend, check_indices=False
            )
            sums = self._code_space_sums(counts, sums)
        else:
            counts, sums = code_counts(indices, keep, self.codebook_size), None
        num_nonfinite = num_nonfinite.float().reshape(1)
        if self.sync_codebook and distributed.is_distributed():
            distributed.all_reduce_sum_(*(t for t in (counts, sums, num_nonfinite) if t is not None))
        self.num_nonfinite_tokens.add_(num_nonfinite[0].long())
        self.usage.copy_((counts > 0).float().mean())
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        self.perplexity.copy_(torch.exp(-torch.special.xlogy(probs, probs).sum(-1)).mean())
        self.dead_codes.copy_((counts == 0).sum())
        return counts, sums

    def _code_space_sums(self, counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """This rank's per-code sums of tokens (C, K, D) fp32 as the codes learn from them, given
        their counts (C, K): unchanged here; a subclass whose search sees transformed codes maps
        them back into the codes' space."""
        return sums

    def health(self) -> dict[str, torch.Tensor]:
        """Codebook health of the last batch given to `update_` / `observe_`, as 0-d device tensors
        (no host sync to compute; reading one syncs).

        usage: fraction of codes chosen by at least one token of the batch (all ranks when synced).
        perplexity: exp(entropy) of the batch's code frequencies (mean over codebooks); K is uniform use.
        dead_codes: codes no token of the batch chose; with dead-code replacement (`Codebook`), codes
            below its threshold after the EMA step (before replacement).
        replaced_codes: codes replaced by batch tokens in that step.
        nonfinite_tokens: unmasked tokens left out of the statistics for a NaN/inf value, in total.
        NaN before the first batch.
        """
        return {
            "usage": self.usage,
            "perplexity": self.perplexity,
            "dead_codes": self.dead_codes,
            "replaced_codes": self.replaced_codes,
            "nonfinite_tokens": self.num_nonfinite_tokens,
        }

    # ------------------------------------------------------------------------------------------
    # canonical tokens <-> the rows the ops see
    # ------------------------------------------------------------------------------------------

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """(H, N, ...) per head -> rows (C, M, ...) of the C codebooks: unchanged with one codebook
        per head; token-major (1, N * H, ...) with one codebook shared by H > 1 heads."""
        if self.num_codebooks > 1 or t.shape[0] == 1:
            return t
        return t.transpose(0, 1).reshape(1, -1, *t.shape[2:])

    def _from_rows(self, r: torch.Tensor, heads: int) -> torch.Tensor:
        """Inverse of `_rows`: rows (C, M, ...) -> (H, N, ...)."""
        if self.num_codebooks > 1 or heads == 1:
            return r
        return r.reshape(-1, heads, *r.shape[2:]).transpose(0, 1)

    def _usable_rows(
        self, tokens: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows of tokens, rows of the unmasked tokens finite in every head (C, M) bool, the number
        of unmasked tokens with a non-finite value () float32)."""
        heads = self._check_tokens(tokens)
        mask = self._check_mask(mask, tokens)
        finite = finite_rows(tokens).all(0)
        usable, bad = (finite, ~finite) if mask is None else (finite & mask, ~finite & mask)
        return self._rows(tokens), self._row_mask(usable, heads), bad.sum().float()

    def _row_mask(self, mask: torch.Tensor | None, heads: int) -> torch.Tensor | None:
        """A per-token mask (N,) -> the same for every row of the token, (C, M)."""
        return None if mask is None else self._rows(mask.expand(heads, -1))

    def _check_heads(self, heads: int, name: str) -> None:
        if self.num_codebooks > 1 and heads != self.num_codebooks:
            raise ValueError(
                f"{name} must have one head per codebook (num_codebooks={self.num_codebooks}) in dim 0, got {heads}"
            )

    def _check_tokens(self, tokens) -> int:
        """tokens must be float (H, N, D=dim); returns H."""
        if (
            not isinstance(tokens, torch.Tensor)
            or not tokens.dtype.is_floating_point
            or tokens.dim() != 3
            or tokens.shape[-1] != self.dim
        ):
            raise ValueError(f"tokens must be a floating-point tensor (H, N, D={self.dim}), got {describe(tokens)}")
        self._check_heads(tokens.shape[0], "tokens")
        return tokens.shape[0]

    @staticmethod
    def _check_mask(mask, tokens: torch.Tensor) -> torch.Tensor | None:
        if mask is not None and (
            not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != tokens.shape[1:2]
        ):
            raise ValueError(f"mask must be a bool tensor of shape ({tokens.shape[1]},), got {describe(mask)}")
        return mask

    @staticmethod
    def _check_indices(indices, tokens: torch.Tensor) -> torch.Tensor:
        if not is_integer_tensor(indices) or indices.shape != tokens.shape[:2]:
            raise ValueError(
                f"indices must be an integer tensor of shape {tuple(tokens.shape[:2])}, got {describe(indices)}"
            )
        return indices.long()


class LearnedCodebook(TokenQuantizer):
    """A token quantizer whose codes are one parameter, `weight` (num_codebooks, K, D) fp32, trained
    by gradient descent through any loss on `quantize`'s codes, `cross_entropy` or `codes` (the
    codebook of a learnable VQ layer, or of IBQ with the "dot" metric). Initialised like
    `Codebook` (Kaiming-uniform; l2-normalised for the cosine metric). `update_` only records
    usage statistics. Arguments as `TokenQuantizer`.
    """

    def __init__(self, dim: int, codebook_size: int, num_codebooks: int = 1, **settings):
        super().__init__(dim, codebook_size, num_codebooks, **settings)
        weight = nn.init.kaiming_uniform_(torch.empty(num_codebooks, codebook_size, dim))
        self.weight = nn.Parameter(l2norm(weight) if self.metric == "cosine" else weight)

    @property
    def codes(self) -> torch.Tensor:
        return self.weight
