"""fastvq.nn.arguments: every spec accepts its range and rejects what lies outside with one message
form (argument, expected values, meaning), and every layer and token quantizer checks through it."""

import math
import re

import pytest
import torch

from fastvq.nn import (
    FSQ,
    IBQ,
    LFQ,
    Codebook,
    CodeHead,
    GroupedResidualVQ,
    LearnedCodebook,
    ResidualVQ,
    VectorQuantize,
)
from fastvq.nn.arguments import ARGUMENTS, check_arguments


def accepted_and_rejected(spec):
    """(values the spec accepts, values it rejects), at and just beyond its bounds."""
    if spec.kind == "choice":
        return list(spec.choices), ["bogus", None]
    if spec.kind == "module":
        return [torch.nn.Identity(), None], ["module", torch.nn.Identity, 1]
    if spec.kind == "callable":
        return [torch.optim.SGD, print, None], ["SGD", 1, True]
    if spec.kind == "ints":
        low = int(spec.low)
        return [[low], [low, low + 1000], (low, low)], [[], [low - 1], [True], [low + 0.5], low, "1", None]
    if math.isinf(spec.low):  # any finite number
        return [-1000.0, 0, 0.25, 1000], [True, "1", float("nan"), float("inf"), -float("inf"), None]
    good = ([] if spec.positive else [spec.low]) + ([spec.high] if math.isfinite(spec.high) else [spec.low + 1000])
    bad = [spec.low - 1, True, "1", float("nan")] + ([spec.low] if spec.positive else [])
    if spec.kind == "int":
        bad.append(spec.low + 0.5)
    else:
        good.append(spec.low + 0.25)
        bad.append(float("inf"))
    if math.isfinite(spec.high):
        bad.append(spec.high + 0.5)
    return good + ([None] if spec.optional else []), bad + ([] if spec.optional else [None])


@pytest.mark.parametrize("name", ARGUMENTS)
def test_each_spec_accepts_its_range_and_names_what_it_expects(name):
    spec = ARGUMENTS[name]
    good, bad = accepted_and_rejected(spec)
    for value in good:
        check_arguments(**{name: value})
    for value in bad:
        with pytest.raises(ValueError) as info:
            check_arguments(**{name: value})
        message = str(info.value)
        assert name in message and spec.meaning in message and repr(value) in message, message
        assert message.startswith(f"{name} must be {spec.expected()}, got {value!r}"), message


@pytest.mark.parametrize(
    "build,name,value",
    [
        (lambda **kw: VectorQuantize(dim=8, codebook_size=16, **kw), "decay", 1.5),
        (lambda **kw: VectorQuantize(dim=8, codebook_size=16, **kw), "orthogonal_reg_max_codes", 0),
        (lambda **kw: VectorQuantize(dim=8, codebook_size=16, **kw), "vq_bridge", "on"),
        (lambda **kw: ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **kw), "quantize_dropout_multiple_of", 0),
        (lambda **kw: ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **kw), "eval_beam_size", -1),
        (lambda **kw: ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **kw), "threshold_ema_dead_code", -2),
        (lambda **kw: GroupedResidualVQ(dim=8, num_quantizers=2, codebook_size=16, **kw), "groups", 0),
        (lambda **kw: CodeHead(8, **kw), "num_codes", 0),
        (lambda **kw: Codebook(4, 16, **kw), "eps", float("inf")),
        (lambda **kw: LearnedCodebook(4, **kw), "codebook_size", 2.0),
        (lambda **kw: IBQ(8, 16, **kw), "entropy_temperature", 0.0),
        (lambda **kw: IBQ(8, 16, **kw), "sample_minimization_weight", -0.5),
        (lambda **kw: FSQ(**{"levels": [8, 5], **kw}), "levels", [8, 1]),
        (lambda **kw: LFQ(codebook_size=16, **kw), "frac_per_sample_entropy", 1.5),
        (lambda **kw: LFQ(codebook_size=16, **kw), "entropy_loss_offset", float("nan")),
        (lambda **kw: FSQ([8, 5], preserve_symmetry=True, **kw), "noise_dropout", 1.5),
    ],
)
def test_layers_check_their_arguments_through_the_table(build, name, value):
    with pytest.raises(ValueError) as info:
        build(**{name: value})
    assert f"({name}: {ARGUMENTS[name].meaning})" in str(info.value), str(info.value)


def test_forward_arguments_are_checked_through_the_table_too():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match=re.escape(f"(topk: {ARGUMENTS['topk'].meaning})")):
        VectorQuantize(dim=8, codebook_size=16)(x, topk=0)
    with pytest.raises(ValueError, match=re.escape(f"(beam_size: {ARGUMENTS['beam_size'].meaning})")):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)(x, beam_size=0)
