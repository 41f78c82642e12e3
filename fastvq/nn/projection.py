"""The input and output projections of the quantizer layers, run in their weights' dtype."""

from __future__ import annotations

import torch
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
