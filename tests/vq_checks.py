"""The comparison rules the kernel tests share, against the dense float64 oracle `fastvq.ops.naive`.

Tolerance rule for "nearest": with unit roundoff u of the precision the ranking used (2^-24 for
exact fp32 products, 2^-11 tf32/fp16 operands, 2^-8 bf16 operands) and fp32 accumulation over D
terms, a score's error is at most about 2 (D + 2) u (|x|^2 + max|c|^2) for l2 and 2 (D + 2) u for
cosine. A chosen code must be within that tolerance of the true (float64) minimum distance
(its "regret"), and must be the true argmin wherever the runner-up is farther than the tolerance.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastvq.ops import naive

UNIT_ROUNDOFF = {"ieee": 2.0**-24, "tf32": 2.0**-11, "fp16": 2.0**-11, "bf16": 2.0**-8}


def tolerance(x, codebook, metric, precision):
    """Per-token tolerance (H, N) float64 on distances, from the rule in the module docstring."""
    u, dim = UNIT_ROUNDOFF[precision], x.shape[-1]
    if metric == "cosine":
        return torch.full(x.shape[:2], 4 * (dim + 2) * u, dtype=torch.float64)
    return 4 * (dim + 2) * u * distance_scale(x, codebook, metric)


def distance_scale(x, codebook, metric):
    """(H, N) float64 magnitude that a distance's rounding error is relative to: |x|^2 + max|c|^2
    (l2), |x| max|c| (dot), 1 (cosine)."""
    x_sq, c_sq_max = x.double().pow(2).sum(-1), codebook.double().pow(2).sum(-1).max()
    if metric == "l2":
        return x_sq + c_sq_max
    if metric == "dot":
        return (x_sq * c_sq_max).sqrt()
    return torch.ones_like(x_sq)


def check_nearest(x, codebook, indices, distances, metric, precision):
    """Assert indices/distances (H, N) are a correct nearest-code answer for canonical inputs."""
    x, codebook = x.cpu(), codebook.cpu()
    indices, distances = indices.cpu(), distances.cpu()
    dense = naive.distances(x, codebook, metric)
    tol = tolerance(x, codebook, metric, precision)
    true_min, true_arg = dense.min(-1)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert ((indices >= 0) & (indices < codebook.shape[1])).all(), "index out of range"
    chosen = dense.gather(-1, indices.unsqueeze(-1)).squeeze(-1)
    regret = chosen - true_min
    assert (regret <= tol).all(), (
        f"regret {regret.max().item():.3g} above tolerance at token {tuple(torch.nonzero(regret > tol)[0].tolist())}"
    )
    if dense.shape[-1] > 1:
        runner_up = dense.topk(2, dim=-1, largest=False).values[..., 1]
        clear = (runner_up - true_min) > tol
        wrong = clear & (indices != true_arg)
        assert not wrong.any(), (
            f"{int(wrong.sum())} tokens with a clear nearest code got another, "
            f"first at {tuple(torch.nonzero(wrong)[0].tolist())}"
        )
    # distances are recomputed exactly in fp32 for the chosen code
    err = (distances.double() - chosen).abs()
    dist_tol = 1e-5 * (1 + chosen.abs()) + (
        8 * x.shape[-1] * 2.0**-24 * distance_scale(x, codebook, metric) if metric != "cosine" else 1e-6
    )
    assert (err <= dist_tol).all(), f"distance error {err.max().item():.3g}"


class LargestTensor(TorchDispatchMode):
    """While active, records in `largest` the most elements of any tensor an op returned."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
