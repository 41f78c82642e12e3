"""Layers on the fused ops: `VectorQuantize`, `ResidualVQ`, `GroupedResidualVQ`, `SimVQ`, `ResidualSimVQ`,
`RandomProjectionQuantizer`, `HierarchicalVQ`, `Sequential` and `BinaryMapper` (bits to a one-hot over
2^bits codes) (drop-ins for vector-quantize-pytorch 1.32.0), `IBQ` (index backpropagation over a
learned codebook, on the soft ops) and `CodeHead` (an output layer over codes without logits), built on
the token-level core `TokenQuantizer` (quantize, decode, statistics, health on canonical tokens
(H, N, D)) and its codebooks: the EMA `Codebook` (k-means init, dead codes), `TransformedCodebook`
(one searched through a bridge module and affine statistics) and `LearnedCodebook` (a parameter
trained by gradient descent). The scalar quantizers, drop-ins for 1.32.0's too, need no
codebook: `FSQ`, `ResidualFSQ`, `GroupedResidualFSQ`, `LatentQuantize`, `FSP`, `LFQ` (lookup-free,
BSQ), `ResidualLFQ`, `GroupedResidualLFQ` and `EvoLFQ` (an LFQ autoencoder searched by a genetic
algorithm). See docs/layers.md and docs/quantizers.md."""

from .binary_mapper import BinaryMapper
from .code_head import CodeHead
from .codebook import Codebook
from .evo_lfq import EvoLFQ, EvoLFQReturn, EvolveResult
from .fsp import FSP
from .fsq import FSQ
from .hierarchical_vq import HierarchicalVQ
from .ibq import IBQ, IBQLossBreakdown
from .latent_quantize import LatentQuantize
from .lfq import LFQ, LFQLossBreakdown, LFQReturn
from .random_projection_quantizer import RandomProjectionQuantizer
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .sequential import Sequential
from .sim_vq import ResidualSimVQ, SimVQ
from .token_quantizer import LearnedCodebook, TokenCodes, TokenQuantizer
from .transformed_codebook import TransformedCodebook
from .vector_quantize import LossBreakdown, VectorQuantize

__all__ = [
    "BinaryMapper",
    "CodeHead",
    "Codebook",
    "EvoLFQ",
    "EvoLFQReturn",
    "EvolveResult",
    "FSP",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "HierarchicalVQ",
    "IBQ",
    "IBQLossBreakdown",
    "LatentQuantize",
    "LearnedCodebook",
    "LFQ",
    "LFQLossBreakdown",
    "LFQReturn",
    "LossBreakdown",
    "RandomProjectionQuantizer",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualSimVQ",
    "ResidualVQ",
    "Sequential",
    "SimVQ",
    "TokenCodes",
    "TokenQuantizer",
    "TransformedCodebook",
    "VectorQuantize",
]
