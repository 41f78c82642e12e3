"""The parity protocol of test_layer_parity for layers whose forward returns any tuple of tensors,
None and dicts of tensors (the scalar quantizers: FSQ, ResidualFSQ, LatentQuantize, FSP).

A training step on a copy of x: forward (torch's RNG seeded per step, for noise, perturbations and
quantize dropout), backward of sum((out - target)^2) plus every 0-d float output (the losses), an
SGD step on every parameter. After each step every output, the input gradient, every parameter
gradient and the whole state must match the anchor (tolerance of test_layer_parity.close: 1e-5
absolute + 1e-5 relative to the largest magnitude; integers exactly); eval must then be bit-identical.
"""

import torch
from test_layer_parity import close, compare_state


def flat_outputs(value, path="out"):
    """[(path, tensor or None)] for a nested tuple / list / dict of tensors."""
    if isinstance(value, (tuple, list)):
        return [item for i, v in enumerate(value) for item in flat_outputs(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in flat_outputs(value[key], f"{path}[{key!r}]")]
    return [(path, value)]


def train_step(module, x, seed, lr=0.01, **forward_kwargs):
    """(flat outputs detached, x.grad, {name: grad}) of one training step; updates the parameters."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    outputs = module(x, **forward_kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    quantized = outputs[0]
    target = torch.linspace(-1, 1, quantized.numel(), device=quantized.device).view_as(quantized)
    loss = (quantized.float() - target).pow(2).sum()
    for extra in outputs[1:]:
        if isinstance(extra, torch.Tensor) and extra.dim() == 0 and extra.requires_grad:
            loss = loss + extra
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    flat = [(path, t.detach() if isinstance(t, torch.Tensor) else t) for path, t in flat_outputs(outputs)]
    return flat, x.grad, grads


def compare_flat(actual, expected, what):
    assert [path for path, _ in actual] == [path for path, _ in expected], f"{what}: outputs differ in structure"
    for (path, a), (_, e) in zip(actual, expected):
        if e is None or a is None:
            assert a is None and e is None, f"{what} {path}: {a!r} vs {e!r}"
        else:
            close(a, e, f"{what} {path}")


def compare_steps(anchor, ours, inputs, **forward_kwargs):
    """Train both on each input, comparing outputs, gradients and state after every step; then
    ours gets the anchor's state (so that rounding differences do not compound)."""
    ours.load_state_dict(anchor.state_dict())
    anchor.train()
    ours.train()
    for step, x in enumerate(inputs):
        expected_out, expected_grad, expected_grads = train_step(anchor, x, step, **forward_kwargs)
        actual_out, actual_grad, actual_grads = train_step(ours, x, step, **forward_kwargs)
        compare_flat(actual_out, expected_out, f"step {step}")
        if expected_grad is None:
            assert actual_grad is None, f"step {step}: the input gets a gradient only from fastvq"
        else:
            close(actual_grad, expected_grad, f"step {step} input grad")
        assert actual_grads.keys() == expected_grads.keys(), (
            f"step {step}: gradients for {sorted(actual_grads)} vs {sorted(expected_grads)}"
        )
        for name in expected_grads:
            close(actual_grads[name], expected_grads[name], f"step {step} grad of {name}")
        compare_state(anchor, ours, f"after step {step}")
        ours.load_state_dict(anchor.state_dict())


def compare_eval(anchor, ours, x, **forward_kwargs):
    """Eval on identical state: every output bit-identical (shape, dtype and values)."""
    ours.load_state_dict(anchor.state_dict())
    anchor.eval()
    ours.eval()
    with torch.no_grad():
        expected, actual = flat_outputs(anchor(x, **forward_kwargs)), flat_outputs(ours(x, **forward_kwargs))
    assert [p for p, _ in actual] == [p for p, _ in expected]
    for (path, a), (_, e) in zip(actual, expected):
        if e is None:
            assert a is None, f"eval {path}: fastvq returns a tensor where the anchor returns None"
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"eval {path}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        assert torch.equal(a, e), f"eval {path} differs (max {(a.double() - e.double()).abs().max().item():.3g})"


def batches(shape, steps=3, scale=1.5):
    return [torch.randn(shape) * scale for _ in range(steps)]
