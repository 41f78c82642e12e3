"""fastvq.EvoLFQ against vector-quantize-pytorch 1.32.0's (the anchor): a tiny encoder / decoder around
the LFQ, trained for three steps (output, indices, aux loss, gradients within 1e-5 of the anchor's
formula in float64), eval, encode and decode_bits bit-identical; the genetic search at a fixed seed
draws the same populations generation by generation (random or data-initialised, bits or signs,
batched decoding, an explicit lfq= instance); bad arguments named."""

import copy

import pytest
import torch
from scalar_checks import compare_eval, compare_steps
from test_residual_lfq import as_float32
from torch import nn
from torch.func import functional_call

from fastvq.nn import LFQ, EvoLFQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

IN, LATENT, BITS = 6, 7, 4  # input width, latent width (projected to and from BITS by the LFQ)


class Wrapped(nn.Module):
    """The module, and with float64 run on float64 copies of its state and input, its float outputs
    returned as float32 (1.32.0's formula without its own fp32 rounding of the entropy; see
    test_lfq_parity). Both sides are wrapped so their state_dict keys agree."""

    def __init__(self, module, float64=False):
        super().__init__()
        self.module, self.float64 = module, float64

    def forward(self, x, **kwargs):
        if not self.float64:
            return tuple(self.module(x, **kwargs))
        named = [*self.module.named_parameters(), *self.module.named_buffers()]
        state = {name: t.double() if t.is_floating_point() else t for name, t in named}
        return as_float32(tuple(functional_call(self.module, state, (x.double(),), kwargs)))


def coders(latent=LATENT):
    torch.manual_seed(0)
    return nn.Linear(IN, latent), nn.Sequential(nn.Linear(latent, 5), nn.Tanh(), nn.Linear(5, IN))


def make_pair(explicit_lfq=False, latent=LATENT, lfq_kwargs=None, **kwargs):
    """(anchor, ours) with the same state; kwargs go to the EvoLFQs, lfq_kwargs to their LFQs (given
    as an lfq= instance with explicit_lfq)."""
    encoder, decoder = coders(latent)
    lfq_kwargs = dict(dim=latent, codebook_size=2**BITS, **(lfq_kwargs or {}))
    if explicit_lfq:
        anchor = anchor_module.EvoLFQ(encoder, decoder, anchor_module.LFQ(**lfq_kwargs), **kwargs)
        ours = EvoLFQ(copy.deepcopy(encoder), copy.deepcopy(decoder), LFQ(**lfq_kwargs), **kwargs)
    else:
        anchor = anchor_module.EvoLFQ(encoder, decoder, **lfq_kwargs, **kwargs)
        ours = EvoLFQ(copy.deepcopy(encoder), copy.deepcopy(decoder), **lfq_kwargs, **kwargs)
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    ours.load_state_dict(anchor.state_dict())
    anchor.load_state_dict(ours.state_dict())
    return anchor, ours


def data(steps=3):
    return [torch.randn(5, IN) * 0.3 for _ in range(steps)]


@pytest.mark.parametrize("explicit_lfq", [False, True], ids=["built", "explicit-lfq"])
def test_training_steps_eval_encode_and_decode_match_anchor(explicit_lfq):
    anchor, ours = make_pair(explicit_lfq, lfq_kwargs=dict(commitment_loss_weight=0.2))
    anchor64 = make_pair(explicit_lfq, lfq_kwargs=dict(commitment_loss_weight=0.2, force_quantization_f32=False))[0]
    compare_steps(Wrapped(anchor64, float64=True), Wrapped(ours), data())
    x = data(1)[0]
    compare_eval(anchor, ours, x)
    bits = ours.encode(torch.randn(2, 3, IN))  # (2, 3, BITS): leading dims kept
    assert bits.shape == (2, 3, BITS) and torch.equal(ours.decode_bits(bits), anchor.decode_bits(bits))
    assert torch.equal(ours.decode_bits(bits * 2 - 1), anchor.decode_bits(bits * 2 - 1))  # signs decode too
    assert torch.equal(ours.decode_bits(ours.encode(x)), ours.eval()(x).reconstructed)


