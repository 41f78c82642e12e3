"""The backend records of `fastvq.ops.backend`: one registry, every op in every record, one device
rule, one resolution per (requested name, device), FASTVQ_BACKEND read once."""

import dataclasses
import warnings

import pytest
import torch

import fastvq
from fastvq.ops import chunked, chunked_soft, cpu
from fastvq.ops.backend import (
    ALL_OPS,
    BACKENDS,
    OPS,
    REGISTRY,
    SOFT_OPS,
    available_backends,
    implementation,
    resolve_backend,
)


def _swap(monkeypatch, name, **changes):
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], **changes))


def test_every_backend_is_a_record_of_every_op():
    assert list(REGISTRY) == [name for name in BACKENDS if name != "auto"]
    for name, backend in REGISTRY.items():
        assert backend.name == name and set(backend.ops) == set(ALL_OPS) == set(OPS) | set(SOFT_OPS), name
        assert all(callable(function) for function in backend.ops.values())
    assert all(REGISTRY["torch"].ops[op] is getattr(chunked, op) for op in OPS)
    assert all(REGISTRY[name].ops[op] is getattr(chunked_soft, op) for op in SOFT_OPS for name in ("torch", "cpu"))
    assert (
        REGISTRY["cpu"].ops["nearest_code"] is cpu.nearest_code
        and REGISTRY["cpu"].ops["sample_code"] is chunked.sample_code
    )
    assert implementation("cpu", "topk_codes") is cpu.topk_codes
    assert REGISTRY["torch"].devices is None and REGISTRY["cuda"].devices == {"cuda"}


@pytest.mark.parametrize("op", SOFT_OPS)
def test_cuda_runs_the_soft_ops_on_triton(monkeypatch, op):
    """backend='cuda' has no kernel of the soft ops: it hands them to the Triton backend's record, or
    says why Triton cannot run."""
    x = torch.randn(1, 5, 3)
    _swap(monkeypatch, "triton", why_not=lambda device, build: "", ops={op: lambda *args, **kwargs: (op, args, kwargs)})
    assert REGISTRY["cuda"].ops[op](x, "codebook", metric="dot") == (op, (x, "codebook"), {"metric": "dot"})
    _swap(monkeypatch, "triton", why_not=lambda device, build: "triton is broken here")
    with pytest.raises(
        RuntimeError, match=f"backend='cuda' runs {op} on the Triton backend .* cannot run: triton is broken here"
    ):
        REGISTRY["cuda"].ops[op](x, "codebook")


@pytest.mark.parametrize(
    "name,device,takes", [("cuda", "cpu", "CUDA"), ("cpu", "cuda", "CPU"), ("triton", "meta", "CPU or CUDA")]
)
def test_a_device_a_backend_does_not_take_is_named_with_the_way_out(name, device, takes):
    reason = REGISTRY[name].unavailable_reason(torch.device(device), build=False)
    assert reason == (
        f"backend='{name}' needs {takes} tensors (got device '{device}'); use backend='torch' "
        "(any device) or backend='auto'"
    )
    assert REGISTRY["torch"].unavailable_reason(torch.device(device)) == ""


def test_each_choice_is_resolved_once(monkeypatch, fresh_backends):
    """The reason of a record is asked once per (requested name, device), however many calls follow;
    `clear_cache` forgets it."""
    asked = []
    _swap(monkeypatch, "cpu", why_not=lambda device, build: asked.append(device) or "")
    for _ in range(3):
        assert resolve_backend("cpu", torch.device("cpu")) == "cpu"
        fastvq.nearest_code(torch.randn(4, 3), torch.randn(5, 3), backend="cpu")
    assert asked == [torch.device("cpu")]
    fresh_backends.clear_cache()
    resolve_backend("cpu", torch.device("cpu"))
    assert len(asked) == 2


def test_an_explicit_backend_that_cannot_run_raises_its_reason_every_call(monkeypatch, fresh_backends):
    _swap(monkeypatch, "cpu", why_not=lambda device, build: "the compiler is on strike")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="^fastvq backend 'cpu' cannot run: the compiler is on strike$"):
            fastvq.nearest_code(torch.randn(4, 3), torch.randn(5, 3), backend="cpu")
    assert "cpu" not in available_backends("cpu")


def test_auto_on_cpu_warns_once_and_runs_torch(monkeypatch, fresh_backends):
    _swap(monkeypatch, "cpu", why_not=lambda device, build: "no compiler here")
    with pytest.warns(RuntimeWarning, match=r"plain-PyTorch CPU path, slower .*: no compiler here"):
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_fastvq_backend_is_read_once(monkeypatch, fresh_backends):
    """Setting FASTVQ_BACKEND after the first call changes nothing until `clear_cache` (the documented
    way for tests); then it overrides the argument of every call."""
    monkeypatch.delenv("FASTVQ_BACKEND", raising=False)
    cpu_device = torch.device("cpu")
    assert resolve_backend("torch", cpu_device) == "torch"
    monkeypatch.setenv("FASTVQ_BACKEND", "cuda")
    assert resolve_backend("torch", cpu_device) == "torch"
    fresh_backends.clear_cache()
    with pytest.raises(RuntimeError, match="fastvq backend 'cuda' cannot run: backend='cuda' needs CUDA tensors"):
        resolve_backend("torch", cpu_device)
