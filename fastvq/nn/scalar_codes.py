"""Code indices of the scalar quantizers (`FSQ`, `ResidualFSQ`, `LatentQuantize`, `FSP`).

A code is one level index per code dimension, l_i in [0, L_i) for levels (L_0, ..., L_{d-1}), and
its index is the mixed-radix number sum_i l_i * prod_{j<i} L_j (the first dimension varies fastest,
as in vector-quantize-pytorch 1.32.0). The arithmetic here is int64, so an index is exact for any
input dtype and any codebook size up to 2^63 (1.32.0 sums the levels in the input's float dtype and
rounds: bf16 merges neighbouring codes, and fp32 stops being exact beyond 2^24 codes). Nothing here
builds the (prod(levels), d) codebook.
"""

from __future__ import annotations

import math

import torch

from ..ops.functional import check_index_range
from .arguments import check_arguments, describe, is_integer_tensor

INT32_MAX = 2**31 - 1


def checked_levels(levels) -> list[int]:
    """levels as a list of ints >= 2 (ValueError naming the argument otherwise)."""
    check_arguments(levels=levels)
    return list(levels)


def mixed_radix_basis(levels: list[int]) -> torch.Tensor:
    """(d,) int64 place values: basis[i] = prod(levels[:i])."""
    return torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.int64)


def index_dtype(codebook_size: int) -> torch.dtype:
    """The dtype of returned indices: int32 as 1.32.0, int64 when a codebook has more than 2^31 - 1 codes."""
    return torch.int32 if codebook_size <= INT32_MAX else torch.int64


def level_indices_to_indices(level_indices: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """level_indices (..., d), integer-valued (any dtype) -> indices (...) int64, exact."""
    return (level_indices.long() * basis).sum(-1)


def exact_float_dtype(codebook_size: int) -> torch.dtype | None:
    """A float dtype in which every index < codebook_size and every partial sum of one is an exact
    integer (fp32 up to 2^24 codes, fp64 up to 2^53), or None (int64 arithmetic needed)."""
    return torch.float32 if codebook_size <= 2**24 else torch.float64 if codebook_size <= 2**53 else None


def indices_of_levels(level_indices: torch.Tensor, basis: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Float level indices (..., d) (integer values; NaN where the input was NaN) -> indices (...) in
    `index_dtype`, -1 where a level is NaN. Exact: the sum runs on integers in a float type that
    holds them exactly (elementwise, never a matmul, which TF32 could round), else in int64."""
    dtype = exact_float_dtype(codebook_size)
    if dtype is None:
        nan = level_indices.isnan().any(-1)
        indices = level_indices_to_indices(level_indices.nan_to_num(0.0), basis).masked_fill_(nan, -1)
    else:
        indices = (level_indices.to(dtype) * basis.to(dtype)).sum(-1)
        indices = indices.nan_to_num_(-1.0)
    return indices.to(index_dtype(codebook_size))


def indices_to_level_indices(indices: torch.Tensor, basis: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """indices (...) -> level indices (..., d), in int64 arithmetic and returned in indices' integer
    dtype promoted with int32 (as 1.32.0)."""
    out = (indices.long().unsqueeze(-1) // basis) % levels
    return out.to(torch.promote_types(indices.dtype, torch.int32))


def check_code_indices(indices, codebook_size: int) -> None:
    """indices an integer tensor with values in [-1, codebook_size) (-1: no code), else TypeError /
    ValueError naming the argument (one device sync)."""
    if not is_integer_tensor(indices):
        raise TypeError(f"indices must be an integer tensor, got {describe(indices)}")
    check_index_range(indices, codebook_size, bound="codebook_size")
