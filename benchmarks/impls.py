"""Everything the benchmark times, each a small function of (shape, dtype, device).

ops (what a call does):
    search  -- nearest code of x (N, D) among codebook (K, D);
    train   -- one training step of a VQ layer (forward, backward, codebook update) on x (1, N, D)
               with a random upstream gradient;
    residual -- the same for a residual quantizer of `stages` stages (EnCodec / DAC shapes);
    fsq     -- forward and backward of a scalar quantizer of the shape's `levels` on x (1, N, D): FSQ
               (one stage, one group), ResidualFSQ (`stages`) or GroupedResidualFSQ (`groups`);
    lfq     -- a training step of LFQ (lookup-free, d = log2 K sign bits, no projections) with its entropy loss
               over all K codes: forward and backward of (quantized . grad + aux loss);
    simvq   -- a training step of SimVQ (codes = a learned linear map of a frozen random codebook; the map
               trained by Adam);
    head    -- a prior's output layer over K codes: mean cross-entropy of (N, D) hidden states against
               targets, forward and backward (fastvq's CodeHead against nn.Linear + F.cross_entropy);
    scaling -- the scaling figure at fixed N and D against K: the search (fastvq's C++ CPU kernel,
               faiss-cpu) and a layer's eval forward (fastvq, vector-quantize-pytorch);
    matmul  -- the dense (N, D) x (D, K) product of the same shape (what the search is measured against);
    ceiling -- the device's own limits: a large square matmul per precision, a device-to-device copy.
roles: "fastvq" (ours, public API only: the torch, triton, cuda and cpu backends), "alternative" (what
users would pick instead: the textbook formula, cdist, torch.compile, vector-quantize-pytorch, taming,
faiss-cpu's exact search on CPU,
flash-kmeans' fused assignment on CUDA), "ceiling".
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import fastvq
from fastvq.models import TamingQuantizer
from fastvq.nn import CodeHead
from fastvq.ops.backend import unavailable_reason
from fastvq.ops.common import triton_interpret_requested

try:
    import vector_quantize_pytorch
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist as vqp_cdist

    VQP_MISSING = ""
except ImportError as err:
    VQP_MISSING = f"vector-quantize-pytorch==1.32.0 not importable ({err})"

try:
    import faiss

    FAISS_MISSING = ""
except ImportError as err:
    FAISS_MISSING = f"faiss-cpu==1.15.1 not importable ({err})"

try:
    from flash_kmeans.assign_euclid_triton import euclid_assign_triton

    FLASH_KMEANS_MISSING = ""
except Exception as err:  # not installed, or its triton import failed
    FLASH_KMEANS_MISSING = f"flash-kmeans==0.3.1 not importable ({err})"

DTYPES = (torch.float32, torch.bfloat16)
TRAIN_OPS = ("train", "residual", "fsq", "simvq", "lfq")  # inputs: (x (1, N, D) requiring grad, upstream gradient)
EMA_DECAY = 0.8  # vector-quantize-pytorch's default, used by both EMA layers
TAMING_BETA = 0.25
TAMING_LR = 1e-4
SCALING_MEM_CAP = 8 << 30
"""The scaling figure runs a measurement only when `estimate_bytes` stays below this (and the run's
limit); above it the record says oom, not run, with the estimate."""


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: N tokens, K codes, D dimensions, the input dtypes it runs in, whether
    the device's matrix runs it without being named in --shapes, and the ops it is measured on;
    residual shapes also give the stages and the codebook dim (projections from D when set); fsq
    shapes give the levels (K = their product), the stages and the groups."""

    name: str
    n: int
    k: int
    d: int
    dtypes: tuple[torch.dtype, ...] = DTYPES
    default: bool = True
    ops: tuple[str, ...] = ("search", "train")
    stages: int = 1
    codebook_dim: int | None = None
    levels: tuple[int, ...] = ()
    groups: int = 1


