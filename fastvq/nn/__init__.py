"""Layers on the fused ops: `VectorQuantize`, `ResidualVQ` and `GroupedResidualVQ` (drop-ins for
vector-quantize-pytorch 1.32.0), the EMA `Codebook` (k-means init, dead codes, health), the
collectives that keep it in sync, and `CodeHead` (an output layer over codes without logits)."""

from .code_head import CodeHead
from .codebook import Codebook
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = ["CodeHead", "Codebook", "GroupedResidualVQ", "LossBreakdown", "ResidualVQ", "VectorQuantize"]
