"""fastvq: fused vector quantization for VQ-VAE / VQGAN tokenizers.

Ops (each with a Triton kernel and a plain-PyTorch reference, chosen by `backend=`):
    nearest_code(x, codebook)                   -> (indices, distances)
    code_stats(x, indices, num_codes)           -> (counts, sums)
    lookup_codes(x, codebook, indices)          -> quantized (straight-through; codebook grad by scatter)
    quantize(x, codebook)                       -> (quantized, indices, distances)
    topk_codes(x, codebook, k)                  -> (indices, distances) of the k nearest codes
    sample_code(x, codebook, temperature=...)   -> indices drawn by Gumbel-max over the code logits
                                                   (k=... : k codes by Gumbel top-k)
    code_cross_entropy(x, codebook, indices)    -> per-token cross-entropy over the code logits
Layer: VectorQuantize, a drop-in for vector_quantize_pytorch.VectorQuantize (1.32.0).
`import fastvq` needs neither a GPU nor triton.
"""

from ._backend import available_backends
from .functional import (
    code_cross_entropy,
    code_stats,
    lookup_codes,
    nearest_code,
    quantize,
    resolve_precision,
    sample_code,
    topk_codes,
)
from .vector_quantize import LossBreakdown, VectorQuantize

__version__ = "0.1.0"

__all__ = [
    "LossBreakdown", "VectorQuantize", "available_backends", "code_cross_entropy", "code_stats", "lookup_codes",
    "nearest_code", "quantize", "resolve_precision", "sample_code", "topk_codes",
]
