"""QINCo implicit neural codebooks (Huijben et al. 2024, arXiv:2401.14732) for `ResidualVQ`
(`implicit_neural_codebook=True`, vector-quantize-pytorch 1.32.0's semantics).

Stage q > 0 of the residual quantizer scores the residual against its codebook as conditioned on
the quantized-so-far output: code k of token n is `mlp(codebook[k], condition[n])`, one code per
(token, code) pair. 1.32.0 builds that (N, K, D) tensor (and the MLP's activations of its size) at
every stage; here the search walks the codes in blocks of (N, block, D), never holding more than
`BLOCK_ELEMENTS` values per activation whatever K is, keeps a running nearest code (first index on
ties) without autograd, and then evaluates the MLP again for the chosen codes only, (N, D), with
autograd: their gradient reaches the MLP, the codebook and the condition exactly as 1.32.0's
one-hot product over the (N, K, D) tensor sends it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.functional import check_index_range
from .gradient_estimators import rotate_to, straight_through
from .losses import commitment_loss, orthogonal_reg_loss
from .token_quantizer import finite_rows
from .vector_quantize import VectorQuantize

BLOCK_ELEMENTS = 1 << 22
"""Values per (N, block, width) activation of the blocked search (16 MiB in fp32): the block of
codes is BLOCK_ELEMENTS // (N * width), at least one code."""


