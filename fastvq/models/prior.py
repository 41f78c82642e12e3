"""`CodePrior`: a GPT-style causal transformer over a tokenizer's code grid (raster order), the
second stage of VQ-VAE / VQGAN generation. Its output layer is a `fastvq.nn.CodeHead`, so the
training loss and sampling never hold the (B, L, K) logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastvq.nn.code_head import CodeHead
from fastvq.ops.common import MAX_TOPK

from .checks import check_int, check_number, check_seed

MIN_TEMPERATURE = 1e-3
"""The smallest positive sampling temperature: 0 takes the most likely code, and below 1e-3 a draw
is that already for any logit gap of 0.01 or more (exp(-10)), while logits / T near 1e-40 overflow
fp32."""


def check_sampling(temperature, top_k, num_codes: int | None = None) -> None:
    """The one rule of a prior's sampling options: ``temperature`` 0 (the most likely code) or a
    finite number >= MIN_TEMPERATURE; ``top_k`` None (all codes) or an int in [1, min(16, num_codes)]."""
    if temperature != 0:
        check_number("temperature", temperature, minimum=MIN_TEMPERATURE)
    if top_k is not None:
        check_int("top_k", top_k, 1, MAX_TOPK if num_codes is None else min(MAX_TOPK, num_codes))


class _Attention(nn.Module):
    """Multi-head causal self-attention (`scaled_dot_product_attention`), with a key/value cache for
    sampling one position at a time."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim). With a cache (a list, empty at the first position) x holds
        the next position only and attends to every cached one."""
        batch, steps, dim = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=cache is None, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(out.transpose(1, 2).reshape(batch, steps, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


MAX_DEPTH = 1000
"""The most transformer blocks a prior may have (a bound on what a checkpoint can ask to build)."""


class CodePrior(nn.Module):
    """Autoregressive prior p(c_1 .. c_L | class) over code grids of shape `grid` (e.g. (7, 7)).

    Input at position t is the code at t - 1 (a learned start vector, or the class embedding with
    `num_classes`, at t = 0) plus a learned position embedding; pre-norm transformer blocks; a
    `CodeHead` over `num_codes`. `codebook` (K, Dc): the head works in the codebook's space (a
    projection dim -> Dc first) with its weight initialised from the codes.

    forward(codes (B, *grid) int64, labels (B,) int64 or None) -> mean cross-entropy () fp32.
    sample(num, ...) -> codes (num, *grid) int64.
    """

    def __init__(
        self,
        num_codes: int,
        grid: tuple[int, ...] | int,
        *,
        dim: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        codebook: torch.Tensor | None = None,
        backend: str = "auto",
        precision: str | None = None,
    ):
        super().__init__()
        self.grid = (grid,) if isinstance(grid, int) else tuple(grid)
        if not self.grid or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.grid):
            raise ValueError(f"grid must be a positive int or a tuple of them, got {grid!r}")
        check_int("num_codes", num_codes)
        for name, value in (("dim", dim), ("heads", heads)):
            check_int(name, value)
        check_int("depth", depth, 1, MAX_DEPTH)
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads={heads}, got dim={dim}")
        check_number("mlp_ratio", mlp_ratio, minimum=1 / dim)
        check_int("num_classes", num_classes, minimum=0)
        check_number("dropout", dropout, 0.0, 1.0, below_maximum=True)
        self.num_codes, self.num_classes, self.seq_len = num_codes, num_classes, math.prod(self.grid)
        self.code_embed = nn.Embedding(num_codes, dim)
        self.start = nn.Embedding(max(num_classes, 1), dim)  # row 0 is the start vector without classes
        self.pos_embed = nn.Parameter(torch.randn(self.seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        head_dim = dim if codebook is None else codebook.shape[-1]
        self.to_head = nn.Identity() if codebook is None else nn.Linear(dim, head_dim)
        self.head = CodeHead(head_dim, num_codes, backend=backend, precision=precision)
        if codebook is not None:
            if codebook.shape != (num_codes, head_dim):
                raise ValueError(f"codebook must have shape (num_codes={num_codes}, D), got {tuple(codebook.shape)}")
            with torch.no_grad():
                self.head.weight.copy_(codebook)

    def _start(self, batch: int, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if self.num_classes:
            if labels is None or labels.shape != (batch,) or labels.dtype.is_floating_point:
                raise ValueError(
                    f"labels must be an integer tensor of shape ({batch},) for a prior with "
                    f"num_classes={self.num_classes}, got {labels if labels is None else labels.shape}"
                )
            if bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise ValueError(f"labels must be in [0, num_classes={self.num_classes})")
            return self.start(labels.to(device))
        if labels is not None:
            raise ValueError("labels given to a prior without classes (num_classes=0)")
        return self.start.weight[0].expand(batch, -1)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(codes, torch.Tensor)
            or codes.dtype.is_floating_point
            or codes.dim() < 2
            or tuple(codes.shape[1:]) != self.grid
        ):
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(
                f"codes must be an integer tensor of shape (B, {', '.join(map(str, self.grid))}), got {got}"
            )
        flat = codes.reshape(codes.shape[0], -1).long()
        if bool(((flat < 0) | (flat >= self.num_codes)).any()):
            raise ValueError(f"codes must be in [0, num_codes={self.num_codes})")
        return flat

    def hidden_states(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced states (B, L, head dim): position t predicts code t from codes < t."""
        flat = self._check_codes(codes)
        start = self._start(flat.shape[0], labels, flat.device).unsqueeze(1)
        x = torch.cat([start, self.code_embed(flat[:, :-1])], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.to_head(self.norm(x))

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        flat = self._check_codes(codes)
        return self.head.loss(self.hidden_states(codes, labels), flat).mean()

    @torch.no_grad()
    def sample(
        self,
        num: int,
        *,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw `num` code grids position by position (a key/value cache per block): codes
        (num, *grid) int64. temperature 0 takes the most likely code, else draws from
        softmax(logits / temperature) (see `check_sampling`), among the top_k most likely codes
        only when given; seed makes the draw reproducible (one seed per position derived from it)."""
        check_int("num", num)
        check_sampling(temperature, top_k, self.num_codes)
        check_seed(seed)
        device = torch.device(device) if device is not None else self.pos_embed.device
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        caches = [[] for _ in self.blocks]
        x = self._start(num, labels, device).unsqueeze(1)
        codes = torch.empty(num, self.seq_len, dtype=torch.long, device=device)
        for t in range(self.seq_len):
            h = x + self.pos_embed[t]
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache)
            step_seed = int(torch.randint(0, 2**62, (), generator=generator))
            codes[:, t] = self.head.sample(
                self.to_head(self.norm(h))[:, 0], temperature=temperature, top_k=top_k, seed=step_seed
            )
            x = self.code_embed(codes[:, t]).unsqueeze(1)
        return codes.view(num, *self.grid)
