"""The input and output projections of the quantizer layers, run in their weights' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projections(dim: int, inner_dim: int, *, layernorm: bool = False) -> tuple[nn.Module, nn.Module]:
    """(project_in, project_out): Linear(dim, inner_dim) [+ LayerNorm(inner_dim)] and
    Linear(inner_dim, dim), or two Identity modules when inner_dim == dim (as 1.32.0)."""
    if inner_dim == dim:
        return nn.Identity(), nn.Identity()
    linear = nn.Linear(dim, inner_dim)
    project_in = nn.Sequential(linear, nn.LayerNorm(inner_dim)) if layernorm else linear
    return project_in, nn.Linear(inner_dim, dim)


def project(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """module(t) with t cast to the dtype of module's parameters (t's dtype for a module without
    any), so 16-bit inputs work with fp32 projections and the reverse."""
    param = next(module.parameters(), None)
    return module(t if param is None else t.to(param.dtype))


class CosineSimLinear(nn.Module):
    """x (..., dim_in) -> scale * cos-similarity projection (..., dim_out): x and every column of
    `weight` (dim_in, dim_out) normalised to unit length (1.32.0's LFQ `cosine_sim_project_in`; same
    parameter name and layout, so state_dicts load both ways)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale
