"""The layers' argument checks: one table of argument specs (kind, range, meaning) and the checks
built on it, used by every layer (`VectorQuantize`, `ResidualVQ`, `GroupedResidualVQ`, `CodeHead`)
and token quantizer (`TokenQuantizer`, `Codebook`, `LearnedCodebook`).

An argument is checked where it is used, by `check_arguments(name=value, ...)`, so every error has
one form, naming the argument, what was expected and what the argument is:

    ValueError: decay must be a number in [0, 1], got 1.5 (decay: EMA decay of the codebook statistics)

`backend` and `precision` are the ops' settings and are checked by the ops' own functions
(`fastvq.ops.backend.check_backend`, `fastvq.ops.functional.check_precision`). Flags (True/False
arguments) are read by truthiness, as in vector-quantize-pytorch 1.32.0, and need no entry.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..ops.common import METRICS


@dataclass(frozen=True)
class Spec:
    """What one argument accepts.

    kind: "int" (an int, not a bool, in [low, high]), "number" (a finite real number, not a bool,
    in [low, high]; in (low, high] with positive=True, low 0), "ints" (a non-empty list or tuple of
    such ints), "choice" (one of `choices`), "module" (a torch.nn.Module) or "callable" (anything
    callable, such as a class or factory). optional: None is accepted too. meaning: what the argument
    is, for error messages and docs.
    """

    kind: str
    meaning: str
    low: float = 0
    high: float = math.inf
    optional: bool = False
    choices: tuple = ()
    positive: bool = False

    def expected(self) -> str:
        """The accepted values in words: 'an int >= 1', 'a number in [0, 1]', 'None or ...'."""
        if self.kind == "choice":
            text = f"one of {self.choices}"
        elif self.kind in ("module", "callable"):
            text = "an nn.Module" if self.kind == "module" else "a callable"
        else:
            noun = {"int": "an int", "ints": "a non-empty list of ints", "number": "a number"}[self.kind]
            if self.positive and not math.isinf(self.high):
                text = f"{noun} in ({self.low:g}, {self.high:g}]"
            elif self.positive:
                text = f"{noun} > {self.low:g}"
            elif math.isinf(self.low):
                text = f"a finite {noun.split()[-1]}"
            elif math.isinf(self.high):
                text = f"{noun} >= {self.low:g}"
            else:
                text = f"{noun} in [{self.low:g}, {self.high:g}]"
        return f"None or {text}" if self.optional else text

    def accepts(self, value) -> bool:
        if value is None and self.optional:
            return True
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "module":
            return isinstance(value, torch.nn.Module)
        if self.kind == "callable":
            return callable(value)
        if self.kind == "ints":
            return isinstance(value, (list, tuple)) and len(value) > 0 and all(map(self._accepts_one, value))
        return self._accepts_one(value)

    def _accepts_one(self, value) -> bool:
        kind = numbers.Real if self.kind == "number" else int
        return (
            not isinstance(value, bool)
            and isinstance(value, kind)
            and math.isfinite(value)
            and self.low <= value <= self.high
            and not (self.positive and value == self.low)
        )


def _int(meaning: str, low: int = 1, **kwargs) -> Spec:
    return Spec("int", meaning, low=low, **kwargs)


def _number(meaning: str, high: float = math.inf, positive: bool = False) -> Spec:
    return Spec("number", meaning, high=high, positive=positive)


ARGUMENTS: dict[str, Spec] = {
    # sizes
    "dim": _int("channels of an input token (of a token quantizer: the size of a code)"),
    "codebook_size": _int("number of codes K in a codebook"),
    "codebook_dim": _int("size of a code (None: dim, or dim / heads per head)", optional=True),
    "heads": _int("heads a token is split into, each quantized on its own"),
    "num_codebooks": _int(
        "codebooks of a token quantizer: 1 (shared by every head) or one per head; of a "
        "scalar quantizer: groups of len(levels) channels a token is split into"
    ),
    "num_quantizers": _int("residual stages (None: one per entry of a codebook_size tuple)", optional=True),
    "groups": _int("independent residual quantizers, each on dim / groups channels"),
    "num_codes": _int("codes (output classes) of a CodeHead"),
    "levels": Spec("ints", "quantization levels of each code dimension of a scalar quantizer", low=2),
    # metric
    "metric": Spec("choice", "how tokens and codes are compared", choices=METRICS),
    # the EMA codebook
    "decay": _number("EMA decay of the codebook statistics", high=1.0),
    "eps": _number("Laplace smoothing of the EMA cluster sizes"),
    "kmeans_iters": _int("Lloyd iterations of the k-means initialisation"),
    "threshold_ema_dead_code": _number("EMA cluster size below which a code is dead and replaced (0: never)"),
    # losses and sampling
    "commitment_weight": _number("weight of the commitment loss"),
    "orthogonal_reg_weight": _number("weight of the orthogonal regularisation of the codes"),
    "orthogonal_reg_max_codes": _int("codes sampled for the orthogonal regularisation (None: all)", optional=True),
    "sample_codebook_temp": _number("temperature of stochastic code sampling (0: the nearest code)"),
    "codebook_diversity_loss_weight": _number("weight of the codebook diversity loss (minus an entropy over codes)"),
    "codebook_diversity_temperature": _number(
        "inverse temperature of the codebook diversity loss (the logits are multiplied by it)", positive=True
    ),
    "directional_reparam_variance": _number("variance of the noise on the direction of directional_reparam"),
    "topk": _int("candidates returned per token (capped at codebook_size; at most 16)"),
    # residual quantization
    "quantize_dropout_cutoff_index": _int("first stage quantize dropout may stop at", low=0),
    "quantize_dropout_multiple_of": _int("quantize dropout keeps a multiple of this many stages"),
    "beam_size": _int("paths kept by the beam search over stages in training (None: greedy)", optional=True),
    "eval_beam_size": _int("paths kept by the beam search in eval (None: beam_size)", optional=True),
    # IBQ
    "beta": _number("weight of the codebook term of IBQ's quantization loss"),
    "entropy_temperature": _number("temperature of the softmax of IBQ's entropy loss", positive=True),
    "sample_minimization_weight": _number("weight of the per-token entropy in IBQ's entropy loss"),
    "batch_maximization_weight": _number("weight of the batch-mean entropy in IBQ's entropy loss"),
    # scalar quantizers (FSQ, LatentQuantize, FSP)
    "noise_dropout": _number("fraction of FSQ code values moved by uniform noise in training", high=1.0),
    "commitment_loss_weight": _number("weight of the commitment loss of LatentQuantize and LFQ"),
    "quantization_loss_weight": _number("weight of LatentQuantize's quantization loss"),
    "quantize_rate": _number("fraction of FSP values quantized in training (the rest perturbed)", high=1.0),
    "act_name": Spec("choice", "FSP's CDF activation", choices=("tanh", "sigmoid", "normal", "laplace", "cauchy")),
    "vector_norm": Spec(
        "choice",
        "FSP's preset of moment targets for its norm loss",
        choices=("none", "var", "kurt", "var_tanh", "var_sigmoid", "var_laplace"),
    ),
    # BinaryMapper
    "bits": _int("bits of a BinaryMapper code (2^bits codes)", high=62),
    "kl_loss_threshold": _number("nats of bit entropy below the uniform's that BinaryMapper's aux loss allows"),
    "temperature": _number("temperature of BinaryMapper's bit sampling", positive=True),
    # EvoLFQ's genetic search
    "pop_size": _int("genes in an EvoLFQ population"),
    "mutation_rate": _number("probability that EvoLFQ's mutation flips a gene position", high=1.0),
    "tournament_size": _int("members drawn per EvoLFQ tournament selection"),
    "elitism_count": _int("fittest genes EvoLFQ keeps unchanged per generation", low=0),
    "generations": _int("generations EvoLFQ.evolve runs", low=0),
    # lookup-free quantization (LFQ, BSQ)
    "entropy_loss_weight": _number("weight of LFQ's entropy loss"),
    "diversity_gamma": Spec(
        "number", "weight of the codebook (batch) entropy within LFQ's entropy loss", low=-math.inf
    ),
    "codebook_scale": _number("absolute value of every LFQ code dimension", positive=True),
    "frac_per_sample_entropy": _number("fraction of tokens LFQ's entropy loss samples", high=1.0, positive=True),
    "soft_clamp_input_value": Spec(
        "number", "bound of LFQ's tanh soft clamp of the input (None: none)", positive=True, optional=True
    ),
    "cosine_sim_project_in_scale": _number(
        "scale of LFQ's cosine-similarity input projection (None: codebook_scale)", positive=True
    ),
    "entropy_loss_offset": Spec("number", "shift of LFQ's entropy loss before its softplus", low=-math.inf),
    "inv_temperature": _number("inverse temperature of LFQ's softmax over codes", positive=True),
    # SimVQ
    "frozen_codebook_dim": _int("size of SimVQ's frozen codes (None: dim)", optional=True),
    "input_to_quantize_commit_loss_weight": _number("weight of SimVQ's commitment of the input to its code"),
    # multi-scale (VAR-style) quantization
    "quant_resi": _number("weight of the convolution on each upsampled scale (0: none)"),
    "share_quant_resi": _int("convolutions shared by the scales (1: one; 0: one per scale)", low=0),
    "nested_dropout": _number("probability of keeping only the coarsest scales in a training step", high=1.0),
    "nested_dropout_min_levels": _int("scales nested dropout always keeps"),
    # codebook reparametrisations and updates of VectorQuantize
    "affine_param_batch_decay": _number("EMA decay of the affine batch statistics", high=1.0),
    "affine_param_codebook_decay": _number("EMA decay of the affine codebook statistics", high=1.0),
    "sync_update_v": _number("weight v of the synchronous update rule (21) of vqtorch (0: off)", high=1.0),
    "vq_bridge": Spec("module", "module transforming the codes before the search (VQBridge)", optional=True),
    "in_place_codebook_optimizer": Spec(
        "callable", "optimizer factory stepped on the codebook parameters in forward", optional=True
    ),
}


def check_arguments(**values) -> None:
    """Check each name=value against its spec in ARGUMENTS: ValueError naming the argument, the
    expected values and its meaning."""
    for name, value in values.items():
        spec = ARGUMENTS[name]
        if spec.accepts(value):
            continue
        raise ValueError(f"{name} must be {spec.expected()}, got {value!r} ({name}: {spec.meaning})")


def check_exclusive(**flags) -> None:
    """Two flags that cannot both be on: ValueError naming both."""
    (a, va), (b, vb) = flags.items()
    if va and vb:
        raise ValueError(f"{a} and {b} cannot both be on (as in vector-quantize-pytorch); turn one off")


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def describe(t) -> str:
    """dtype and shape of a tensor, or the type of anything else (for error messages)."""
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def is_integer_tensor(t) -> bool:
    """A tensor of an integer dtype (not bool, float or complex)."""
    return (
        isinstance(t, torch.Tensor)
        and not t.dtype.is_floating_point
        and not t.dtype.is_complex
        and t.dtype != torch.bool
    )


def check_stage_indices(indices, num_quantizers: int, quantize_dropout: bool, stage_dim: int = -1) -> int:
    """The stages q a residual quantizer's indices (B, ..., q at stage_dim) hold: TypeError unless an
    integer tensor of 2 dims or more, ValueError unless q = num_quantizers (q < num_quantizers only with
    quantize_dropout, whose dropped stages are left out)."""
    if not is_integer_tensor(indices) or indices.dim() < 2:
        raise TypeError(f"indices must be an integer tensor (B, ..., num_quantizers), got {describe(indices)}")
    given = indices.shape[stage_dim]
    if given > num_quantizers or (given < num_quantizers and not quantize_dropout):
        raise ValueError(
            f"indices must hold num_quantizers={num_quantizers} stages (fewer only with quantize_dropout), "
            f"got shape {tuple(indices.shape)}"
        )
    return given
