"""Sampling batch vectors and k-means, built on `nearest_code` and `code_stats` (never N x K).

Shapes are canonical, as in `fastvq.ops.functional`: x (H, N, D) with one row set per codebook, valid
(H, N) bool marking the rows that may be used (unmasked and finite).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.functional import code_stats, nearest_code
from . import distributed

L2NORM_EPS = 1e-6
"""Norm clamp of the layer's l2 normalisation (cosine codebooks' inputs and codes), as
vector-quantize-pytorch 1.32.0's `l2norm`. Not the ops' `fastvq.ops.common.COSINE_NORM_EPS`."""


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """t / max(|t|, L2NORM_EPS) over the last dim (the normalisation of vector-quantize-pytorch), in
    fp32 whatever t's dtype (a 16-bit norm overflows from |t| ~ 256 in fp16)."""
    return F.normalize(t.float(), dim=-1, eps=L2NORM_EPS)


def sample_rows(
    x: torch.Tensor, valid: torch.Tensor, num: int, *, sync: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num` rows per head uniformly without replacement from the valid rows.

    Every valid row gets a uniform random key and the rows with the largest keys win, so no host
    sync is needed. With `sync`, each rank offers its best `num` rows and all ranks pick the same
    winners from one all_gather: every rank returns the same rows, drawn from all ranks' batches.

    Returns samples (H, num, D) float32 in draw order and found (H,) int64: how many draws are real
    (min(num, valid rows)); samples past `found` are meaningless.
    """
    heads, n_rows, dim = x.shape
    keys = torch.rand(heads, n_rows, device=x.device).masked_fill_(~valid, -1.0)
    top = min(num, n_rows)
    keys, order = keys.topk(top, dim=1)
    rows = x.gather(1, order.unsqueeze(-1).expand(heads, top, dim)).float()
    if top < num:  # pad with invalid candidates
        keys = F.pad(keys, (0, num - top), value=-1.0)
        rows = F.pad(rows, (0, 0, 0, num - top))
    if sync and distributed.is_distributed():
        merged = distributed.all_gather_rows(torch.cat([keys.unsqueeze(-1), rows], dim=-1))
        keys, order = merged[..., 0].topk(num, dim=1)
        rows = merged[..., 1:].gather(1, order.unsqueeze(-1).expand(heads, num, dim))
    return rows, (keys >= 0).sum(1)


def kmeans(
    x: torch.Tensor,
    valid: torch.Tensor,
    num_clusters: int,
    num_iters: int,
    *,
    metric: str = "l2",
    sync: bool = False,
    precision: str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means per head on the valid rows of x (H, N, D).

    The initial means are distinct random valid rows (repeated cyclically when there are fewer
    rows than clusters). Each iteration assigns rows with `nearest_code` and recomputes the means
    from `code_stats`; a cluster that gets no row keeps its mean. Cosine: means are l2-normalised.
    With `sync`, sampling and statistics span all ranks (one all_reduce per iteration).

    Returns means (H, K, D) float32 and counts (H, K) float32: the rows assigned to each mean in
    the last iteration (before its update). Every head needs at least one valid row.
    """
    samples, found = sample_rows(x, valid, num_clusters, sync=sync)
    draw = torch.arange(num_clusters, device=x.device) % found.clamp_min(1).unsqueeze(1)
    means = samples.gather(1, draw.unsqueeze(-1).expand_as(samples))
    counts = None
    for _ in range(num_iters):
        indices, _ = nearest_code(x, means, metric=metric, precision=precision, backend=backend)
        counts, sums = code_stats(x, indices, num_clusters, mask=valid, backend=backend, check_indices=False)
        if sync and distributed.is_distributed():
            distributed.all_reduce_sum_(counts, sums)
        new_means = sums / counts.clamp_min(1.0).unsqueeze(-1)
        if metric == "cosine":
            new_means = l2norm(new_means)
        means = torch.where((counts == 0).unsqueeze(-1), means, new_means)
    return means, counts
