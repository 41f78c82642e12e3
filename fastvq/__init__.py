"""fastvq: fused vector quantization for VQ-VAE / VQGAN tokenizers.

Ops (each with Triton kernels and a chunked plain-PyTorch twin, chosen by `backend=`):
    nearest_code(x, codebook)                   -> (indices, distances)
    code_stats(x, indices, num_codes)           -> (counts, sums)
    lookup_codes(x, codebook, indices)          -> quantized (straight-through; codebook grad by scatter)
    quantize(x, codebook)                       -> (quantized, indices, distances)
    topk_codes(x, codebook, k)                  -> (indices, distances) of the k nearest codes
    sample_code(x, codebook, temperature=...)   -> indices drawn by Gumbel-max over the code logits
                                                   (k=... : k codes by Gumbel top-k)
    code_cross_entropy(x, codebook, indices)    -> per-token cross-entropy over the code logits
    code_entropy(x, codebook, temperature=...)  -> (per-token entropy, mean distribution over codes)
    soft_quantize(x, codebook, temperature=...) -> (quantized, indices): the hard code's value with the
                                                   softmax's gradient (IBQ's index backpropagation)
    sign_code_entropy(x, scale=..., temperature=...) -> exact per-token entropy over the 2^d sign codes
                                                   (LFQ's codebook) in O(N d)
    sign_code_distribution(x, scale=..., temperature=..., log_clamp_min=...) -> code_entropy's outputs for
                                                   that codebook in O(N 2^(d/2)): LFQ's entropy loss
Layers, drop-ins for vector-quantize-pytorch 1.32.0's: VectorQuantize, ResidualVQ, GroupedResidualVQ,
SimVQ, ResidualSimVQ, RandomProjectionQuantizer, HierarchicalVQ, Sequential; the scalar quantizers
FSQ, ResidualFSQ, GroupedResidualFSQ, LatentQuantize, FSP; lookup-free quantization LFQ (and BSQ),
ResidualLFQ, GroupedResidualLFQ, EvoLFQ.
IBQ: index backpropagation over a learned codebook (SEED-Voken's IndexPropagationQuantize) on the soft ops.
Trained tokenizers: load(run) -> the model of a `fastvq train` run, for model.encode / model.decode.
Packages, imports pointing one way: fastvq.ops < fastvq.nn < fastvq.models < fastvq.app (the
command line). `import fastvq` needs neither a GPU nor triton, and loads neither models nor app.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(
        (
            "code_cross_entropy",
            "code_stats",
            "lookup_codes",
            "nearest_code",
            "quantize",
            "resolve_precision",
            "sample_code",
            "topk_codes",
        ),
        "fastvq.ops.functional",
    ),
    **dict.fromkeys(
        ("code_entropy", "sign_code_distribution", "sign_code_entropy", "soft_quantize"), "fastvq.ops.functional_soft"
    ),
    "available_backends": "fastvq.ops.backend",
    **dict.fromkeys(
        (
            "BinaryMapper",
            "EvoLFQ",
            "FSP",
            "FSQ",
            "GroupedResidualFSQ",
            "GroupedResidualLFQ",
            "GroupedResidualVQ",
            "HierarchicalVQ",
            "IBQ",
            "LatentQuantize",
            "LFQ",
            "LossBreakdown",
            "RandomProjectionQuantizer",
            "ResidualFSQ",
            "ResidualLFQ",
            "ResidualSimVQ",
            "ResidualVQ",
            "Sequential",
            "SimVQ",
            "VectorQuantize",
        ),
        "fastvq.nn",
    ),
    "load": "fastvq.app.state",
}
"""Public names and the module that defines each, imported at first use: `import fastvq.ops.chunked`
then loads no more than it needs (the custom ops' registration imports torch._dynamo, and with it triton)."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastvq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
