"""What the soft-op tests share: the tolerance rule and the cases.

Tolerance rule (flash-attention's): the ops compute their logits and sums in fp32, so an output's
largest error against the dense float64 oracle (`fastvq.ops.naive`) must stay within FACTOR
times the largest error of the same dense formulas run in fp32 on the same inputs (PyTorch's own
fp32 error there), plus a floor of a few fp32 ulps of the output's scale; an output the op returns in
a 16-bit dtype also gets that dtype's rounding of each value. NaNs must sit exactly where the
oracle has them. FACTOR is 8: the ops sum in tiles and chunks of D, not as one dense matmul, and at
temperature 0.01 that order's rounding is multiplied by 100 (measured: the torch backend up to 3x,
the Triton interpreter up to 5x the dense fp32 error, about 1e-6 of gradients of scale 0.06); the
bugs these tests exist for give errors orders of magnitude larger.
"""

import torch
from conftest import case

FACTOR = 8.0
FLOOR = 8 * 2.0**-24

CASES = [
    case(H=1, shared=False, N=70, K=130, D=8),  # several code tiles and token tiles
    case(H=2, shared=True, N=33, K=300, D=20),  # a shared codebook, few tokens: split over codes
    case(H=2, shared=False, N=5, K=200, D=70),  # one codebook per head; D streamed in chunks (exact products)
]


def assert_close_to_oracle(name: str, got: torch.Tensor, want: torch.Tensor, dense32: torch.Tensor) -> None:
    """got (the op's output) against want (the float64 oracle) and dense32 (the oracle's formulas in
    fp32), by the rule of the module docstring; the message says which tensor, by how much, where."""
    rounding = torch.finfo(got.dtype).eps / 2 if got.dtype in (torch.float16, torch.bfloat16) else 0.0
    got, want, dense32 = got.detach().cpu().double(), want.detach().cpu(), dense32.detach().cpu().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), (
        f"{name}: NaN at {got.isnan().nonzero()[:4].tolist()}, expected at {nan.nonzero()[:4].tolist()}"
    )
    got, want, dense32 = got[~nan], want[~nan], dense32[~nan]
    if want.numel() == 0:
        return
    fp32_error = (dense32 - want).abs().max().item()
    tol = FACTOR * fp32_error + FLOOR * want.abs().max().item()
    err = (got - want).abs()
    bad = err > tol + rounding * want.abs()
    assert not bad.any(), (
        f"{name}: error {err.max().item():.3g} above tolerance {tol:.3g} (dense fp32 error "
        f"{fp32_error:.3g}) at flat indices {bad.nonzero()[:4].flatten().tolist()}"
    )