class ImplicitCodebookMLP(nn.Module):
    """1.32.0's `MLP` of an implicit neural codebook stage (same submodules and state_dict keys):
    proj_in Linear(2 dim, dim) on [condition, code], then `depth` residual blocks
    Linear(dim, dim_hidden), SiLU, Linear(dim_hidden, dim); l2-normalised output with l2norm_output.

    `conditioned(codes, condition)` is the MLP on pairs: codes (..., dim) and condition (..., dim),
    broadcast against each other -> (..., dim). The search applies proj_in's two halves separately
    (`condition_term` + `code_term`: condition @ W_c^T + b + code @ W_k^T, the same sum up to
    rounding), so a block of codes costs one (N, dim) and one (block, dim) product there instead of
    an (N, block, 2 dim) concatenation.
    """

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.dim = dim
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim)) for _ in range(depth)
        )
        self.l2norm_output = l2norm_output

    @property
    def width(self) -> int:
        """The widest activation per (token, code) pair: max(dim, dim_hidden)."""
        return max([self.dim] + [block[0].out_features for block in self.layers])

    def condition_term(self, condition: torch.Tensor) -> torch.Tensor:
        """proj_in's condition half with the bias: (..., dim) -> (..., dim)."""
        return F.linear(condition, self.proj_in.weight[:, : self.dim], self.proj_in.bias)

    def code_term(self, codes: torch.Tensor) -> torch.Tensor:
        """proj_in's code half: (..., dim) -> (..., dim)."""
        return F.linear(codes, self.proj_in.weight[:, self.dim :])

    def trunk(self, h: torch.Tensor) -> torch.Tensor:
        """The residual blocks (and l2 normalisation) after proj_in: (..., dim) -> (..., dim)."""
        for block in self.layers:
            h = block(h) + h
        return F.normalize(h, dim=-1) if self.l2norm_output else h

    def conditioned(self, codes: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Codes conditioned on condition: (..., dim) each, broadcast -> (..., dim); proj_in on
        their concatenation, 1.32.0's arithmetic to the bit (the values the layer returns)."""
        return self.trunk(self.proj_in(torch.cat(torch.broadcast_tensors(condition, codes), -1)))

    def forward(self, codes: torch.Tensor, *, condition: torch.Tensor) -> torch.Tensor:
        """1.32.0's dense call: every code for every token. codes (K, dim) or (H, K, dim), condition
        (B, N, dim) or (B, dim) -> (B, N, K, dim) (or (H, B, N, K, dim)). Holds the (N, K, dim)
        tensor: the layers use `conditioned` on the codes they need instead."""
        one_headed = codes.dim() == 2
        heads = codes if not one_headed else codes.unsqueeze(0)
        cond = condition if condition.dim() == 3 else condition.unsqueeze(1)
        out = self.conditioned(heads[:, None, None], cond[None, :, :, None])
        return out[0] if one_headed else out


@torch.no_grad()
def search_conditioned_codes(
    mlp: ImplicitCodebookMLP,
    codebook: torch.Tensor,
    condition: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 0.0,
) -> torch.Tensor:
    """Index of the nearest conditioned code per token (temperature 0), or one drawn from
    softmax(-distance / temperature) by Gumbel-max (1.32.0's stochastic sampling, from torch's
    generator; the same distribution, not the same draws), blocks of codes at a time.

    codebook (K, D), condition and tokens (N, D), float32. Distance as 1.32.0's:
    `F.pairwise_distance(token, mlp(code, condition))`; first index on ties; -1 for a token or
    condition with a non-finite value. -> (N,) int64. Extra memory O(N * block * width), block =
    max(1, BLOCK_ELEMENTS // (N * width)), independent of K.
    """
    num_tokens, num_codes = tokens.shape[0], codebook.shape[0]
    block = max(1, min(num_codes, BLOCK_ELEMENTS // max(1, num_tokens * mlp.width)))
    cond_term, code_term = mlp.condition_term(condition).unsqueeze(1), mlp.code_term(codebook)
    query = tokens.unsqueeze(1)
    best = torch.full((num_tokens,), float("-inf"), device=tokens.device)
    indices = torch.zeros(num_tokens, dtype=torch.long, device=tokens.device)
    for start in range(0, num_codes, block):
        conditioned = mlp.trunk(cond_term + code_term[start : start + block])  # (N, block, D)
        score = -F.pairwise_distance(query, conditioned)
        if temperature > 0:
            score = score / temperature - torch.rand_like(score).log().neg().log()
        score, offset = score.max(-1)
        better = score > best
        best = torch.where(better, score, best)
        indices = torch.where(better, offset + start, indices)
    return indices.masked_fill(~(finite_rows(tokens) & finite_rows(condition)), -1)


def implicit_stage(
    layer: VectorQuantize,
    mlp: ImplicitCodebookMLP,
    residual: torch.Tensor,
    condition: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    sample_codebook_temp: float | None = None,
    freeze_codebook: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stage q > 0 of an implicit neural codebook residual quantizer, as 1.32.0's
    VectorQuantize forward with `codebook_transform_fn=partial(mlp, condition=condition)`.

    layer: the stage (learnable codebook, no EMA, no projections); residual and condition (B, S, D)
    any float dtype; mask (B, S) bool or None; sample_codebook_temp (None: the layer's) applies in
    training with the layer's stochastic_sample_codes. -> quantized (B, S, D) in
    residual's dtype (gradient to residual by the layer's estimator), indices (B, S) int64 (-1:
    masked or non-finite), loss () float32 (commitment and orthogonal terms, 0 in eval). In training
    the stage's usage statistics and dead codes are updated from the residual (unless frozen).
    """
    batch, seq, dim = residual.shape
    z = residual.float()
    token_mask = None if mask is None else mask.reshape(-1)
    quantizer = layer.token_quantizer
    quantizer.init_embed_(z.detach().reshape(1, -1, dim), token_mask)
    codebook, cond = layer.codebook, condition.float().reshape(-1, dim)
    temperature = layer.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
    sampling = layer.training and layer.stochastic_sample_codes and temperature > 0
    with torch.autocast(z.device.type, enabled=False):  # fp32, as 1.32.0's codebook forward
        found = search_conditioned_codes(
            mlp, codebook.detach(), cond.detach(), z.detach().reshape(-1, dim), temperature if sampling else 0.0
        )
        codes = mlp.conditioned(codebook[found.clamp_min(0)], cond)
    codes = torch.where((found >= 0).unsqueeze(-1), codes, z.detach().reshape(-1, dim)).reshape(batch, seq, dim)
    indices = found.reshape(batch, seq)
    if layer.training:
        if freeze_codebook:
            quantizer.observe_(z.detach().reshape(1, -1, dim), found.unsqueeze(0), token_mask)
        else:
            layer.update_indices(z.detach(), indices, mask)
    quantized = codes
    if layer.training and residual.requires_grad and layer.route_gradients_to_input:
        quantized = rotate_to(z, codes) if layer.rotation_trick else straight_through(z, codes)
    quantized = quantized.to(residual.dtype)
    loss = torch.zeros((), device=residual.device).requires_grad_(layer.training)
    if layer.training and layer.commitment_weight > 0:
        commit_codes = codes if not freeze_codebook else codes.detach()
        loss = loss + commitment_loss(commit_codes.unsqueeze(2), z.unsqueeze(2), mask) * layer.commitment_weight
    if layer.training and layer.orthogonal_reg_weight > 0:
        orthogonal = orthogonal_reg_loss(
            quantizer.codes,
            found,
            active_codes_only=layer.orthogonal_reg_active_codes_only,
            max_codes=layer.orthogonal_reg_max_codes,
        )
        loss = loss + orthogonal * layer.orthogonal_reg_weight
    if mask is not None:
        fill = torch.zeros_like(residual) if layer.return_zeros_for_masked_padding else residual
        quantized = torch.where(mask.unsqueeze(-1), quantized, fill)
        indices = indices.masked_fill(~mask, -1)
    return quantized, indices, loss


def conditioned_codes_from_indices(
    layers: nn.ModuleList, mlps: nn.ModuleList, indices: torch.Tensor
) -> list[torch.Tensor]:
    """Each stage's codes of indices (T, stages), -1: none, as `implicit_stage` chose them: stage
    0 from its codebook, stage q > 0 conditioned on the sum of the codes of stages < q (a -1 adds
    zeros). -> one (T, D) tensor per stage, zeros for -1, differentiable in codebooks and MLPs.
    ValueError for an index outside [-1, codebook_size)."""
    stage_codes, total = [], None
    for q, (layer, stage_indices) in enumerate(zip(layers, indices.unbind(-1))):
        check_index_range(stage_indices, layer.codebook_size, bound="codebook_size")
        chosen = layer.codebook[stage_indices.clamp_min(0)]
        if q > 0:
            chosen = mlps[q - 1].conditioned(chosen, total)
        chosen = chosen.masked_fill((stage_indices < 0).unsqueeze(-1), 0.0)
        total = chosen if total is None else total + chosen
        stage_codes.append(chosen)
    return stage_codes
