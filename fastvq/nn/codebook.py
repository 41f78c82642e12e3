"""EMA codebook: state, k-means initialisation, EMA statistics and dead-code replacement.

`Codebook` holds the buffers of vector-quantize-pytorch's `EuclideanCodebook` under the same names,
so `VectorQuantize.state_dict()` has the same keys (`_codebook.initted`, `_codebook.cluster_size`,
`_codebook.embed_avg`, `_codebook.embed`). Every update is built on the fused ops: per-code
counts and sums come from `code_stats` (no one-hot), searches from `nearest_code` (no N x K).
Rows are canonical, (H, N, D) with H the number of codebooks (see `fastvq.ops.functional`). The
codebook owns the metric, precision and backend: the layer calls every op through it.

Statistics are fp32 whatever the input dtype. Rows with a non-finite value never reach them
(callers pass them as not kept and report how many there were in `num_nonfinite_tokens`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..ops.backend import check_backend
from ..ops.functional import check_precision, code_cross_entropy, code_stats, lookup_codes, sample_code
from . import distributed
from .kmeans import kmeans, l2norm, sample_rows

EmaWeight = torch.Tensor | float | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def code_counts(indices: torch.Tensor, keep: torch.Tensor | None, num_codes: int) -> torch.Tensor:
    """Per-code counts (H, K) float32 of indices (H, N) int64, skipping -1 and keep False."""
    bins = indices + 1 if keep is None else torch.where(keep, indices + 1, 0)
    counts = torch.zeros(indices.shape[0], num_codes + 1, device=indices.device)
    return counts.scatter_add_(1, bins, torch.ones_like(counts[:, :1]).expand_as(bins))[:, 1:]


class Codebook(nn.Module):
    """State and updates of H codebooks of K codes of size D, kept by exponential moving average.

    Buffers (state_dict): initted () bool, cluster_size (H, K) fp32, embed_avg (H, K, D) fp32,
    embed (H, K, D) fp32 (an nn.Parameter when `learnable_codebook`). Not in the state_dict:
    num_nonfinite_tokens () int64 and the health tensors read by `health()`. Casting the module
    (`.to(torch.bfloat16)`, `.half()`) moves the buffers but keeps them fp32.
    """

    def __init__(self, dim: int, codebook_size: int, num_codebooks: int = 1, *, kmeans_init: bool = False,
                 kmeans_iters: int = 10, sync_kmeans: bool = True, decay: float = 0.8, eps: float = 1e-5,
                 threshold_ema_dead_code: float = 0, sync_codebook: bool = False,
                 learnable_codebook: bool = False, ema_update: bool = True, manual_ema_update: bool = False,
                 use_cosine_sim: bool = False, precision: str | None = None, backend: str = "auto"):
        super().__init__()
        check_backend(backend)
        check_precision(precision)
        self.codebook_size, self.num_codebooks, self.dim = codebook_size, num_codebooks, dim
        self.kmeans_iters, self.sync_kmeans, self.sync_codebook = kmeans_iters, sync_kmeans, sync_codebook
        self.decay, self.eps, self.threshold_ema_dead_code = decay, eps, threshold_ema_dead_code
        self.learnable_codebook, self.ema_update, self.manual_ema_update = (learnable_codebook, ema_update,
                                                                            manual_ema_update)
        self.use_cosine_sim, self.precision, self.backend = use_cosine_sim, precision, backend

        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(num_codebooks, codebook_size, dim))
            if use_cosine_sim:
                embed = l2norm(embed)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)

        self.register_buffer("num_nonfinite_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        for name in ("usage", "perplexity"):
            self.register_buffer(name, torch.full((), float("nan")), persistent=False)
        for name in ("dead_codes", "replaced_codes"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64), persistent=False)
        self._init_pending: bool | None = None  # host copy of `not initted`; None: read it once
        self._pending_counts: torch.Tensor | None = None  # accum_ema_update statistics
        self._pending_sums: torch.Tensor | None = None

    @property
    def metric(self) -> str:
        return "cosine" if self.use_cosine_sim else "l2"

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """l2-normalise (cosine codebooks) or return x unchanged."""
        return l2norm(x) if self.use_cosine_sim else x

    def _apply(self, fn, recurse=True):
        """Module.to / .half() / .bfloat16() move the buffers but keep the EMA state in fp32."""
        before = {name: buf for name, buf in self._buffers.items()
                  if buf is not None and buf.is_floating_point()}
        super()._apply(fn, recurse)
        for name, buf in before.items():
            moved = self._buffers[name]
            if moved.dtype != buf.dtype:
                self._buffers[name] = buf.to(device=moved.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_pending = None  # `initted` may have changed

    # ------------------------------------------------------------------------------------------
    # ops on the codes (the only place the layer's metric, precision and backend reach the ops)
    # ------------------------------------------------------------------------------------------

    def search(self, x: torch.Tensor, *, temperature: float = 0.0, topk: int | None = None) -> torch.Tensor:
        """Codes for the rows of x (H, N, D), never building an N x K tensor (`sample_code`, which
        decides between plain search, top-k and sampling).

        Default: the nearest code, (H, N) int64. temperature > 0: a code drawn from
        softmax(logits / temperature) by Gumbel-max inside the search. topk: the k nearest codes,
        nearest first, (H, N, k), or with temperature > 0 the k codes of Gumbel top-k. Index -1
        marks rows with no finite logit.
        """
        return sample_code(x, self.embed.detach(), temperature=temperature, k=topk, metric=self.metric,
                           precision=self.precision, backend=self.backend)

    def lookup(self, rows: torch.Tensor, embed: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Code rows (H, M, [k,] D) fp32 of `embed` (this codebook, detached or not) for indices
        (H, M[, k]): a gather whose gradient reaches only embed (rows are detached)."""
        x = rows.detach().float()
        if indices.dim() == 2:
            return lookup_codes(x, embed, indices, backend=self.backend, check_indices=False)
        k = indices.shape[-1]
        flat = x.unsqueeze(2).expand(-1, -1, k, -1).reshape(x.shape[0], -1, x.shape[-1])
        codes = lookup_codes(flat, embed, indices.reshape(indices.shape[0], -1), backend=self.backend,
                             check_indices=False)
        return codes.unflatten(1, (-1, k))

    def cross_entropy(self, rows: torch.Tensor, embed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-row cross-entropy (H, M) fp32 of the code logits of rows (H, M, D) under `embed`
        against target codes (H, M) int64 (-1 ignored: 0); differentiable in rows and embed."""
        return code_cross_entropy(rows, embed, targets, metric=self.metric, precision=self.precision,
                                  backend=self.backend)

    # ------------------------------------------------------------------------------------------
    # k-means initialisation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_embed_(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Initialise the codebook by k-means on rows of x (H, N, D) if not yet `initted`.

        Uses the finite rows where keep (H, N) is True. Runs in training and eval (as
        vector-quantize-pytorch). A batch with no usable row for some codebook leaves the codebook
        uninitialised (with a warning) until the next batch.
        """
        if self._init_pending is None:
            self._init_pending = not bool(self.initted)  # one host sync, then cached
        if not self._init_pending:
            return
        valid = torch.isfinite(x).all(-1)
        if keep is not None:
            valid &= keep
        sync = self.sync_codebook and self.sync_kmeans and distributed.is_distributed()
        num_valid = valid.sum(1).float()
        if sync:
            distributed.all_reduce_sum_(num_valid)
        if bool((num_valid == 0).any()):
            warnings.warn("k-means init received no finite, unmasked vector for some codebook; the "
                          "codebook stays uninitialised until a later batch", RuntimeWarning, stacklevel=3)
            return
        if bool((num_valid < self.codebook_size).any()):
            warnings.warn(f"k-means init received {int(num_valid.min())} vectors for a codebook of "
                          f"{self.codebook_size} codes: some initial means are duplicates",
                          RuntimeWarning, stacklevel=3)
        means, counts = kmeans(x, valid, self.codebook_size, self.kmeans_iters, metric=self.metric, sync=sync,
                               precision=self.precision, backend=self.backend)
        self.embed_avg.copy_(means * counts.unsqueeze(-1))
        self.cluster_size.copy_(counts)
        self.update_ema()
        self.initted.fill_(True)
        self._init_pending = False

    # ------------------------------------------------------------------------------------------
    # EMA
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_(self, x: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor,
                num_nonfinite: torch.Tensor, *, ema_update: bool | None = None, weight: EmaWeight = None,
                accumulate: bool = False) -> None:
        """One EMA step on a batch (what vector-quantize-pytorch does after each training forward).

        x (H, N, D) codebook-space rows, any float dtype; indices (H, N) int64 (-1: skip); keep (H, N)
        bool, False for masked and non-finite rows; num_nonfinite () float32, the tokens left out
        for non-finite values (added to `num_nonfinite_tokens`).
        weight: scales the EMA rate per code, a float, a (K,) or (H, K) tensor, or a callable
        (sums (H, K, D), counts (H, K)) -> weight. accumulate: store the statistics and add them
        to the next step's instead of updating (accum_ema_update).

        Per-code counts and sums come from one fused `code_stats` call and, under torch.distributed
        with `sync_codebook`, one all_reduce (the non-finite count travels with them). Then
        cluster_size and embed_avg move toward them at rate (1 - decay) * weight, embed is recomputed
        (unless ema_update is off or manual) and dead codes are replaced.
        """
        ema_update = self.ema_update if ema_update is None else ema_update
        counts, sums = self._batch_statistics_(x, indices, keep, num_nonfinite,
                                               with_sums=bool(ema_update or self.threshold_ema_dead_code))
        if sums is None:
            return
        if callable(weight):
            weight = weight(sums, counts)
        if accumulate:
            self._pending_counts = counts if self._pending_counts is None else self._pending_counts + counts
            self._pending_sums = sums if self._pending_sums is None else self._pending_sums + sums
            return
        if self._pending_counts is not None:
            counts, sums = counts + self._pending_counts, sums + self._pending_sums
            self._pending_counts = self._pending_sums = None
        rate = self._ema_rate(weight)
        self.cluster_size.lerp_(counts, rate)
        self.embed_avg.lerp_(sums, rate if isinstance(rate, float) else rate.unsqueeze(-1))
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        self.expire_codes_(x, keep)

    @torch.no_grad()
    def observe_(self, indices: torch.Tensor, keep: torch.Tensor, num_nonfinite: torch.Tensor) -> None:
        """Record a batch's usage and non-finite tokens without updating the codebook (a frozen
        codebook); indices, keep (H, N), num_nonfinite () as `update_`."""
        self._batch_statistics_(None, indices, keep, num_nonfinite, with_sums=False)

    def _batch_statistics_(self, x: torch.Tensor | None, indices: torch.Tensor, keep: torch.Tensor,
                           num_nonfinite: torch.Tensor, *,
                           with_sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-code counts (H, K) fp32 of the kept rows, and with_sums their sums (H, K, D) fp32
        (else None), summed over ranks in one all_reduce that also carries the non-finite count;
        records usage, perplexity and `num_nonfinite_tokens`."""
        if with_sums:
            counts, sums = code_stats(x, indices, self.codebook_size, mask=keep, backend=self.backend,
                                      check_indices=False)
        else:
            counts, sums = code_counts(indices, keep, self.codebook_size), None
        num_nonfinite = num_nonfinite.float().reshape(1)
        if self.sync_codebook and distributed.is_distributed():
            distributed.all_reduce_sum_(*(t for t in (counts, sums, num_nonfinite) if t is not None))
        self.num_nonfinite_tokens.add_(num_nonfinite[0].long())
        self.record_usage_(counts)
        return counts, sums

    def _ema_rate(self, weight) -> float | torch.Tensor:
        """(1 - decay) * weight: a float, or an (H, K) / (1, K) tensor."""
        if weight is None:
            weight = 1.0
        if not isinstance(weight, torch.Tensor):
            return (1.0 - self.decay) * float(weight)
        shape = (self.num_codebooks, self.codebook_size)
        if weight.dim() == 1:
            weight = weight.unsqueeze(0)
        if weight.dim() != 2 or weight.shape[1] != shape[1] or weight.shape[0] not in (1, shape[0]):
            raise ValueError(f"ema_update_weight must be a float, a tensor of shape ({shape[1]},) or "
                             f"{shape}, or a callable returning one; got shape {tuple(weight.shape)}")
        return (1.0 - self.decay) * weight.to(self.cluster_size)

    @torch.no_grad()
    def update_ema(self) -> None:
        """embed = embed_avg / Laplace-smoothed cluster_size (l2-normalised for cosine codebooks)."""
        total = self.cluster_size.sum(dim=-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        # .data: EMA writes stay invisible to autograd graphs that saved the codebook (as 1.32.0)
        if self.use_cosine_sim:
            self.embed.data.copy_(l2norm(self.embed_avg / smoothed.unsqueeze(-1)))
        else:
            torch.div(self.embed_avg, smoothed.unsqueeze(-1), out=self.embed.data)

    # ------------------------------------------------------------------------------------------
    # dead codes
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Replace codes whose cluster_size is below `threshold_ema_dead_code` by random rows of x.

        x (H, N, D), keep (H, N) bool or None; rows with a non-finite value or keep False are never
        drawn. Training mode only. Replaced codes get cluster_size = threshold and
        embed_avg = row * threshold. With fewer usable rows than dead codes, the lowest-index dead
        codes are replaced now and the others on later steps. Costs one host sync (the number of
        dead codes); under torch.distributed all ranks draw the same rows from all ranks' batches.
        """
        if not self.threshold_ema_dead_code or not self.training:
            return
        dead = self.cluster_size < self.threshold_ema_dead_code
        self.dead_codes.copy_(dead.sum())
        self.replaced_codes.zero_()
        num_dead = int(dead.sum(1).max())
        if num_dead == 0:
            return
        valid = torch.isfinite(x).all(-1)
        if keep is not None:
            valid &= keep
        samples, found = sample_rows(x, valid, num_dead, sync=self.sync_codebook)
        rank = dead.long().cumsum(1) - 1  # position of each dead code among its codebook's dead codes
        replace = dead & (rank < found.unsqueeze(1))
        new = samples.gather(1, rank.clamp(0, num_dead - 1).unsqueeze(-1).expand(-1, -1, samples.shape[-1]))
        new = self.transform_input(new)
        where = replace.unsqueeze(-1)
        self.embed.data.copy_(torch.where(where, new.to(self.embed), self.embed.data))
        self.cluster_size.masked_fill_(replace, float(self.threshold_ema_dead_code))
        self.embed_avg.copy_(torch.where(where, new * self.threshold_ema_dead_code, self.embed_avg))
        self.replaced_codes.copy_(replace.sum())

    # ------------------------------------------------------------------------------------------
    # health
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def record_usage_(self, counts: torch.Tensor) -> None:
        """Usage and perplexity of this batch's code counts (H, K) (device tensors, no sync)."""
        self.usage.copy_((counts > 0).float().mean())
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        self.perplexity.copy_(torch.exp(-torch.special.xlogy(probs, probs).sum(-1)).mean())
        if not self.threshold_ema_dead_code:
            self.dead_codes.copy_((counts == 0).sum())

    def health(self) -> dict[str, torch.Tensor]:
        """Codebook health of the last training step, as 0-d device tensors (no host sync).

        usage: fraction of codes chosen by at least one token of the batch (all ranks when synced).
        perplexity: exp(entropy) of the batch's code frequencies (mean over codebooks); K is uniform use.
        dead_codes: codes below `threshold_ema_dead_code` after the EMA step (before replacement);
            without dead-code replacement, codes no token of the batch chose.
        replaced_codes: codes replaced by batch vectors in that step.
        nonfinite_tokens: tokens left out of the codebook statistics for a NaN/inf value, in total.
        NaN before the first training step.
        """
        return {"usage": self.usage, "perplexity": self.perplexity, "dead_codes": self.dead_codes,
                "replaced_codes": self.replaced_codes, "nonfinite_tokens": self.num_nonfinite_tokens}
