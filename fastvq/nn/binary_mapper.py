"""`BinaryMapper` (Fleuret, arXiv:2510.17558): `bits` logits to one of 2^bits codes, a drop-in for
vector-quantize-pytorch 1.32.0's: same constructor arguments and defaults, methods, outputs and
(empty) state_dict.

Each bit is drawn from Bernoulli(sigmoid(logit / temperature)) (or set where that probability is
above 1/2, when deterministic); the code's index is sum_b bit_b 2^b and the output its one-hot
(..., 2^bits) float32. In training the one-hot carries the gradient of the soft code distribution
G[c] = prod_b P(bit_b = c_b) (straight through), and an auxiliary loss keeps each token's bits'
entropy within kl_loss_threshold nats of the uniform distribution's: relu(bits ln 2 - H - threshold).

fastvq builds log G by doubling (2^(b+1) sums at bit b, O(2^bits) per token) instead of 1.32.0's
(..., bits) x (bits, 2^bits) products, keeps no (2^bits, bits) code table (`codes` is computed when
asked for), and runs the probabilities, entropies and G in fp32 for fp16/bf16 logits (1.32.0: in the
logits' dtype). The random draws are 1.32.0's: a seed gives the same codes.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .arguments import check_arguments, describe, is_integer_tensor
from .fsq import math_dtype

NAT = math.log(2.0)
"""ln 2: the entropy of one fair bit, in nats (1.32.0's name)."""


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., bits) -> the summed entropy (nats) of the bits' Bernoulli(sigmoid(logit)) (...)."""
    prob = logits.sigmoid()
    return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(-1)


def code_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, bits) -> log P(code c) (N, 2^bits) of independent bits, code c having bit b set when
    c & 2^b: built by doubling, so bit b's log-probabilities are added to 2^(b+1) partial sums."""
    log_one, log_zero = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_probs = logits.new_zeros(logits.shape[0], 1)
    for bit in range(logits.shape[1]):
        log_probs = torch.cat((log_probs + log_zero[:, bit, None], log_probs + log_one[:, bit, None]), dim=1)
    return log_probs


