"""Ops: fused nearest-code search, sampling, top-k, cross-entropy and per-code statistics.

`functional` holds the public ops (re-exported by `fastvq`), their argument checks and
`torch.library` custom ops; `backend` is the one place that picks an implementation (a `Backend`
record per backend). The backends: `chunked` (plain PyTorch in tiles, backend="torch": any device,
the fallback), `triton/` (the Triton kernels, one file per kernel family), `cuda/` (launchers of the
CUDA C++ kernels of the top-level `kernels/` folder) and `cpu/` (the C++ CPU search); `jit` is the
build policy of the two C++ extensions. `naive` is the dense float64 oracle every backend is tested
against; `common` is the math the backends share, `philox` the sampling noise stream. Nothing here
knows a layer above it. This package imports nothing by itself, so `import fastvq.ops.chunked`
stays free of triton.
"""
