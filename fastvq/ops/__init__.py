"""Ops: fused nearest-code search, sampling, top-k, cross-entropy, per-code statistics and the soft ops
over a codebook (entropy, soft straight-through).

`functional` holds the public ops (re-exported by `fastvq`), their argument checks and
`torch.library` custom ops; `backend` is the one place that picks an implementation (a `Backend`
record per backend). The backends: `chunked` (plain PyTorch in tiles, backend="torch": any device,
the fallback), `triton/` (the Triton kernels, one file per kernel family), `cuda/` (launchers of the
CUDA C++ kernels of the top-level `kernels/` folder) and `cpu/` (the C++ CPU search); `jit` is the
build policy of the two C++ extensions. The soft ops (`code_entropy`, `soft_quantize`) have their
public ops in `functional_soft` and their torch backend in `chunked_soft` (the same "torch" backend,
split in two files; the Triton kernels are `triton/code_softmax.py`). `naive` is the dense float64
oracle every backend is tested against, the soft ops included; `common` is the math the backends
share, `philox` the sampling noise stream. Nothing here knows a layer above it. This package imports
nothing by itself, so `import fastvq.ops.chunked` stays free of triton.
"""
