"""Ops: fused nearest-code search, sampling, top-k, cross-entropy and per-code statistics.

`functional` holds the public ops (re-exported by `fastvq`), their argument checks and
`torch.library` custom ops; `backend` is the one place that picks an implementation; `reference`
is plain PyTorch (the CPU fallback and the oracle); `triton/` holds the Triton kernels, one file per
kernel family; `cuda/` builds and calls the CUDA C++ kernels of the top-level `kernels/` folder;
`common` is the math every implementation shares. The soft ops over a codebook (`code_entropy`,
`soft_quantize`) have their own three files: `functional_soft` (public ops), `reference_soft` (the
torch backend's), `naive_soft` (the dense float64 oracle). Nothing here knows a layer above it.
This package imports nothing by itself, so `import fastvq.ops.reference` stays free of triton.
"""
