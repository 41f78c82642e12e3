"""Public API: argument errors, backend choice, autograd of the quantize step, torch.library ops."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import backend_cases

import fastvq
from fastvq.ops import common
from fastvq.ops.backend import available_backends, resolve_backend

# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, before anything runs
# ---------------------------------------------------------------------------------------------

X, CB = torch.randn(4, 3), torch.randn(5, 3)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((X.long(), CB), {}, TypeError, r"x must be a floating tensor.*int64"),
        ((X, CB.int()), {}, TypeError, r"codebook must be a floating tensor.*int32"),
        ((X.numpy(), CB), {}, TypeError, r"x must be a torch.Tensor, got ndarray"),
        ((torch.randn(4), CB), {}, ValueError, r"x must have shape \(N, D\) or \(H, N, D\), got \(4,\)"),
        ((X, torch.randn(1, 1, 5, 3)), {}, ValueError, r"codebook must have shape \(K, D\) or \(H, K, D\)"),
        ((X, torch.randn(2, 5, 3)), {}, ValueError, r"x must have shape \(H, N, D\) with H=2; got \(4, 3\)"),
        (
            (torch.randn(3, 4, 3), torch.randn(2, 5, 3)),
            {},
            ValueError,
            r"codebook heads \(2\) must match x heads \(3\)",
        ),
        ((X, torch.randn(5, 4)), {}, ValueError, r"share the last dimension D.*\(4, 3\).*\(5, 4\)"),
        ((X, torch.randn(0, 3)), {}, ValueError, r"codebook is empty.*K >= 1, got \(0, 3\)"),
        ((X, CB.to("meta")), {}, ValueError, r"same device, got cpu and meta"),
        ((X, CB), {"metric": "hamming"}, ValueError, r"metric must be one of \('l2', 'cosine', 'dot'\), got 'hamming'"),
        ((X, CB), {"precision": "fp8"}, ValueError, r"precision must be None or one of .*'fp8'"),
        (
            (X, CB),
            {"backend": "gpu"},
            ValueError,
            r"backend must be one of \('auto', 'torch', 'triton', 'cuda', 'cpu'\), got",
        ),
    ],
)
def test_nearest_code_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvq.nearest_code(*args, **kwargs)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((X, torch.rand(4), 5), {}, TypeError, r"indices must be an integer tensor.*float32"),
        (
            (X, torch.zeros(3, dtype=torch.long), 5),
            {},
            ValueError,
            r"indices must have shape x.shape\[:-1\] = \(4,\), got \(3,\)",
        ),
        ((X, torch.zeros(4, dtype=torch.long), 0), {}, ValueError, r"num_codes must be an int >= 1, got 0"),
        ((X, torch.tensor([0, 1, 5, 2]), 5), {}, ValueError, r"indices must be in \[-1, num_codes=5\).*\[0, 5\]"),
        ((X, torch.tensor([0, -2, 1, 2]), 5), {}, ValueError, r"indices must be in \[-1, num_codes=5\).*\[-2, 2\]"),
        ((X, torch.zeros(4, dtype=torch.long), 5), {"mask": torch.ones(4)}, ValueError, r"mask must be a bool tensor"),
        (
            (X, torch.zeros(4, dtype=torch.long), 5),
            {"mask": torch.ones(3, dtype=torch.bool)},
            ValueError,
            r"mask must be a bool tensor of shape \(4,\)",
        ),
    ],
)
def test_code_stats_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvq.code_stats(*args, **kwargs)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_lookup_codes_checks_the_range(device, backend):
    x, codebook = torch.randn(4, 3, device=device), torch.randn(5, 3, device=device)
    for bad in (5, -5):
        with pytest.raises(ValueError, match=r"indices must be in \[-1, num_codes=5\), got values in"):
            fastvq.lookup_codes(x, codebook, torch.tensor([0, bad, 1, -1], device=device), backend=backend)
    out = fastvq.lookup_codes(x, codebook, torch.tensor([0, 4, 1, -1], device=device), backend=backend)
    assert torch.equal(out[1], codebook[4]) and torch.equal(out[3], x[3])


def test_tf32_rounding_is_to_nearest_ties_away_on_known_bits():
    """tf32 keeps 10 mantissa bits: 1 + 2^-11 is exactly half an ulp and rounds away from zero,
    just below half rounds down, just above rounds up; inf and NaN pass through."""
    values = torch.tensor(
        [1 + 2**-11, -(1 + 2**-11), 1 + 2**-11 - 2**-23, 1 + 2**-11 + 2**-23, 1 + 3 * 2**-11, float("inf"), 3.0]
    )
    want = torch.tensor([1 + 2**-10, -(1 + 2**-10), 1.0, 1 + 2**-10, 1 + 2 * 2**-10, float("inf"), 3.0])
    assert torch.equal(common.round_operand(values, "tf32"), want)
    assert torch.isnan(common.round_operand(torch.tensor([float("nan")]), "tf32")).all()
    assert torch.equal(common.round_operand(torch.tensor([1 + 2**-9]), "bf16"), torch.tensor([1.0]))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_cosine_of_tiny_vectors_keeps_their_direction(device, backend):
    """Norms are clamped at 1e-12 only: tokens and codes of norm ~1e-8 rank and measure as unit ones."""
    x, codebook = torch.randn(50, 6, device=device), torch.randn(40, 6, device=device)
    want_index, want_distance = fastvq.nearest_code(x, codebook, metric="cosine", backend=backend)
    index, distance = fastvq.nearest_code(x * 1e-8, codebook * 1e-8, metric="cosine", backend=backend)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(distance, want_distance, rtol=1e-5, atol=1e-5)


def test_one_index_range_check_names_the_bound():
    """`check_index_range` (the ops' check, public for the layers) names the bound it was given and
    the values it found, for every integer dtype, uint8 included."""
    from fastvq.ops.functional import check_index_range

    check_index_range(torch.tensor([-1, 0, 4]), 5)
    check_index_range(torch.tensor([0, 255], dtype=torch.uint8), 256, bound="codebook_size")
    with pytest.raises(ValueError, match=r"^indices must be in \[-1, codebook_size=256\), got values in \[3, 256\]$"):
        check_index_range(torch.tensor([3, 256], dtype=torch.int16), 256, bound="codebook_size")
    with pytest.raises(ValueError, match=r"^indices must be in \[-1, num_codes=4\), got values in \[0, 4\]$"):
        check_index_range(torch.tensor([0, 4], dtype=torch.uint8), 4)
    check_index_range(torch.tensor([99], device="meta"), 4)  # no values to check


def test_lookup_codes_checks_indices_as_every_op():
    """The one check of code indices (as code_stats and code_cross_entropy): int64 or int32, shaped like
    x without D; int32 gives the int64 answer."""
    with pytest.raises(TypeError, match=r"indices must be an integer tensor \(int64 or int32\), got dtype torch.int16"):
        fastvq.lookup_codes(X, CB, torch.zeros(4, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"indices must have shape x.shape\[:-1\] = \(4,\), got \(3,\)"):
        fastvq.lookup_codes(X, CB, torch.zeros(3, dtype=torch.int64))
    indices = torch.tensor([0, 4, -1, 2])
    assert torch.equal(fastvq.lookup_codes(X, CB, indices.int()), fastvq.lookup_codes(X, CB, indices))


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------


def test_env_override_and_bad_env(monkeypatch, fresh_backends):
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    fresh_backends.clear_cache()  # FASTVQ_BACKEND is read once
    assert resolve_backend("triton", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTVQ_BACKEND", "gpu")
    fresh_backends.clear_cache()
    with pytest.raises(ValueError, match=r"FASTVQ_BACKEND must be one of .*'gpu'"):
        fastvq.nearest_code(X, CB)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("", False),
        ("off", False),
        (None, False),
    ],
)
def test_interpreter_mode_is_read_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert common.triton_interpret_requested() is expected


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    expected = "cpu" if "cpu" in available_backends("cpu") else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected


def _python(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_import_and_fallback_without_triton():
    """`import fastvq` needs no triton; auto falls back; an explicit triton request says why not."""
    result = _python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastvq\n"
        "print(fastvq.available_backends())\n"
        "print(fastvq.nearest_code(torch.zeros(2, 3), torch.eye(3))[0].tolist())\n"
        "try:\n"
        "    fastvq.nearest_code(torch.zeros(2, 3), torch.eye(3), backend='triton')\n"
        "except RuntimeError as err:\n"
        "    print('error:', err)\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] in ("['torch']", "['torch', 'cpu']") and lines[1] == "[0, 0]"
    assert lines[2].startswith("error: fastvq backend 'triton' cannot run: triton could not be imported")


def test_cpu_kernels_fall_back_to_torch_by_one_rule():
    """Without a C++ compiler: `import fastvq` works, "auto" warns once, saying why, and runs the
    reference; backend='cpu' raises with the same reason."""
    result = _python(
        "import warnings, torch, fastvq\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        print(fastvq.nearest_code(torch.zeros(2, 3), torch.eye(3))[0].tolist())\n"
        "print(len(caught), caught[0].message)\n"
        "try:\n"
        "    fastvq.nearest_code(torch.zeros(2, 3), torch.eye(3), backend='cpu')\n"
        "except RuntimeError as err:\n"
        "    print('error:', err)\n",
        CXX="no-such-compiler-fastvq",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["[0, 0]", "[0, 0]"]
    assert lines[2].startswith("1 fastvq: running the plain-PyTorch CPU path") and "no C++ compiler" in lines[2]
    assert lines[3].startswith(
        "error: fastvq backend 'cpu' cannot run: fastvq's C++ CPU kernels cannot be built: "
        "no C++ compiler ('no-such-compiler-fastvq' is not on PATH"
    )
    assert "backend='torch'" in lines[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for CPU tensors without a GPU")
def test_triton_on_cpu_without_interpreter_says_how():
    result = _python("import torch, fastvq\nfastvq.nearest_code(torch.zeros(2, 3), torch.eye(3), backend='triton')\n")
    assert result.returncode != 0
    assert (
        "backend='triton' needs CUDA tensors (got device 'cpu'); start the process with "
        "TRITON_INTERPRET=1" in result.stderr
    )


def test_cuda_backend_on_cpu_tensors_says_why_and_what_to_use():
    with pytest.raises(
        RuntimeError,
        match=r"fastvq backend 'cuda' cannot run: backend='cuda' needs CUDA tensors "
        r"\(got device 'cpu'\); use backend='torch'",
    ):
        fastvq.nearest_code(X, CB, backend="cuda")
    layer = fastvq.VectorQuantize(dim=3, codebook_size=5, backend="cuda")  # the name is accepted
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        layer(torch.randn(1, 4, 3))


def _swap(monkeypatch, registry, name, **changes):
    """Replace backend `name`'s record for this test (dataclasses.replace of its fields)."""
    monkeypatch.setitem(registry, name, dataclasses.replace(registry[name], **changes))


def test_auto_never_picks_cuda(monkeypatch, fresh_backends):
    """The CUDA backend runs only when named (argument or FASTVQ_BACKEND), even where it is available."""
    gpu = torch.device("cuda")
    registry = fresh_backends.REGISTRY
    for name in ("cuda", "triton"):
        _swap(monkeypatch, registry, name, why_not=lambda device, build: "")
    assert resolve_backend("auto", gpu) == "triton" and resolve_backend("cuda", gpu) == "cuda"
    _swap(monkeypatch, registry, "triton", why_not=lambda device, build: "no triton")
    fresh_backends.clear_cache()
    assert resolve_backend("auto", gpu) == "torch"
    monkeypatch.setenv("FASTVQ_BACKEND", "cuda")
    fresh_backends.clear_cache()
    assert resolve_backend("auto", gpu) == "cuda"


def test_cuda_backend_runs_other_ops_on_triton(monkeypatch, fresh_backends):
    """backend='cuda' has CUDA kernels for CUDA_OPS only; every other op is the Triton backend's,
    and says so when Triton cannot run."""
    from fastvq.ops import cuda

    registry = fresh_backends.REGISTRY
    ops = registry["cuda"].ops
    assert fresh_backends.CUDA_OPS == ("nearest_code", "topk_codes", "code_stats")
    x, codebook = torch.randn(1, 5, 3), torch.randn(1, 7, 3)
    calls = []
    for op in fresh_backends.CUDA_OPS:  # `fastvq.ops.cuda`'s functions, looked up at the call
        monkeypatch.setattr(cuda, op, lambda *args, op=op, **kwargs: calls.append((f"cuda.{op}", args, kwargs)))
        ops[op](x, codebook, metric="dot")
        assert calls[-1] == (f"cuda.{op}", (x, codebook), {"metric": "dot"})
    _swap(monkeypatch, registry, "triton", why_not=lambda device, build: "triton is broken here")
    with pytest.raises(
        RuntimeError, match="backend='cuda' runs sample_code on the Triton backend .* cannot run: triton is broken here"
    ):
        ops["sample_code"](x, codebook, temperature=1.0, seed=3)
    _swap(
        monkeypatch,
        registry,
        "triton",
        why_not=lambda device, build: "",
        ops={"code_cross_entropy": lambda *args, **kwargs: calls.append(("triton", args, kwargs))},
    )
    ops["code_cross_entropy"](x, codebook, "indices", metric="cosine")
    assert calls[-1] == ("triton", (x, codebook, "indices"), {"metric": "cosine"})


def test_import_builds_nothing():
    result = _python(
        "import sys, torch, fastvq\n"
        "fastvq.nearest_code(torch.zeros(2, 3), torch.eye(3))\n"
        "print('fastvq.ops.cuda' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# autograd of the quantize step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("heads,shared", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_gradients_match_autograd_through_the_reference(device, backend, heads, shared, x_dtype):
    """Straight-through to x; the codebook gets per-code sums of output gradients (as autograd
    through a plain gather gives)."""
    x = torch.randn(heads, 37, 10, device=device).to(x_dtype).requires_grad_()
    codebook = torch.randn(1 if shared else heads, 23, 10, device=device, requires_grad=True)
    x.grad = None
    quantized, indices, _ = fastvq.quantize(x, codebook, backend=backend)
    grad = torch.randn_like(quantized)
    quantized.backward(grad)

    ref_x = x.detach().clone().requires_grad_()
    ref_codebook = codebook.detach().clone().requires_grad_()
    codes = common.gather_codes(ref_codebook, indices).to(x_dtype)
    ref_quantized = ref_x + (codes - ref_x).detach() + (codes - codes.detach())
    ref_quantized.backward(grad)

    assert quantized.dtype == x_dtype and torch.equal(quantized, codes.detach())
    assert torch.equal(x.grad, ref_x.grad)
    torch.testing.assert_close(codebook.grad, ref_codebook.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_unassigned_rows_pass_through(device, backend):
    x = torch.randn(5, 4, device=device)
    x[2] = float("nan")
    codebook = torch.randn(7, 4, device=device, requires_grad=True)
    quantized, indices, _ = fastvq.quantize(x, codebook, backend=backend)
    assert indices[2] == -1 and quantized[2].isnan().all()
    quantized.nan_to_num().sum().backward()
    assert torch.isfinite(codebook.grad).all()
    assert codebook.grad.sum(-1).abs().gt(0).sum() == len(set(indices.tolist()) - {-1})


def test_codebook_without_grad_gets_none():
    x = torch.randn(6, 3, requires_grad=True)
    codebook = torch.randn(4, 3)
    quantized, _, _ = fastvq.quantize(x, codebook)
    quantized.sum().backward()
    assert codebook.grad is None and torch.equal(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------------------------------------
# torch.library registration: schema, fake kernels, autograd; torch.compile keeps one graph
# ---------------------------------------------------------------------------------------------


def test_custom_ops_pass_opcheck():
    x, codebook = torch.randn(2, 9, 5), torch.randn(2, 6, 5, requires_grad=True)
    indices = torch.randint(0, 6, (2, 9))
    torch.library.opcheck(torch.ops.fastvq.nearest_code.default, (x, codebook.detach(), "l2", "ieee", "torch"))
    torch.library.opcheck(torch.ops.fastvq.code_stats.default, (x, indices, 6, None, "torch"))
    for k in (0, 3):  # 0: one draw per token, (H, N); k: Gumbel top-k, (H, N, k)
        torch.library.opcheck(
            torch.ops.fastvq.sample_code.default, (x, codebook.detach(), 0.5, 7, k, "l2", "ieee", "torch")
        )
    torch.library.opcheck(torch.ops.fastvq.lookup_codes.default, (x.requires_grad_(), codebook, indices, "torch"))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_torch_compile_fullgraph(device, backend):
    """One graph, with the backend check run once while tracing (it imports modules)."""

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x, codebook):
        quantized, indices, distances = fastvq.quantize(x, codebook, metric="cosine", backend=backend)
        counts, sums = fastvq.code_stats(x.detach(), indices, codebook.shape[0], check_indices=False, backend=backend)
        return (quantized - x).pow(2).mean() + distances.mean(), counts, sums

    x = torch.randn(20, 8, device=device, requires_grad=True)
    codebook = torch.randn(12, 8, device=device, requires_grad=True)
    loss, counts, sums = step(x, codebook)
    loss.backward()
    assert counts.sum() == 20 and x.grad is not None and codebook.grad is not None
    want_loss = fastvq.quantize(x, codebook, metric="cosine")
    torch.testing.assert_close(loss, (want_loss[0] - x).pow(2).mean() + want_loss[2].mean())


def test_cuda_kernels_get_operands_of_one_compiled_dtype():
    """The CUDA kernels are compiled for x and codebook of one dtype among fp32/fp16/bf16: others
    (mixed dtypes, fp64) become fp32 copies, which the reference's fp32 math sees identically."""
    from fastvq.ops.cuda._launch import kernel_operands

    half, bf16, double = torch.randn(3).half(), torch.randn(3).bfloat16(), torch.randn(3).double()
    same = kernel_operands(half, half.clone())
    assert same[0] is half and same[1].dtype == torch.float16
    mixed = kernel_operands(half, bf16)
    assert [t.dtype for t in mixed] == [torch.float32] * 2 and torch.equal(mixed[0], half.float())
    assert kernel_operands(double)[0].dtype == torch.float32
