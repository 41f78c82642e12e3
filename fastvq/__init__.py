"""fastvq: fused vector quantization for VQ-VAE / VQGAN tokenizers.

Ops (each with a Triton kernel and a plain-PyTorch reference, chosen by `backend=`):
    nearest_code(x, codebook)           -> (indices, distances)
    code_stats(x, indices, num_codes)   -> (counts, sums)
    lookup_codes(x, codebook, indices)  -> quantized (straight-through; codebook grad by scatter)
    quantize(x, codebook)               -> (quantized, indices, distances)
`import fastvq` needs neither a GPU nor triton.
"""

from ._backend import available_backends
from .functional import code_stats, lookup_codes, nearest_code, quantize, resolve_precision

__version__ = "0.1.0"

__all__ = ["available_backends", "code_stats", "lookup_codes", "nearest_code", "quantize", "resolve_precision"]