def test_encode_matches_anchor_without_projections():
    """With latents of log2(codebook_size) channels the genes are the signs of the quantized latents,
    as 1.32.0 takes them (with projections 1.32.0 takes the signs of the projected-out output)."""
    anchor, ours = make_pair(latent=BITS)
    x = torch.randn(5, IN)
    for return_signs in (False, True):
        assert torch.equal(ours.encode(x, return_signs), anchor.encode(x, return_signs))


def fitness(decoded, genes):
    """Closeness of the decoding to a fixed target, plus a little for set bits (ties are rare)."""
    target = torch.linspace(-0.5, 0.5, IN)
    return -(decoded - target).square().sum(-1) + 1e-3 * genes.flatten(1).sum(-1)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(is_sign=True, batch_size=3),
        dict(tournament_size=3, mutation_rate=0.2, elitism_count=2),
    ],
    ids=["bits", "signs-batched", "step-options"],
)
def test_evolution_draws_the_anchors_populations_at_a_fixed_seed(options):
    anchor, ours = make_pair(pop_size=9, generations=4)
    results = []
    for model in (anchor, ours):
        torch.manual_seed(7)
        results.append(list(model.evolve(fitness, shape=(BITS,), return_best_decoded=True, **options)))
    assert len(results[1]) == 4
    for generation, (expected, actual) in enumerate(zip(*results)):
        assert torch.equal(actual.pop_bits, expected.pop_bits), f"generation {generation}"
        assert actual.best_fitness == expected.best_fitness, f"generation {generation}"
        # the best gene is the one that scored best_fitness (1.32.0 takes the next population's gene
        # at that index instead)
        decoded = ours.decode_bits(actual.best_gene[None])
        assert fitness(decoded, actual.best_gene[None]).item() == pytest.approx(actual.best_fitness, abs=1e-6)
        assert torch.equal(actual.best_decoded, decoded[0])


@pytest.mark.parametrize("is_sign", [False, True])
def test_population_from_data_and_selection_match_anchor(is_sign):
    anchor, ours = make_pair(explicit_lfq=True, latent=BITS, pop_size=11, mutation_rate=0.3)
    x = torch.randn(4, IN)
    populations, selected = [], []
    for model in (anchor, ours):
        torch.manual_seed(3)
        population = model.init_population_from_data(x, is_sign=is_sign)
        fitnesses = torch.randn(population.shape[0])
        populations.append(population)
        selected.append(model.tournament_selection(population, fitnesses))
    assert populations[1].shape == (11, BITS) and torch.equal(populations[1], populations[0])
    assert torch.equal(selected[1], selected[0])


def test_inputs_are_not_modified_and_bad_arguments_are_named():
    _, ours = make_pair()
    x = torch.randn(3, IN)
    before = x.clone()
    ours.train()(x).reconstructed.sum().backward()
    population = ours.init_random_population(shape=(BITS,))
    population_before = population.clone()
    ours.step(population, fitness)
    assert torch.equal(x, before) and torch.equal(population, population_before)
    encoder, decoder = coders()
    with pytest.raises(ValueError, match="pop_size must be greater than elitism_count=4"):
        EvoLFQ(encoder, decoder, dim=LATENT, codebook_size=16, pop_size=4, elitism_count=4)
    with pytest.raises(ValueError, match="mutation_rate must be"):
        EvoLFQ(encoder, decoder, dim=LATENT, codebook_size=16, mutation_rate=1.5)
    with pytest.raises(ValueError, match="either an lfq instance or dim / codebook_size"):
        EvoLFQ(encoder, decoder)
    with pytest.raises(TypeError, match="lfq must be a fastvq.LFQ"):
        EvoLFQ(encoder, decoder, nn.Identity())
    with pytest.raises(ValueError, match="shape"):
        next(ours.evolve(fitness))
    with pytest.raises(ValueError, match="one fitness per gene"):
        ours.step(population, lambda decoded, genes: torch.zeros(2))
