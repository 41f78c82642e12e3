"""The soft ops over a codebook on the "torch" backend: `code_entropy`, `soft_quantize` and their
gradients, in plain PyTorch on the tiles of `fastvq.ops.chunked` (the same backend, split in two
files), never an N x K tensor.

Notation shared by every backend (canonical shapes, see `fastvq.ops.chunked`): l_nk the fp32
logits of `chunked._logit_tile`, s = l / T, the normaliser norm (2, H, N) = (m_n = max_k s_nk,
log S_n = log sum_k exp(s_nk - m_n)), p_nk = exp((s_nk - m_n) - log S_n) (`common.softmax_kept`).
Both ops' gradients are one streamed computation (`_softmax_grad`): a loss whose derivative w.r.t.
p_nk is u_n psi_nk + w_n b_k + G_n . c_k, with psi = log(max(p, clamp)) + [p >= clamp] (clamp 0:
log p + 1), has
    dL/dl_nk = p_nk (u_n (psi_nk - Psi_n) + w_n (b_k - B_n) + G_n . c_k - G_n . z_n) / T,
where Psi, B and G . z are the per-token expectations under p of psi, b and G . c (each term centred
on its own, so that a one-hot token's terms cancel exactly, as autograd's p (g - sum p g) does).
grad_x_n = sum_k dL/dl_nk dl_nk/dx_n, grad_c_k = sum_n dL/dl_nk dl_nk/dc_k (`chunked.logit_vjp`),
plus the value path of `soft_quantize`. The coefficients are one (5, H, N) tensor (u, Psi, w, B,
G . z): `common.entropy_grad_coefs` for `code_entropy` (b = the gradient of mean_probs, no G);
`common.soft_quantize_grad_inputs` for `soft_quantize` (G = the gradient of quantized, z its soft
value). Extra memory: a few tiles, O(N + K) sums and O(N D) rows (soft values, cleaned copies of x).
"""

from __future__ import annotations

import math

import torch

from .chunked import _logit_tile, _tiles, code_stats, logit_vjp
from .common import (
    chosen_code_sums,
    code_bias,
    entropy_grad_coefs,
    entropy_outputs,
    soft_grad_inputs,
    soft_quantize_grad_inputs,
    softmax_kept,
)


def _scaled_tiles(x, codebook, metric, precision, inv_temperature):
    """Yield (h, hc, token slice, rows, code tiles) as `chunked._tiles` does, each code tile being
    (k0, codes, code bias, logit, active, s = logit / T)."""
    bias = code_bias(codebook, metric, precision)
    for h, hc, token_slice, rows, code_tiles in _tiles(x, codebook, bias, precision):
        yield h, hc, token_slice, rows, _scaled_code_tiles(rows, code_tiles, metric, inv_temperature)


def _scaled_code_tiles(rows, code_tiles, metric, inv_temperature):
    for k0, codes, code_bias_tile in code_tiles:
        logit, active = _logit_tile(rows, codes, code_bias_tile, metric)
        yield k0, codes, code_bias_tile, logit, active, logit * inv_temperature


