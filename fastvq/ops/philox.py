"""The random stream of fastvq's sampling: Philox-4x32-10, the generator of `triton.language.rand`.

`sample_code` perturbs the logit of code k for token n of head h by Gumbel noise -log(-log(u)) with
u = `uniform(seed, (h N + n) K + k)`: one counter per (head, token, code), so a draw depends on the
seed and the inputs only, never on tiles, code splits or the backend. The Triton kernels draw u with
`tl.rand`; this module replays the same stream in PyTorch for the tiled backend and the oracle.
"""

from __future__ import annotations

import torch

_ROUND = (0xD2511F53, 0xCD9E8D57)
_KEY = (0x9E3779B9, 0xBB67AE85)
_LOW32 = 0xFFFFFFFF


def uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform fp32 in [0, 1) for int64 counters `offsets`: Philox-4x32-10 keyed by the 64-bit seed,
    the same stream as `triton.language.rand(seed, offsets)` with int64 offsets (triton 3.6-3.9).

    About 250 integer tensor ops per draw; on CPU they run on chunks of 2^15 counters, which stay in
    cache and below torch's threading threshold (about 10x faster than whole tiles).
    """
    flat = offsets.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=offsets.device)
    chunk = 1 << 15 if offsets.device.type == "cpu" else max(flat.numel(), 1)
    for start in range(0, flat.numel(), chunk):
        out[start : start + chunk] = _philox(seed, flat[start : start + chunk])
    return out.view(offsets.shape)


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values a (held in int64) and a 32-bit constant b,
    without int64 overflow."""
    low_part, high_part = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
    low = low_part + ((high_part & 0xFFFF) << 16)
    return ((high_part >> 16) + (low >> 32)) & _LOW32, low & _LOW32


def _philox(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    c0, c1 = offsets & _LOW32, (offsets >> 32) & _LOW32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND[1])
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND[0])
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY[0]) & _LOW32, (k1 + _KEY[1]) & _LOW32
    signed = torch.where(c0 >= 1 << 31, c0 - (1 << 32), c0)  # the bits as int32
    return torch.where(signed < 0, -signed - 1, signed).float() * 4.6566127342e-10