@dataclass(frozen=True)
class Impl:
    """One competitor. `setup(shape, dtype, device)` returns the callable to time, fed by the
    inputs of `op` (see `make_inputs`). `nk_bytes`: peak extra bytes per (token, code) pair, for the
    out-of-memory estimate made before running; `k_bytes`: bytes per code (and stage and group) that
    do not depend on N (an implicit codebook). `why_not(device)`: '' or why it cannot run there."""

    name: str
    op: str
    role: str
    setup: Callable
    dtypes: tuple[torch.dtype, ...] = DTYPES
    precision: str | None = None
    nk_bytes: float = 0.0
    k_bytes: float = 0.0
    why_not: Callable[[torch.device], str] = lambda device: ""
    compiles: bool = False  # pays a long first-call compilation (skipped by --quick)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def input_bytes(op: str, shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of one input set of `op`."""
    size = dtype.itemsize
    if op == "head":  # hidden states and int64 targets
        return shape.n * (shape.d * size + 8)
    if op in TRAIN_OPS:  # x and its upstream gradient
        return 2 * shape.n * shape.d * size
    return (shape.n + shape.k) * shape.d * size


def make_inputs(op: str, shape: Shape, dtype: torch.dtype, device: torch.device, copies: int) -> list[tuple]:
    """`copies` independent sets of standard-normal inputs, seeded by shape and dtype so that every
    implementation of a shape sees the same data. search / matmul / ceiling: (x (N, D), codebook
    (K, D)); train, residual: (x (1, N, D) requiring grad, upstream gradient like x); head: (hidden
    (N, D) requiring grad, targets (N,) int64)."""
    torch.manual_seed(zlib.crc32(f"{shape.name}:{dtype}".encode()))
    sets = []
    for _ in range(copies):
        if op == "head":
            sets.append(
                (
                    torch.randn(shape.n, shape.d, device=device).to(dtype).requires_grad_(),
                    torch.randint(0, shape.k, (shape.n,), device=device),
                )
            )
        elif op in TRAIN_OPS:
            x = torch.randn(1, shape.n, shape.d, device=device).to(dtype).requires_grad_()
            sets.append((x, torch.randn(1, shape.n, shape.d, device=device).to(dtype)))
        else:
            sets.append(
                (
                    torch.randn(shape.n, shape.d, device=device).to(dtype),
                    torch.randn(shape.k, shape.d, device=device).to(dtype),
                )
            )
    return sets


def initial_codebook(shape: Shape, device: torch.device, stage: int = 0) -> torch.Tensor:
    """The (K, codebook dim) fp32 codebook every layer starts from (the same for all layers of a
    shape); stage q of a residual quantizer gets a fresh one scaled by 2^-q."""
    generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"codebook:{shape.name}:{stage}".encode()))
    codes = torch.randn(shape.k, shape.codebook_dim or shape.d, generator=generator) * 0.5**stage
    return codes.to(device)


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------


def naive_search(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The textbook formula: |x|^2 - 2 x c^T + |c|^2 (an N x K matrix), then argmin."""
    dist = x.pow(2).sum(1, keepdim=True) - 2 * (x @ codebook.T) + codebook.pow(2).sum(1)
    return dist.argmin(1)


def cdist_search(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, codebook).argmin(1)


def vqp_search(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """vector-quantize-pytorch 1.32.0's search as its EuclideanCodebook runs it: its `cdist` on fp32
    copies, argmax of the negated distance (its layer then also builds an N x K one-hot: not counted)."""
    return (-vqp_cdist(x.float()[None], codebook.float()[None])).argmax(-1)[0]


def flash_kmeans_search(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """flash-kmeans 0.3.1's fused assignment kernel (Triton, distance + argmin in one pass), with the
    |x|^2 its API takes computed per call. Its fp32 products run as TF32."""
    rows = x[None]
    return euclid_assign_triton(rows, codebook[None], rows.float().pow(2).sum(-1))[0]


def faiss_search(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """faiss-cpu 1.15.1's exact search, `IndexFlatL2.search(x, 1)` (BLAS products with the argmin
    fused per block), on fp32 copies (FAISS takes fp32 only); building the index is counted."""
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.float().numpy())
    return torch.from_numpy(index.search(x.float().numpy(), 1)[1][:, 0])


def _fastvq_search(backend: str, precision: str | None):
    def setup(shape, dtype, device):
        return functools.partial(fastvq.nearest_code, precision=precision, backend=backend)

    return setup


def _plain(fn):
    return lambda shape, dtype, device: fn


def _compiled(fn):
    return lambda shape, dtype, device: torch.compile(fn)


def _triton_missing(device: torch.device) -> str:
    if triton_interpret_requested():
        return "TRITON_INTERPRET is set: interpreted kernels are not worth timing"
    if unavailable_reason("triton", device):  # not available_backends: on CPU it would build the C++ CPU kernels
        return f"fastvq's Triton backend does not run on {device.type} (needs a CUDA GPU)"
    return ""


def _cuda_missing(device: torch.device) -> str:
    """Why fastvq's CUDA C++ backend is not timed on `device` ('' when it is; building it is part of setup)."""
    if device.type != "cuda":
        return f"fastvq's CUDA backend does not run on {device.type} (needs a CUDA GPU)"
    return unavailable_reason("cuda", device, build=False)


