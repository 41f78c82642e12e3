"""`FSP`: finite scalar perturbation (arXiv:2602.17133), a drop-in for vector-quantize-pytorch
1.32.0's: same constructor arguments and defaults, outputs, methods and state_dict keys.

Each value is mapped to (0, 1) by a CDF activation and quantized to the midpoint of one of L equal
bins; in training a fraction 1 - quantize_rate of the values is instead perturbed within its bin.
A norm loss pulls the batch moments of the pre-activation values towards a preset's targets.
fastvq runs the activation, the bins and the moments in fp32 (fp64 for fp64 input) and computes
indices exactly (`fastvq.nn.scalar_codes`); 1.32.0 runs them in the input dtype, whose bf16 index
sum merges codes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .arguments import check_arguments, describe
from .fsq import math_dtype
from .projection import project
from .scalar_codes import (
    checked_levels,
    index_dtype,
    indices_of_levels,
    indices_to_level_indices,
    level_indices_to_indices,
    mixed_radix_basis,
)

SQRT2 = math.sqrt(2.0)
UNIFORM_STD = 0.28867513459481287
"""sqrt(1 / 12): the standard deviation of U(0, 1), so that codes (q - 0.5) / UNIFORM_STD have unit variance."""

CDF_ACTIVATIONS = {
    "tanh": (lambda z: (torch.tanh(z) + 1.0) / 2.0, lambda p: torch.arctanh(p * 2.0 - 1.0)),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (lambda z: (1.0 + torch.erf(z / SQRT2)) / 2.0, lambda p: torch.erfinv(2.0 * p - 1.0) * SQRT2),
    "laplace": (
        lambda z: 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-torch.abs(z)))),
        lambda p: -torch.sign(p - 0.5) * torch.log(1.0 - 2.0 * torch.abs(p - 0.5)),
    ),
    "cauchy": (lambda z: torch.arctan(z) / torch.pi + 0.5, lambda p: torch.tan((p - 0.5) * torch.pi)),
}
"""name -> (CDF activation (-inf, inf) -> (0, 1), its inverse)."""

MOMENT_PRESETS = {
    "none": dict(l1_weight=0.0, l2_weight=0.0, l3_weight=0.0, l4_weight=0.0),
    "var": dict(l3_weight=0.0, l4_weight=0.0),
    "kurt": {},
    "var_tanh": dict(l2_target=0.8225, l3_weight=0.0, l4_weight=0.0),
    "var_sigmoid": dict(l2_target=3.29, l3_weight=0.0, l4_weight=0.0),
    "var_laplace": dict(l2_target=2.0, l3_weight=0.0, l4_weight=0.0),
}
"""`VectorNorm.build` presets: changes to VectorNorm's defaults (mean 0, variance 1, skewness 0,
excess kurtosis 0 with weights 0.1, 0.07, 0.06, 0.05)."""


def batch_stats(batch: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, ...]:
    """batch (N, d) -> per-dimension mean, unbiased variance, skewness and excess kurtosis (d,) each."""
    variance, mean = torch.var_mean(batch, dim=0, correction=1)
    z_scores = (batch - mean) / variance.sqrt().clamp_min(eps)
    return mean, variance, z_scores.pow(3).mean(0), z_scores.pow(4).mean(0) - 3.0


class VectorNorm(nn.Module):
    """The norm loss: weighted squared distances of the batch's per-dimension moments (averaged over
    dimensions) from their targets. forward(z (N, d)) -> (loss (), {mean, variance, skewness, kurtosis})."""

    def __init__(
        self,
        l1_target=0.0,
        l1_weight=0.1,
        l2_target=1.0,
        l2_weight=0.07,
        l3_target=0.0,
        l3_weight=0.06,
        l4_target=0.0,
        l4_weight=0.05,
        eps=1e-8,
    ):
        super().__init__()
        self.targets = (l1_target, l2_target, l3_target, l4_target)
        self.weights = (l1_weight, l2_weight, l3_weight, l4_weight)
        self.eps = eps

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        moments = batch_stats(z, self.eps)
        loss = sum(((m - t) ** 2).mean() * w for m, t, w in zip(moments, self.targets, self.weights))
        return loss, dict(zip(("mean", "variance", "skewness", "kurtosis"), moments))

    @classmethod
    def build(cls, name: str) -> VectorNorm:
        """The preset `name` (one of MOMENT_PRESETS)."""
        check_arguments(vector_norm=name)
        return cls(**MOMENT_PRESETS[name])


class FSP(nn.Module):
    """Finite scalar perturbation, as vector-quantize-pytorch 1.32.0's `FSP`.

    forward(z, eps=None): z (..., dim), or (B, dim, ...) with channel_first -> (quantized like z,
    indices z.shape[:-1] (channel-last) int32 (int64 beyond 2^31 - 1 codes; -1 for NaN input),
    norm_loss (), info {"level_indices" (..., d) float, "norm_info", and in training with
    quantize_rate < 1 "p_accept_prob"}). eps (default: the machine epsilon of the fp32/fp64 math)
    keeps activations off 0 and 1.
    """

    def __init__(
        self,
        levels,
        dim=None,
        channel_first=False,
        projection_has_bias=True,
        act_name="tanh",
        quantize_rate=0.0,
        need_inv_act=False,
        vector_norm="var_tanh",
    ):
        super().__init__()
        levels = checked_levels(levels)
        check_arguments(act_name=act_name, quantize_rate=quantize_rate, vector_norm=vector_norm)
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        check_arguments(dim=self.dim)
        self.channel_first = channel_first
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", mixed_radix_basis(levels), persistent=False)
        self.codebook_size = math.prod(levels)
        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
        self.act_name, self.need_inv_act, self.quantize_rate = act_name, need_inv_act, quantize_rate
        self.act_func, self.inv_act_func = CDF_ACTIVATIONS[act_name]
        self.vector_norm = VectorNorm.build(vector_norm)

    def extra_repr(self) -> str:
        return (
            f"levels={self._levels.tolist()}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"act_name={self.act_name!r}, need_inv_act={self.need_inv_act}, quantize_rate={self.quantize_rate}"
        )

    def quantize_act_value(self, act_z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations in [0, 1] -> (their bin midpoints, straight-through gradient; level indices, float)."""
        level_indices = (act_z.clamp_max(1.0 - eps) * self._levels).floor()
        midpoints = (level_indices + 0.5) / self._levels
        return act_z + (midpoints - act_z).detach(), level_indices.detach()

    def level_indices_to_indices(self, level_indices: torch.Tensor) -> torch.Tensor:
        """Level indices (..., d) (integer values, any dtype) -> indices (...), exact."""
        if level_indices.dtype.is_floating_point:
            return indices_of_levels(level_indices, self._basis, self.codebook_size)
        return level_indices_to_indices(level_indices, self._basis).to(index_dtype(self.codebook_size))

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return indices_to_level_indices(indices, self._basis, self._levels)

    def indices_to_act_value(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> bin midpoints (..., d) float32."""
        return (self.indices_to_level_indices(indices).float() + 0.5) / self._levels

    def indices_to_codes(self, indices: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """indices -> the quantized output forward gives in eval (channel-first with channel_first)."""
        codes = self._codes(self.indices_to_act_value(indices), eps)
        codes = project(self.project_out, codes)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def _codes(self, act_values: torch.Tensor, eps: float) -> torch.Tensor:
        if self.need_inv_act:
            return self.inv_act_func(act_values.clamp(eps, 1.0 - eps))
        return (act_values - 0.5) / UNIFORM_STD

    def forward(self, z: torch.Tensor, eps: float | None = None):
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point or z.dim() < 1:
            raise TypeError(f"z must be a floating-point tensor (..., dim), got {describe(z)}")
        if self.channel_first:
            z = z.movedim(1, -1)
        shape = z.shape
        if shape[-1] != self.dim:
            raise ValueError(
                f"z must have dim={self.dim} channels ({'at dim 1' if self.channel_first else 'last'}), "
                f"got shape {tuple(shape)}"
            )
        projected = project(self.project_in, z.reshape(-1, self.dim))
        x = projected.to(math_dtype(projected.dtype))
        eps = eps or torch.finfo(x.dtype).eps
        norm_loss, norm_info = self.vector_norm(x)
        act_x = self.act_func(x)
        q_act, level_indices = self.quantize_act_value(act_x, eps)
        info = {}
        if self.training and self.quantize_rate < 1.0:
            q_act, info["p_accept_prob"] = self._perturb(act_x, q_act)
        if self.need_inv_act:
            q_x = self.inv_act_func(q_act.clamp(eps, 1.0 - eps))
            q_x = x + (q_x - x).detach()
        else:
            q_x = (q_act - 0.5) / UNIFORM_STD
        indices = self.level_indices_to_indices(level_indices).reshape(shape[:-1])
        out = project(self.project_out, q_x.to(projected.dtype)).reshape(shape)
        if self.channel_first:
            out = out.movedim(-1, 1)
        info = {"level_indices": level_indices.reshape(*shape[:-1], -1), "norm_info": norm_info, **info}
        return out, indices, norm_loss, info

    def _perturb(self, act_x: torch.Tensor, q_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training with quantize_rate < 1: each value is, with probability 1 - quantize_rate, its
        activation moved by U(-1, 1) / (2 L) (kept when that leaves (0, 1)) instead of its bin
        midpoint (the same draws as 1.32.0). -> (values, the fraction of moves kept)."""
        proposal = act_x + 1.0 / (self._levels * 2) * (torch.rand_like(act_x) * 2.0 - 1.0)
        accept = (proposal > 0.0) & (proposal < 1.0)
        perturbed = torch.where(accept, proposal, act_x)
        keep = torch.rand_like(q_act) > self.quantize_rate
        return torch.where(keep, perturbed, q_act), accept.float().mean()