class _OnlineSoftmax:
    """Running max m and sum S of e = exp(s - m) of token rows over code tiles (the normaliser).
    Logits -inf weigh 0 (no NaN from -inf - -inf); a NaN logit makes the normaliser NaN."""

    def __init__(self, n_rows: int, device: torch.device):
        self.max = torch.full((n_rows,), -math.inf, device=device, dtype=torch.float32)
        self.sum = torch.zeros(n_rows, device=device, dtype=torch.float32)

    def update(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take one tile s (n, k); return (e (n, k), the factor that rescaled the old sum (n,))."""
        new_max = torch.maximum(self.max, s.amax(dim=1))
        safe = torch.where(new_max == -math.inf, 0.0, new_max)
        rescale, e = (self.max - safe).exp(), (s - safe[:, None]).exp_()
        self.sum = self.sum * rescale + e.sum(dim=1)
        self.max = new_max
        return e, rescale

    def norm(self) -> torch.Tensor:
        return torch.stack([self.max, self.sum.log()])


def _log_probs(s: torch.Tensor, norm: torch.Tensor, h: int, token_slice: slice) -> torch.Tensor:
    """log p (n, k) of a tile s of the token rows `token_slice` of head h."""
    return (s - norm[0, h, token_slice, None]) - norm[1, h, token_slice, None]


def code_entropy(
    x: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float,
    log_clamp_min: float | None,
    metric: str = "l2",
    precision: str = "ieee",
):
    """Per-token entropy of p and the mean of p over the kept tokens, in two passes over the tiles.

    x (H, N, D), codebook (Hc, K, D), mask (H, N) bool or None -> entropy (H, N) fp32 (-sum p log p, or
    -sum p log max(p, log_clamp_min); 0 masked, NaN non-finite), mean_probs (H, K) fp32, norm (2, H, N)
    fp32 and kept_mass (H, N) fp32 = sum of the p >= log_clamp_min (1 without the clamp).
    Pass 1: online softmax (norm); pass 2, norm known: per-code sums of p over the kept tokens and the
    entropy (-sum p log p, its 0 log 0 terms 0). (The Triton kernels get the exact entropy in pass 1
    instead, from a running sum of e (s - m): one pass less when the clamp is off; here that sum
    costs more elementwise work than pass 2's product.)
    """
    inv_t = 1.0 / temperature
    norm = torch.empty((2, *x.shape[:2]), device=x.device, dtype=torch.float32)
    for h, _, token_slice, rows, code_tiles in _scaled_tiles(x, codebook, metric, precision, inv_t):
        online = _OnlineSoftmax(rows.shape[0], x.device)
        for *_, s in code_tiles:
            online.update(s)
        norm[:, h, token_slice] = online.norm()
    kept = softmax_kept(norm, mask)
    prob_sums = torch.zeros(x.shape[0], codebook.shape[1], device=x.device, dtype=torch.float32)
    entropy = torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)
    kept_mass = torch.zeros_like(entropy) if log_clamp_min is not None else torch.ones_like(entropy)
    for h, _, token_slice, rows, code_tiles in _scaled_tiles(x, codebook, metric, precision, inv_t):
        for k0, codes, _, _, _, s in code_tiles:
            log_p = _log_probs(s, norm, h, token_slice)
            probs = log_p.exp()
            prob_sums[h, k0 : k0 + codes.shape[0]] += torch.where(kept[h, token_slice, None], probs, 0.0).sum(dim=0)
            if log_clamp_min is None:
                entropy[h, token_slice] -= (probs * log_p).nan_to_num_(nan=0.0).sum(dim=1)
            else:
                above = probs >= log_clamp_min
                entropy[h, token_slice] -= (probs * torch.where(above, log_p, math.log(log_clamp_min))).sum(dim=1)
                kept_mass[h, token_slice] += torch.where(above, probs, 0.0).sum(dim=1)
    return *entropy_outputs(entropy, prob_sums, norm, mask), norm, kept_mass


def code_entropy_grad(
    x: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor | None,
    norm: torch.Tensor,
    entropy: torch.Tensor,
    kept_mass: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_mean_probs: torch.Tensor | None,
    *,
    temperature: float,
    log_clamp_min: float | None,
    metric: str = "l2",
    precision: str = "ieee",
    x_grad: bool = True,
    codebook_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (fp32) of sum(grad_entropy * entropy) + sum(grad_mean_probs * mean_probs) of
    `code_entropy` w.r.t. x (H, N, D) and the codebook (Hc, K, D) (an output not asked for is empty):
    one pass for expectation_n = sum_k p_nk b_k (when grad_mean_probs is given), one for the gradients."""
    kept = softmax_kept(norm, mask)
    x, norm = soft_grad_inputs(x, norm, kept)
    expectation = None
    if grad_mean_probs is not None:
        expectation = torch.zeros_like(entropy)
        for h, _, token_slice, _, code_tiles in _scaled_tiles(x, codebook, metric, precision, 1.0 / temperature):
            for k0, codes, _, _, _, s in code_tiles:
                probs = _log_probs(s, norm, h, token_slice).exp()
                expectation[h, token_slice] += probs @ grad_mean_probs[h, k0 : k0 + codes.shape[0]].float()
    coefs = entropy_grad_coefs(kept, entropy, kept_mass, grad_entropy, expectation)
    return _softmax_grad(
        x,
        codebook,
        norm,
        coefs,
        log_term=True,
        code_values=grad_mean_probs,
        temperature=temperature,
        log_clamp_min=log_clamp_min,
        metric=metric,
        precision=precision,
        x_grad=x_grad,
        codebook_grad=codebook_grad,
    )


def soft_quantize(
    x: torch.Tensor, codebook: torch.Tensor, *, temperature: float, metric: str = "l2", precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code by logit and the softmax-weighted mean of the codes, in one online pass (attention
    with the codebook as keys and values).

    x (H, N, D), codebook (Hc, K, D) -> indices (H, N) int64 (argmax of the logits, ties to the lowest
    index; -1 where the normaliser is not finite), norm (2, H, N) fp32, soft_values (H, N, D) fp32 =
    sum_k p_nk c_k (0 where the index is -1), with the codes as `precision` rounds them.
    """
    norm = torch.empty((2, *x.shape[:2]), device=x.device, dtype=torch.float32)
    indices = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
    values = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    for h, _, token_slice, rows, code_tiles in _scaled_tiles(x, codebook, metric, precision, 1.0 / temperature):
        online = _OnlineSoftmax(rows.shape[0], x.device)
        acc = torch.zeros(rows.shape, device=x.device, dtype=torch.float32)
        best = torch.full((rows.shape[0],), -math.inf, device=x.device, dtype=torch.float32)
        best_index = indices[h, token_slice].fill_(-1)
        for k0, codes, _, logit, _, s in code_tiles:
            e, rescale = online.update(s)
            acc = acc * rescale[:, None] + e @ codes
            tile_best, tile_index = logit.nan_to_num(nan=-math.inf).max(dim=1)  # first index on ties
            better = tile_best > best  # strict: an earlier tile keeps a tie
            best = torch.where(better, tile_best, best)
            best_index.copy_(torch.where(better, tile_index + k0, best_index))
        norm[:, h, token_slice] = online.norm()
        values[h, token_slice] = acc / online.sum[:, None]
    kept = softmax_kept(norm, None)
    return indices.masked_fill_(~kept, -1), norm, values.masked_fill_(~kept[..., None], 0.0)


def soft_quantize_grad(
    x: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    norm: torch.Tensor,
    soft_values: torch.Tensor,
    grad: torch.Tensor,
    *,
    hard: bool,
    temperature: float,
    metric: str = "l2",
    precision: str = "ieee",
    x_grad: bool = True,
    codebook_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (fp32) of sum(grad * quantized) of `soft_quantize` w.r.t. x (H, N, D) and the codebook
    (Hc, K, D) (an output not asked for is empty). Logit path: dL/dl_nk = p_nk (G_n . c_k - G_n .
    soft_n) / T. Value path to the codebook: sum of G_n over the tokens that chose code k (hard), or
    sum_n p_nk G_n (soft). Tokens with index -1 pass G straight through to x."""
    kept, x_kept, norm, grad_kept, coefs = soft_quantize_grad_inputs(x, indices, norm, soft_values, grad)
    out_x, out_c = _softmax_grad(
        x_kept,
        codebook,
        norm,
        coefs,
        grad_values=grad_kept,
        soft_value_path=not hard,
        temperature=temperature,
        log_clamp_min=None,
        metric=metric,
        precision=precision,
        x_grad=x_grad,
        codebook_grad=codebook_grad,
    )
    if codebook_grad and hard:
        out_c += chosen_code_sums(code_stats, grad_kept, indices, codebook.shape)
    return (torch.where(kept[..., None], out_x, grad.float()) if x_grad else out_x), out_c


def _softmax_grad(
    x,
    codebook,
    norm,
    coefs,
    *,
    log_term=False,
    code_values=None,
    grad_values=None,
    soft_value_path=False,
    temperature,
    log_clamp_min,
    metric,
    precision,
    x_grad,
    codebook_grad,
):
    """Gradients w.r.t. x and the codebook for dL/dl_nk = p_nk (u_n (psi_nk - Psi_n) + w_n (b_k - B_n) +
    G_n . c_k - G_n . z_n) / T (module docstring): coefs (5, H, N) = (u, Psi, w, B, G . z); the first
    term only with log_term, the second with b = code_values (H, K), the third with G = grad_values
    (H, N, D). soft_value_path adds sum_n p_nk G_n to the codebook's gradient."""
    inv_t = 1.0 / temperature
    clamp = log_clamp_min or 0.0
    u, psi_mean, w, b_mean, g_mean = coefs
    out_x = torch.zeros(x.shape if x_grad else 0, device=x.device, dtype=torch.float32)
    out_c = torch.zeros(codebook.shape if codebook_grad else 0, device=x.device, dtype=torch.float32)
    for h, hc, token_slice, rows, code_tiles in _scaled_tiles(x, codebook, metric, precision, inv_t):
        g_rows = None if grad_values is None else grad_values[h, token_slice]
        for k0, codes, code_bias_tile, logit, active, s in code_tiles:
            log_p = _log_probs(s, norm, h, token_slice)
            probs = log_p.exp()
            phi = torch.zeros_like(probs)
            if log_term:
                psi = torch.where(probs >= clamp, log_p + 1.0, math.log(clamp) if clamp else 0.0)
                phi += u[h, token_slice, None] * (psi - psi_mean[h, token_slice, None])
            if code_values is not None:
                b = code_values[h, None, k0 : k0 + codes.shape[0]].float()
                phi += w[h, token_slice, None] * (b - b_mean[h, token_slice, None])
            if g_rows is not None:
                phi += g_rows @ codes.T - g_mean[h, token_slice, None]
            weight = torch.where(probs > 0, probs * phi, 0.0) * inv_t
            if x_grad:
                out_x[h, token_slice] += logit_vjp(weight, logit, active, rows, codes, code_bias_tile, metric, "x")
            if codebook_grad:
                tile = logit_vjp(weight, logit, active, rows, codes, code_bias_tile, metric, "codebook")
                if soft_value_path:
                    tile += probs.T @ g_rows
                out_c[hc, k0 : k0 + codes.shape[0]] += tile
    return out_x, out_c
