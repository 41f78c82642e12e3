"""`Codebook`: the EMA token quantizer (k-means initialisation, EMA statistics, dead-code expiry).

`Codebook` holds the buffers of vector-quantize-pytorch's `EuclideanCodebook` under the same names,
so `VectorQuantize.state_dict()` has the same keys (`_codebook.initted`, `_codebook.cluster_size`,
`_codebook.embed_avg`, `_codebook.embed`). It is a `fastvq.nn.TokenQuantizer`: it quantizes
canonical tokens (H, N, D) with the fused ops, and `update_` takes an EMA step from the per-code
counts and sums of `code_stats` (no one-hot); k-means runs on `nearest_code` (no N x K).

Statistics are fp32 whatever the input dtype. Tokens with a non-finite value never reach them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import distributed
from .arguments import check_arguments
from .kmeans import kmeans, l2norm, sample_rows
from .token_quantizer import TokenQuantizer

EmaWeight = torch.Tensor | float | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


class Codebook(TokenQuantizer):
    """A token quantizer whose codes are kept by exponential moving average of the tokens that
    chose them (vector-quantize-pytorch 1.32.0's `EuclideanCodebook`), with k-means initialisation
    and dead-code replacement.

    Args (beyond `TokenQuantizer`'s dim, codebook_size, num_codebooks, metric, precision, backend,
    sync_codebook): kmeans_init (initialise by k-means on the first batch), kmeans_iters,
    sync_kmeans, decay, eps (Laplace smoothing), threshold_ema_dead_code (0: no replacement),
    learnable_codebook (embed is an nn.Parameter), ema_update (recompute embed from the EMA on
    `update_`), manual_ema_update (leave that to `update_ema()`).

    Buffers (state_dict): initted () bool, cluster_size (H, K) fp32, embed_avg (H, K, D) fp32,
    embed (H, K, D) fp32 (an nn.Parameter when `learnable_codebook`). Casting the module
    (`.to(torch.bfloat16)`, `.half()`) moves the buffers but keeps them fp32.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        *,
        metric: str = "l2",
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        decay: float = 0.8,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0,
        sync_codebook: bool = False,
        learnable_codebook: bool = False,
        ema_update: bool = True,
        manual_ema_update: bool = False,
        precision: str | None = None,
        backend: str = "auto",
    ):
        super().__init__(
            dim,
            codebook_size,
            num_codebooks,
            metric=metric,
            precision=precision,
            backend=backend,
            sync_codebook=sync_codebook,
        )
        check_arguments(decay=decay, eps=eps, threshold_ema_dead_code=threshold_ema_dead_code)
        if kmeans_init:
            check_arguments(kmeans_iters=kmeans_iters)
        self.kmeans_iters, self.sync_kmeans = kmeans_iters, sync_kmeans
        self.decay, self.eps, self.threshold_ema_dead_code = decay, eps, threshold_ema_dead_code
        self.learnable_codebook, self.ema_update = learnable_codebook, ema_update
        self.manual_ema_update = manual_ema_update

        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = self.transform_input(nn.init.kaiming_uniform_(torch.empty(num_codebooks, codebook_size, dim)))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self._init_pending: bool | None = None  # host copy of `not initted`; None: read it once
        self._pending_counts: torch.Tensor | None = None  # accum_ema_update statistics
        self._pending_sums: torch.Tensor | None = None

    @property
    def codes(self) -> torch.Tensor:
        """`embed`, (H, K, D) fp32."""
        return self.embed

    def search_codes(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The codes a batch of tokens (H, N, D) with mask (N,) bool or None is searched against
        (pass them to `quantize`): `codes` here; a subclass may transform them and first learn
        from the batch (`fastvq.nn.TransformedCodebook`)."""
        return self.codes

    def _apply(self, fn, recurse=True):
        """Module.to / .half() / .bfloat16() move the buffers but keep the EMA state in fp32."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
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
    # k-means initialisation
    # ------------------------------------------------------------------------------------------

    def init_embed_(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Initialise the codes by k-means on tokens (H, N, D) if not yet `initted` (mask (N,) bool:
        False tokens are left out, as are rows with a non-finite value).

        Callers run it before `quantize` on every batch, in training and eval (as
        vector-quantize-pytorch); after the first success it costs nothing. A batch with no usable
        row for some codebook leaves the codebook uninitialised (with a warning) until the next.
        """
        with torch.no_grad():
            if self._init_pending is None:
                self._init_pending = not bool(self.initted)  # one host sync, then cached
            if not self._init_pending:
                return
            self._check_tokens(tokens)
            rows, keep = self._rows(tokens), self._row_mask(self._check_mask(mask, tokens), tokens.shape[0])
            valid = torch.isfinite(rows).all(-1)  # k-means leaves out non-finite rows, not their tokens' other heads
            if keep is not None:
                valid &= keep
            sync = self.sync_codebook and self.sync_kmeans and distributed.is_distributed()
            num_valid = valid.sum(1).float()
            if sync:
                distributed.all_reduce_sum_(num_valid)
            if bool((num_valid == 0).any()):
                warnings.warn(
                    "k-means init received no finite, unmasked vector for some codebook; the "
                    "codebook stays uninitialised until a later batch",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            if bool((num_valid < self.codebook_size).any()):
                warnings.warn(
                    f"k-means init received {int(num_valid.min())} vectors for a codebook of "
                    f"{self.codebook_size} codes: some initial means are duplicates",
                    RuntimeWarning,
                    stacklevel=2,
                )
            means, counts = kmeans(
                rows,
                valid,
                self.codebook_size,
                self.kmeans_iters,
                metric=self.metric,
                sync=sync,
                precision=self.precision,
                backend=self.backend,
            )
            self.embed_avg.copy_(means * counts.unsqueeze(-1))
            self.cluster_size.copy_(counts)
            self.update_ema()
            self.initted.fill_(True)
            self._init_pending = False

    # ------------------------------------------------------------------------------------------
    # EMA
    # ------------------------------------------------------------------------------------------

    def update_(
        self,
        tokens: torch.Tensor,
        indices: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        ema_update: bool | None = None,
        weight: EmaWeight = None,
        accumulate: bool = False,
    ) -> None:
        """One EMA step on a batch (what vector-quantize-pytorch does after each training forward).

        tokens (H, N, D) any float dtype, indices (H, N) int64 (-1: skip), mask (N,) bool or None;
        masked tokens and tokens with a non-finite value are left out (the latter counted).
        ema_update: override the module's `ema_update` for this step. weight: scales the EMA rate
        per code, a float, a (K,) or (H, K) tensor, or a callable (sums (H, K, D), counts (H, K))
        -> weight. accumulate: store the statistics and add them to the next step's instead of
        updating (accum_ema_update).

        Per-code counts and sums come from one fused `code_stats` call and, under torch.distributed
        with `sync_codebook`, one all_reduce (the non-finite count travels with them). Then
        cluster_size and embed_avg move toward them at rate (1 - decay) * weight, embed is recomputed
        (unless ema_update is off or manual) and dead codes are replaced.
        """
        with torch.no_grad():
            ema_update = self.ema_update if ema_update is None else ema_update
            rows, keep, num_nonfinite = self._usable_rows(tokens, mask)
            counts, sums = self._batch_statistics_(
                rows,
                self._rows(self._check_indices(indices, tokens)),
                keep,
                num_nonfinite,
                with_sums=bool(ema_update or self.threshold_ema_dead_code),
            )
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
            self._expire_rows_(rows, keep)

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
            raise ValueError(
                f"ema_update_weight must be a float, a tensor of shape ({shape[1]},) or "
                f"{shape}, or a callable returning one; got shape {tuple(weight.shape)}"
            )
        return (1.0 - self.decay) * weight.to(self.cluster_size)

    def update_ema(self) -> None:
        """embed = embed_avg / Laplace-smoothed cluster_size (l2-normalised for the cosine metric)."""
        with torch.no_grad():
            total = self.cluster_size.sum(dim=-1, keepdim=True)
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            # .data: EMA writes stay invisible to autograd graphs that saved the codebook (as 1.32.0)
            if self.metric == "cosine":
                self.embed.data.copy_(l2norm(self.embed_avg / smoothed.unsqueeze(-1)))
            else:
                torch.div(self.embed_avg, smoothed.unsqueeze(-1), out=self.embed.data)

    # ------------------------------------------------------------------------------------------
    # dead codes
    # ------------------------------------------------------------------------------------------

    def expire_codes_(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Replace codes whose cluster_size is below `threshold_ema_dead_code` by random tokens.

        tokens (H, N, D), mask (N,) bool or None; masked tokens and rows with a non-finite value are
        never drawn. Training mode only. Replaced codes get cluster_size = threshold and
        embed_avg = row * threshold. With fewer usable rows than dead codes, the lowest-index dead
        codes are replaced now and the others on later steps. Costs one host sync (the number of
        dead codes); under torch.distributed all ranks draw the same rows from all ranks' batches.
        """
        with torch.no_grad():
            self._check_tokens(tokens)
            self._expire_rows_(self._rows(tokens), self._row_mask(self._check_mask(mask, tokens), tokens.shape[0]))

    def _expire_rows_(self, rows: torch.Tensor, keep: torch.Tensor | None) -> None:
        """`expire_codes_` on the rows (C, M, D) of the codebooks, keep (C, M) bool or None."""
        if not self.threshold_ema_dead_code or not self.training:
            return
        dead = self.cluster_size < self.threshold_ema_dead_code
        self.dead_codes.copy_(dead.sum())
        self.replaced_codes.zero_()
        num_dead = int(dead.sum(1).max())
        if num_dead == 0:
            return
        valid = torch.isfinite(rows).all(-1)
        if keep is not None:
            valid &= keep
        samples, found = sample_rows(rows, valid, num_dead, sync=self.sync_codebook)
        rank = dead.long().cumsum(1) - 1  # position of each dead code among its codebook's dead codes
        replace = dead & (rank < found.unsqueeze(1))
        new = samples.gather(1, rank.clamp(0, num_dead - 1).unsqueeze(-1).expand(-1, -1, samples.shape[-1]))
        new = self.transform_input(new)
        where = replace.unsqueeze(-1)
        self.embed.data.copy_(torch.where(where, new.to(self.embed), self.embed.data))
        self.cluster_size.masked_fill_(replace, float(self.threshold_ema_dead_code))
        self.embed_avg.copy_(torch.where(where, new * self.threshold_ema_dead_code, self.embed_avg))
        self.replaced_codes.copy_(replace.sum())