def _tf32_missing(device: torch.device) -> str:
    return "" if device.type == "cuda" else "TF32 is an NVIDIA tensor-core mode"


def _first_reason(*checks: Callable[[torch.device], str]) -> Callable[[torch.device], str]:
    """why_not combining several checks: the first reason found."""
    return lambda device: next((reason for check in checks if (reason := check(device))), "")


def _cpu_kernels_missing(device: torch.device) -> str:
    if "cpu" not in fastvq.available_backends(device):
        return f"fastvq's C++ CPU backend does not run on {device.type} (CPU tensors; needs a C++ compiler and ninja)"
    return ""


_VQP = _first_reason(lambda device: VQP_MISSING)
_FAISS = _first_reason(
    lambda device: FAISS_MISSING, lambda device: "" if device.type == "cpu" else "faiss-cpu runs on CPU tensors"
)
_FLASH_KMEANS = _first_reason(
    lambda device: FLASH_KMEANS_MISSING,
    lambda device: "" if device.type == "cuda" else "flash-kmeans runs on CUDA only",
)


# ---------------------------------------------------------------------------------------------
# train step
# ---------------------------------------------------------------------------------------------


def _train_step(layer: nn.Module, optimizer, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward, backward of (quantized . grad + loss) (a residual quantizer's losses summed), then
    the optimizer step if any (EMA layers update their codebook inside forward)."""
    x.grad = None
    quantized, _, loss = layer(x)
    torch.autograd.backward([quantized, loss.sum()], [grad, None])
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _layer(make: Callable[[Shape], nn.Module], learnable: bool = False):
    def setup(shape, dtype, device):
        layer = make(shape).to(device).train()
        with torch.no_grad():
            layer.codebook.copy_(initial_codebook(shape, device))  # every layer's codebook is a (K, D) view
        optimizer = torch.optim.Adam(layer.parameters(), lr=TAMING_LR) if learnable else None
        return functools.partial(_train_step, layer, optimizer)

    return setup


def _layer_eval(make: Callable[[Shape], nn.Module]):
    """A layer's eval forward (its search and code lookup) on x (N, D) as one (1, N, D) batch; the
    codebook input is not used: the layer searches its own `initial_codebook` of the same size."""

    def setup(shape, dtype, device):
        layer = make(shape).to(device).eval()
        with torch.no_grad():
            layer.codebook.copy_(initial_codebook(shape, device))

        @torch.no_grad()
        def forward(x, codebook):
            return layer(x[None])

        return forward

    return setup


def _residual_layer(cls_of: Callable[[], type], **kwargs):
    """A residual quantizer's training step; every stage starts from `initial_codebook`."""

    def setup(shape, dtype, device):
        layer = (
            cls_of()(
                dim=shape.d,
                num_quantizers=shape.stages,
                codebook_size=shape.k,
                codebook_dim=shape.codebook_dim,
                decay=EMA_DECAY,
                **kwargs,
            )
            .to(device)
            .train()
        )
        with torch.no_grad():
            for stage, vq in enumerate(layer.layers):
                vq.codebook.copy_(initial_codebook(shape, device, stage))
        return functools.partial(_train_step, layer, None)

    return setup


def _scalar_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward and backward of a scalar quantizer (no loss, nothing to update)."""
    x.grad = None
    layer(x)[0].backward(grad)


def _scalar_layer(module_of: Callable[[], object]):
    """The scalar quantizer of an fsq shape from `module_of()` (fastvq or vector_quantize_pytorch), its
    projections in the input dtype (a bf16 model)."""

    def setup(shape, dtype, device):
        module, levels = module_of(), list(shape.levels)
        if shape.groups > 1:
            layer = module.GroupedResidualFSQ(
                dim=shape.d, groups=shape.groups, levels=levels, num_quantizers=shape.stages
            )
        elif shape.stages > 1:
            layer = module.ResidualFSQ(dim=shape.d, levels=levels, num_quantizers=shape.stages)
        else:
            layer = module.FSQ(levels=levels, dim=shape.d)
        return functools.partial(_scalar_step, layer.to(device=device, dtype=dtype).train())

    return setup


def _lfq_layer(cls_of: Callable[[], type]):
    """LFQ's training step over d = log2(K) = D bits (1.32.0's defaults: entropy loss weight 0.1,
    inv_temperature 100); nothing to learn, so no optimizer."""

    def setup(shape, dtype, device):
        layer = cls_of()(dim=shape.d, codebook_size=shape.k).to(device).train()
        return functools.partial(_train_step, layer, None)

    return setup


def _sim_vq_layer(cls_of: Callable[[], type]):
    """SimVQ's training step (and Adam on its map); every layer of a shape starts from the same frozen
    codebook (`initial_codebook`) and the same map."""

    def setup(shape, dtype, device):
        torch.manual_seed(shape.k)
        layer = cls_of()(dim=shape.d, codebook_size=shape.k).to(device).train()
        with torch.no_grad():
            layer.frozen_codebook.copy_(initial_codebook(shape, device))
        optimizer = torch.optim.Adam(layer.parameters(), lr=TAMING_LR)
        return functools.partial(_train_step, layer, optimizer)

    return setup


def _head(make: Callable[[Shape, torch.device], Callable]):
    """Loss + backward of an output layer over K codes; make(shape, device) -> loss(hidden, targets)."""

    def setup(shape, dtype, device):
        loss_of = make(shape, device)

        def step(hidden, targets):
            hidden.grad = None
            loss_of(hidden, targets).backward()

        return step

    return setup


def _fastvq_head(backend: str):
    def make(shape, device):
        head = CodeHead(shape.d, shape.k, backend=backend).to(device)
        return lambda hidden, targets: head.loss(hidden, targets).mean()

    return _head(make)


def _linear_head(shape, device):
    linear = nn.Linear(shape.d, shape.k).to(device)
    return lambda hidden, targets: torch.nn.functional.cross_entropy(linear(hidden), targets)


def _fastvq_layer(backend: str, precision: str | None):
    return _layer(
        lambda s: fastvq.VectorQuantize(
            dim=s.d, codebook_size=s.k, decay=EMA_DECAY, backend=backend, precision=precision
        )
    )


# ---------------------------------------------------------------------------------------------
# dense products and ceilings
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def matmul_precision(precision: str | None):
    """fp32 products in TF32 ("tf32") or exact fp32 ("ieee") inside the block; others unchanged."""
    before = torch.get_float32_matmul_precision()
    if precision in ("tf32", "ieee"):
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def chunk_bytes(device: torch.device) -> int:
    """Largest output block a dense product writes at once (the N x K result is streamed)."""
    return (1 << 30) if device.type == "cuda" else (256 << 20)


def _dense_mm(precision: str):
    """x @ codebook.T in blocks of rows into one reused output block, in `precision`."""

    def setup(shape, dtype, device):
        rows = max(1, min(shape.n, chunk_bytes(device) // (shape.k * dtype.itemsize)))
        out = torch.empty(rows, shape.k, dtype=dtype, device=device)

        def run(x, codebook):
            with matmul_precision(precision):
                for n0 in range(0, shape.n, rows):
                    block = x[n0 : n0 + rows]
                    torch.mm(block, codebook.T, out=out[: block.shape[0]])

        return run

    return setup


def _copy(shape, dtype, device):
    """Device-to-device copy of x into a preallocated tensor."""
    out = torch.empty(shape.n, shape.d, dtype=dtype, device=device)
    return lambda x, codebook: out.copy_(x)


def _dense_mm_impl(op: str, prefix: str, precision: str) -> Impl:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return Impl(
        f"{prefix}[{precision}]",
        op,
        "ceiling",
        _dense_mm(precision),
        dtypes=(dtype,),
        precision=precision,
        why_not=_tf32_missing if precision == "tf32" else _first_reason(),
    )


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

FP32 = (torch.float32,)

IMPLS: list[Impl] = [
    *[
        Impl(
            f"fastvq-triton[{p}]",
            "search",
            "fastvq",
            _fastvq_search("triton", p),
            precision=p,
            dtypes=DTYPES if p in ("ieee", "bf16") else FP32,
            why_not=_first_reason(_triton_missing, *([_tf32_missing] if p == "tf32" else [])),
        )
        for p in ("ieee", "tf32", "bf16", "fp16")
    ],
    *[
        Impl(
            f"fastvq-cuda[{p}]",
            "search",
            "fastvq",
            _fastvq_search("cuda", p),
            precision=p,
            dtypes=DTYPES if p in ("ieee", "bf16") else FP32,
            why_not=_first_reason(_cuda_missing, *([_tf32_missing] if p == "tf32" else [])),
        )
        for p in ("ieee", "tf32", "bf16", "fp16")
    ],
    Impl("fastvq-cpu", "search", "fastvq", _fastvq_search("cpu", None), why_not=_cpu_kernels_missing),
    Impl("fastvq-torch", "search", "fastvq", _fastvq_search("torch", None)),
    Impl("faiss-cpu", "search", "alternative", _plain(faiss_search), why_not=_FAISS),
    Impl("naive", "search", "alternative", _plain(naive_search), nk_bytes=8),
    Impl("cdist", "search", "alternative", _plain(cdist_search), nk_bytes=12),
    Impl("compile(naive)", "search", "alternative", _compiled(naive_search), nk_bytes=8, compiles=True),
    Impl("vqp-cdist", "search", "alternative", _plain(vqp_search), nk_bytes=12, why_not=_VQP),
    *[
        Impl(
            f"flash-kmeans[{p}]",
            "search",
            "alternative",
            _plain(flash_kmeans_search),
            dtypes=(dtype,),
            precision=p,
            why_not=_FLASH_KMEANS,
        )
        for p, dtype in (("tf32", torch.float32), ("bf16", torch.bfloat16))
    ],
    *[_dense_mm_impl("matmul", "dense-mm", p) for p in ("ieee", "tf32", "bf16")],
    Impl("fastvq-layer[triton]", "train", "fastvq", _fastvq_layer("triton", None), why_not=_triton_missing),
    Impl(
        "fastvq-layer[triton,tf32]",
        "train",
        "fastvq",
        _fastvq_layer("triton", "tf32"),
        precision="tf32",
        why_not=_first_reason(_triton_missing, _tf32_missing),
    ),
    Impl("fastvq-layer[cuda]", "train", "fastvq", _fastvq_layer("cuda", None), why_not=_cuda_missing),
    Impl("fastvq-layer[cpu]", "train", "fastvq", _fastvq_layer("cpu", None), why_not=_cpu_kernels_missing),
    Impl("fastvq-layer[torch]", "train", "fastvq", _fastvq_layer("torch", None)),
    Impl(
        "vqp-layer",
        "train",
        "alternative",
        _layer(lambda s: vector_quantize_pytorch.VectorQuantize(dim=s.d, codebook_size=s.k, decay=EMA_DECAY)),
        nk_bytes=28,
        why_not=_VQP,
    ),
    Impl(
        "taming-vq2",
        "train",
        "alternative",
        _layer(lambda s: TamingQuantizer(s.d, s.k, commitment_weight=TAMING_BETA), learnable=True),
        nk_bytes=12,
    ),
    Impl(
        "fastvq-rvq[triton]",
        "residual",
        "fastvq",
        _residual_layer(lambda: fastvq.ResidualVQ, backend="triton"),
        why_not=_triton_missing,
    ),
    Impl(
        "fastvq-rvq[cpu]",
        "residual",
        "fastvq",
        _residual_layer(lambda: fastvq.ResidualVQ, backend="cpu"),
        why_not=_cpu_kernels_missing,
    ),
    Impl("fastvq-rvq[torch]", "residual", "fastvq", _residual_layer(lambda: fastvq.ResidualVQ, backend="torch")),
    Impl(
        "vqp-rvq",
        "residual",
        "alternative",
        _residual_layer(lambda: vector_quantize_pytorch.ResidualVQ),
        nk_bytes=8,
        why_not=_VQP,
    ),  # nk_bytes per stage: measured 3.4 GiB at 8 x 65536 x 1024
    Impl("fastvq-fsq", "fsq", "fastvq", _scalar_layer(lambda: fastvq)),
    # 1.32.0 builds arange(K) int64, (K, d) int64 level indices and a (K, d) fp32 codebook per stage in
    # its constructor: 8 + 12 d bytes a code, bounded here for d <= 16
    Impl(
        "vqp-fsq",
        "fsq",
        "alternative",
        _scalar_layer(lambda: vector_quantize_pytorch),
        k_bytes=8 + 12 * 16,
        why_not=_VQP,
    ),
    *[
        Impl(
            f"fastvq-simvq[{backend}]",
            "simvq",
            "fastvq",
            _sim_vq_layer(lambda b=backend: functools.partial(fastvq.SimVQ, backend=b)),
            why_not=why_not,
        )
        for backend, why_not in (
            ("triton", _triton_missing),
            ("cpu", _cpu_kernels_missing),
            ("torch", lambda device: ""),
        )
    ],
    # 1.32.0's cdist holds N x K fp32 (measured 3.97 bytes per pair at N = 4096, K = 65536 on CPU); it
    # fails on 16-bit input (cdist of a 16-bit x and the fp32 codebook): fp32 only
    Impl(
        "vqp-simvq",
        "simvq",
        "alternative",
        _sim_vq_layer(lambda: vector_quantize_pytorch.SimVQ),
        dtypes=FP32,
        nk_bytes=5,
        why_not=_VQP,
    ),
    Impl("fastvq-lfq", "lfq", "fastvq", _lfq_layer(lambda: fastvq.LFQ)),
    # 1.32.0 holds the N x K distances and their softmax (fp32) and autograd's copies for the backward
    Impl("vqp-lfq", "lfq", "alternative", _lfq_layer(lambda: vector_quantize_pytorch.LFQ), nk_bytes=20, why_not=_VQP),
    Impl("fastvq-head[triton]", "head", "fastvq", _fastvq_head("triton"), why_not=_triton_missing),
    Impl("fastvq-head[torch]", "head", "fastvq", _fastvq_head("torch")),
    Impl("linear+cross_entropy", "head", "alternative", _head(_linear_head), nk_bytes=12),
    # the scaling figure: time and memory against K at fixed N and D (fp32)
    Impl("fastvq-cpu", "scaling", "fastvq", _fastvq_search("cpu", None), dtypes=FP32, why_not=_cpu_kernels_missing),
    Impl("faiss-cpu", "scaling", "alternative", _plain(faiss_search), dtypes=FP32, why_not=_FAISS),
    Impl(
        "fastvq-layer-eval[cpu]",
        "scaling",
        "fastvq",
        _layer_eval(lambda s: fastvq.VectorQuantize(dim=s.d, codebook_size=s.k, backend="cpu")),
        dtypes=FP32,
        why_not=_cpu_kernels_missing,
    ),
    Impl(
        "vqp-layer-eval",
        "scaling",
        "alternative",
        _layer_eval(lambda s: vector_quantize_pytorch.VectorQuantize(dim=s.d, codebook_size=s.k)),
        dtypes=FP32,
        nk_bytes=24,
        why_not=_VQP,
    ),  # its training step measured 24-24.5 bytes per (token, code) pair
]

CEILINGS: list[Impl] = [
    *[_dense_mm_impl("ceiling", "peak-mm", p) for p in ("ieee", "tf32", "bf16")],
    Impl("copy", "ceiling", "ceiling", _copy, dtypes=FP32),
]


def estimate_bytes(impl: Impl, shape: Shape, dtype: torch.dtype, copies: int) -> int:
    """Rough peak memory of one measurement: inputs, N x K temporaries and K-sized tables (per stage
    and group), 1 GiB for the rest."""
    inputs = copies * input_bytes(impl.op, shape, dtype)
    per_code = impl.nk_bytes * shape.n + impl.k_bytes
    return inputs + math.ceil(per_code * shape.k * shape.stages * shape.groups) + (1 << 30)
