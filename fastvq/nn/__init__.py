"""Layers on the fused ops: `VectorQuantize` (a drop-in for vector-quantize-pytorch 1.32.0), its
EMA `Codebook` (k-means init, dead codes, health) and the collectives that keep it in sync."""

from .codebook import Codebook
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = ["Codebook", "LossBreakdown", "VectorQuantize"]
