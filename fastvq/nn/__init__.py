"""Layers on the fused ops: `VectorQuantize`, `ResidualVQ`, `GroupedResidualVQ`, `SimVQ`, `ResidualSimVQ`,
`RandomProjectionQuantizer`, `HierarchicalVQ` and `Sequential` (drop-ins for vector-quantize-pytorch
1.32.0) and `CodeHead` (an output layer over codes without logits), built on
the token-level core `TokenQuantizer` (quantize, decode, statistics, health on canonical tokens
(H, N, D)) and its codebooks: the EMA `Codebook` (k-means init, dead codes) and `LearnedCodebook`
(a parameter trained by gradient descent). See docs/layers.md."""

from .code_head import CodeHead
from .codebook import Codebook
from .hierarchical_vq import HierarchicalVQ
from .random_projection_quantizer import RandomProjectionQuantizer
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .sequential import Sequential
from .sim_vq import ResidualSimVQ, SimVQ
from .token_quantizer import LearnedCodebook, TokenCodes, TokenQuantizer
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = ["CodeHead", "Codebook", "GroupedResidualVQ", "HierarchicalVQ", "LearnedCodebook", "LossBreakdown",
           "RandomProjectionQuantizer", "ResidualSimVQ", "ResidualVQ", "Sequential", "SimVQ", "TokenCodes",
           "TokenQuantizer", "VectorQuantize"]
