"""`Sequential`: a drop-in for vector-quantize-pytorch 1.32.0's `Sequential`, modules around exactly
one quantizer, returning the quantizer's extra outputs (indices, losses) after the last module's output.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZER_NAMES = frozenset(
    {
        "VectorQuantize",
        "ResidualVQ",
        "GroupedResidualVQ",
        "RandomProjectionQuantizer",
        "FSQ",
        "LFQ",
        "SimVQ",
        "ResidualSimVQ",
        "ResidualLFQ",
        "GroupedResidualLFQ",
        "ResidualFSQ",
        "GroupedResidualFSQ",
        "FSP",
        "LatentQuantize",
        "HierarchicalVQ",
    }
)
"""The classes 1.32.0's Sequential treats as quantizers (its QUANTIZE_KLASSES), by name."""

QUANTIZER_PACKAGES = ("fastvq", "vector_quantize_pytorch")


def is_quantizer(module: nn.Module) -> bool:
    """Whether module is an instance of (a subclass of) one of QUANTIZER_NAMES of fastvq or
    vector-quantize-pytorch: fastvq's quantizers, 1.32.0's own, and those added later under these names."""
    return any(
        cls.__name__ in QUANTIZER_NAMES and cls.__module__.split(".")[0] in QUANTIZER_PACKAGES
        for cls in type(module).__mro__
    )


class Sequential(nn.Module):
    """Modules applied in order, exactly one of them a quantizer (see `is_quantizer`).

    forward(x, **kwargs): each other module maps x -> x; the quantizer gets x and the keyword
    arguments and returns (x, *rest) (or one tensor: x). Returns (the last module's output, *rest), e.g. (out, indices,
    loss). Modules are kept in `fns`, the state_dict keys of 1.32.0.
    """

    def __init__(self, *fns: nn.Module):
        super().__init__()
        if not all(isinstance(fn, nn.Module) for fn in fns):
            raise TypeError(f"Sequential takes nn.Module arguments, got {[type(fn).__name__ for fn in fns]}")
        found = [type(fn).__name__ for fn in fns if is_quantizer(fn)]
        if len(found) != 1:
            raise ValueError(
                f"Sequential must contain exactly one quantizer (one of {sorted(QUANTIZER_NAMES)}), "
                f"got {len(found)}: {found}"
            )
        self.fns = nn.ModuleList(fns)

    def forward(self, x, **kwargs):
        rest = ()
        for fn in self.fns:
            if is_quantizer(fn):
                out = fn(x, **kwargs)  # a quantizer returning one tensor (RandomProjectionQuantizer) has no rest
                x, rest = (out, ()) if isinstance(out, torch.Tensor) else (out[0], tuple(out[1:]))
            else:
                x = fn(x)
        return (x, *rest)
