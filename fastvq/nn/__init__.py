"""Layers on the fused ops: `VectorQuantize`, `ResidualVQ` and `GroupedResidualVQ` (drop-ins for
vector-quantize-pytorch 1.32.0) and `CodeHead` (an output layer over codes without logits), built on
the token-level core `TokenQuantizer` (quantize, decode, statistics, health on canonical tokens
(H, N, D)) and its codebooks: the EMA `Codebook` (k-means init, dead codes) and `LearnedCodebook`
(a parameter trained by gradient descent). See docs/layers.md."""

from .code_head import CodeHead
from .codebook import Codebook
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .token_quantizer import LearnedCodebook, TokenCodes, TokenQuantizer
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = ["CodeHead", "Codebook", "GroupedResidualVQ", "LearnedCodebook", "LossBreakdown", "ResidualVQ",
           "TokenCodes", "TokenQuantizer", "VectorQuantize"]