class BinaryMapper(nn.Module):
    """bits logits to one of 2^bits codes, as vector-quantize-pytorch 1.32.0's `BinaryMapper`.

    forward(logits (..., bits), temperature=1.0, straight_through=None (training), calc_aux_loss=None
    (training), deterministic=None (deterministic_on_eval in eval), return_indices=False,
    reduce_aux_kl_loss=True) -> (one_hot (..., 2^bits) float32, [indices (...) int64,] aux_kl_loss
    (() or (...) without reduce_aux_kl_loss; 0 without calc_aux_loss)).
    """

    def __init__(self, bits=1, kl_loss_threshold=NAT, deterministic_on_eval=False):
        super().__init__()
        check_arguments(bits=bits, kl_loss_threshold=kl_loss_threshold)
        self.bits = bits
        self.num_codes = 2**bits
        self.kl_loss_threshold = kl_loss_threshold
        self.deterministic_on_eval = deterministic_on_eval
        self.register_buffer("power_two", 2 ** torch.arange(bits), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, num_codes={self.num_codes}, kl_loss_threshold={self.kl_loss_threshold:g}, "
            f"deterministic_on_eval={self.deterministic_on_eval}"
        )

    @property
    def codes(self) -> torch.Tensor:
        """(2^bits, bits) bool: the bits of every code (built when asked for; 1.32.0 keeps it as a buffer)."""
        return self.indices_to_bits(torch.arange(self.num_codes, device=self.power_two.device))

    def indices_to_bits(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (...) -> their bits (..., bits) bool, bit b of index i being i & 2^b."""
        return indices.unsqueeze(-1).bitwise_and(self.power_two) != 0

    def binary_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., bits) -> the bits' summed entropy in nats (...)."""
        return binary_entropy(logits)

    def check_logits(self, logits) -> None:
        """logits a finite floating-point tensor (..., bits), else TypeError / ValueError naming it."""
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
            raise TypeError(f"logits must be a floating-point tensor (..., bits={self.bits}), got {describe(logits)}")
        if logits.shape[-1] != self.bits:
            raise ValueError(f"logits must have a last dimension of bits={self.bits}, got shape {tuple(logits.shape)}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits must be finite, got NaN or infinite values")

    def calc_aux_loss(self, logits: torch.Tensor, reduce_aux_kl_loss: bool = True) -> torch.Tensor:
        """relu(bits ln 2 - entropy - kl_loss_threshold) per token (...), or its mean (); in logits' dtype."""
        self.check_logits(logits)
        entropy = binary_entropy(logits.to(math_dtype(logits.dtype)))
        aux_kl_loss = F.relu(self.bits * NAT - entropy - self.kl_loss_threshold)
        return (aux_kl_loss.mean() if reduce_aux_kl_loss else aux_kl_loss).to(logits.dtype)

    def log_prob(self, logits, *, indices=None, one_hot=None, sum_bits=True) -> torch.Tensor:
        """log P(code) (...) of codes given as indices (...) or one_hots (..., 2^bits) (exactly one),
        or the per-bit log-probabilities (..., bits) without sum_bits; in logits' dtype."""
        self.check_logits(logits)
        if (indices is None) == (one_hot is None):
            raise ValueError("pass exactly one of indices and one_hot")
        if one_hot is not None:
            if not isinstance(one_hot, torch.Tensor) or one_hot.shape != (*logits.shape[:-1], self.num_codes):
                raise ValueError(
                    f"one_hot must be a tensor of shape {(*logits.shape[:-1], self.num_codes)}, got {describe(one_hot)}"
                )
            indices = one_hot.argmax(dim=-1)
        if not is_integer_tensor(indices) or indices.shape != logits.shape[:-1]:
            raise ValueError(
                f"indices must be an integer tensor of shape {tuple(logits.shape[:-1])}, got {describe(indices)}"
            )
        if indices.numel() and not bool(((indices >= 0) & (indices < self.num_codes)).all()):
            raise ValueError(f"indices must be in [0, num_codes={self.num_codes})")
        bits = self.indices_to_bits(indices.long())
        log_probs = torch.where(bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(-1) if sum_bits else log_probs

    def forward(
        self,
        logits,
        temperature=1.0,
        straight_through=None,
        calc_aux_loss=None,
        deterministic=None,
        return_indices=False,
        reduce_aux_kl_loss=True,
    ):
        self.check_logits(logits)
        temperature = checked_temperature(temperature)
        deterministic = self.deterministic_on_eval and not self.training if deterministic is None else deterministic
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss

        flat = logits.reshape(-1, self.bits)
        math_logits = flat.to(math_dtype(flat.dtype))
        prob = (math_logits.detach() / temperature).sigmoid()
        bits = prob > 0.5 if deterministic else prob.bernoulli().bool()
        indices = (self.power_two * bits).sum(-1)
        one_hot = F.one_hot(indices, self.num_codes).float()
        if straight_through:
            soft = code_log_probs(math_logits).exp().float()
            one_hot = one_hot + soft - soft.detach()

        if calc_aux_loss:
            aux_kl_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss=reduce_aux_kl_loss)
        else:
            aux_kl_loss = torch.zeros((), device=logits.device)
        one_hot = one_hot.reshape(*logits.shape[:-1], self.num_codes)
        if not return_indices:
            return one_hot, aux_kl_loss
        return one_hot, indices.reshape(logits.shape[:-1]), aux_kl_loss


def checked_temperature(temperature) -> float:
    """temperature a number > 0 or a 0-d tensor of one (it only scales the sampling probabilities,
    which carry no gradient) -> a float; ValueError naming the argument otherwise."""
    if isinstance(temperature, torch.Tensor) and temperature.dim() == 0 and not isinstance(temperature, bool):
        temperature = temperature.item()
    if not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number > 0, got {describe(temperature)}")
    check_arguments(temperature=temperature)
    return float(temperature)
