"""The ops do not depend on torch's default dtype: under `torch.set_default_dtype(torch.float64)` (which
some users set for a whole program) every op on every backend returns the documented dtypes and the
same values as under the usual float32 default, forward and backward. The ops' working buffers used
to be allocated in the default dtype, so the torch backend's code_stats raised and other outputs
came back as float64."""

import pytest
import torch
from conftest import backend_cases

import fastvq


def _run_every_op(device: str, backend: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 5, generator=generator, dtype=torch.float32).to(device)
    codebook = torch.randn(2, 11, 5, generator=generator, dtype=torch.float32).to(device)
    targets = torch.tensor([[0, 3, -1, 10, 2, 2, 7], [1, 1, 4, 9, -1, 0, 5]], device=device)
    settings = dict(metric="l2", backend=backend)
    out = {}
    out["nearest"], out["nearest_distance"] = fastvq.nearest_code(x, codebook, **settings)
    out["topk"], out["topk_distance"] = fastvq.topk_codes(x, codebook, 3, **settings)
    out["sample"] = fastvq.sample_code(x, codebook, temperature=0.7, seed=3, **settings)
    out["counts"], out["sums"] = fastvq.code_stats(x, out["nearest"], 11, backend=backend)
    for name, loss_of in {
        "cross_entropy": lambda a, b: fastvq.code_cross_entropy(a, b, targets, **settings),
        "entropy": lambda a, b: fastvq.code_entropy(a, b, temperature=0.5, **settings),
        "soft_quantize": lambda a, b: fastvq.soft_quantize(a, b, temperature=0.5, **settings),
    }.items():
        a, b = x.clone().requires_grad_(), codebook.clone().requires_grad_()
        outputs = loss_of(a, b)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for j, value in enumerate(outputs):
            out[f"{name}_{j}"] = value.detach()
        sum(value.float().sum() for value in outputs if value.is_floating_point()).backward()
        out[f"{name}_x_grad"], out[f"{name}_codebook_grad"] = a.grad, b.grad
    return out


@pytest.mark.parametrize("device,backend", backend_cases())
def test_ops_do_not_depend_on_the_default_dtype(device, backend):
    usual = _run_every_op(device, backend)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        wide = _run_every_op(device, backend)
    finally:
        torch.set_default_dtype(previous)
    assert wide.keys() == usual.keys()
    for name, value in usual.items():
        got = wide[name]
        assert got.dtype == value.dtype and got.shape == value.shape, f"{name}: {got.dtype} {got.shape}"
        assert torch.equal(got.nan_to_num(1234.5), value.nan_to_num(1234.5)), f"{name} differs"
