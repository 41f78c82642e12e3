"""`CodeHead`: an output layer over K codes (logits = h W^T + b) whose loss and sampling run on the
fused dot-metric ops, so neither ever holds the (N, K) logits.

The bias rides along as an extra feature: h' = [h, 1], W' = [W, b], so h' . w'_k = h . w_k + b_k,
and the ops' gradients reach h, W and b through the concatenation (O((N + K) D) extra memory).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.backend import check_backend
from ..ops.functional import check_precision, code_cross_entropy, nearest_code, sample_code, topk_codes
from .arguments import check_arguments


class CodeHead(nn.Module):
    """Linear output layer over `num_codes` codes, initialised as `nn.Linear(dim, num_codes)`.

    weight (K, dim) and bias (K,) are parameters (bias=False drops it). `backend` and `precision` go
    to the ops (see `fastvq.nearest_code`).
    """

    def __init__(
        self, dim: int, num_codes: int, *, bias: bool = True, backend: str = "auto", precision: str | None = None
    ):
        super().__init__()
        check_arguments(dim=dim, num_codes=num_codes)
        check_backend(backend)
        check_precision(precision)
        self.dim, self.num_codes, self.backend, self.precision = dim, num_codes, backend, precision
        self.weight = nn.Parameter(torch.empty(num_codes, dim))
        self.bias = nn.Parameter(torch.empty(num_codes)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(dim), 1 / math.sqrt(dim))

    def _operands(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden rows (N, dim[+1]), codes (K, dim[+1])) whose dot products are the logits."""
        if hidden.dim() < 1 or hidden.shape[-1] != self.dim:
            raise ValueError(f"hidden must have a last dim of {self.dim}, got shape {tuple(hidden.shape)}")
        rows = hidden.reshape(-1, self.dim)
        if self.bias is None:
            return rows, self.weight
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        return torch.cat([rows, ones], 1), torch.cat([self.weight, self.bias.unsqueeze(1)], 1)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy of softmax(h W^T + b) against targets: hidden (..., dim), targets
        (...) int64 in [-1, K) (-1: ignored, loss 0) -> (...) fp32, differentiable in hidden, W, b."""
        rows, codes = self._operands(hidden)
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
        loss = code_cross_entropy(
            rows, codes, targets.reshape(-1), metric="dot", precision=self.precision, backend=self.backend
        )
        return loss.reshape(targets.shape)

    @torch.no_grad()
    def sample(
        self, hidden: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None
    ) -> torch.Tensor:
        """One code per row of hidden (..., dim) -> (...) int64, drawn from softmax((h W^T + b) / T):
        temperature <= 0 takes the most likely code; top_k (<= 16) draws among the k most likely
        only. seed (int) makes the draw reproducible; None draws it from torch's generator."""
        rows, codes = self._operands(hidden)
        if temperature <= 0:
            indices = nearest_code(rows, codes, metric="dot", precision=self.precision, backend=self.backend)[0]
        elif top_k is None:
            indices = sample_code(
                rows,
                codes,
                temperature=temperature,
                metric="dot",
                seed=seed,
                precision=self.precision,
                backend=self.backend,
            )
        else:
            candidates, distances = topk_codes(
                rows, codes, top_k, metric="dot", precision=self.precision, backend=self.backend
            )
            probs = torch.softmax(-distances / temperature, dim=-1)  # distance = -logit
            generator = None
            if seed is not None:
                generator = torch.Generator(device=probs.device).manual_seed(seed)
            choice = torch.multinomial(probs, 1, generator=generator)
            indices = candidates.gather(1, choice)[:, 0]
        return indices.reshape(hidden.shape[:-1])
