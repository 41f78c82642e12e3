"""`EvoLFQ`: an encoder, an `LFQ` bottleneck and a decoder, whose binary latents can be searched by a
genetic algorithm (tournament selection, uniform crossover, bit-flip mutation, elitism), a drop-in for
vector-quantize-pytorch 1.32.0's `EvoLFQ`: same constructor, forward, outputs, methods and state_dict
keys, and the search draws from torch's RNG in the same calls with the same shapes, so a seed gives the
same populations. Where it differs from 1.32.0 is listed in docs/quantizers.md.
"""

from __future__ import annotations

import contextlib
from collections import namedtuple

import torch
from torch import nn

from .arguments import check_arguments, describe
from .lfq import LFQ

EvoLFQReturn = namedtuple("Return", ["reconstructed", "indices", "entropy_aux_loss"])
"""EvoLFQ.forward's output: the decoder's output, LFQ's indices, LFQ's aux loss ()."""

EvolveResult = namedtuple("Result", ["pop_bits", "best_gene", "best_fitness", "best_decoded"])
"""One generation of EvoLFQ.evolve: the next population (P, ...), the fittest gene evaluated so far
(...), its fitness (a float) and, with return_best_decoded, its decoding (else None)."""


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """module in eval mode inside the block, its training mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class EvoLFQ(nn.Module):
    """encoder -> `LFQ` -> decoder, as vector-quantize-pytorch 1.32.0's `EvoLFQ`. lfq: an `LFQ`, or None
    to build one from dim / codebook_size / num_codebooks and lfq_kwargs.

    forward(x, **lfq_forward_kwargs) -> EvoLFQReturn(decoder(quantized), indices, aux loss ()); latents
    (B, d) from the encoder are quantized as one token each. Genes are the bits (or with is_sign the
    signs +-1) of the LFQ's quantized latents, float32 (..., bits); `evolve` yields an `EvolveResult`
    per generation, maximizing fitness_fn(decoded (P, ...), genes (P, ...)) -> (P,) fitnesses.
    """

    def __init__(
        self,
        encoder,
        decoder,
        lfq: LFQ | None = None,
        *,
        dim=None,
        codebook_size=None,
        num_codebooks=1,
        pop_size=64,
        mutation_rate=0.02,
        tournament_size=2,
        elitism_count=1,
        generations=50,
        **lfq_kwargs,
    ):
        super().__init__()
        for name, value in (("encoder", encoder), ("decoder", decoder)):
            if not callable(value):
                raise TypeError(f"{name} must be a module (callable), got {describe(value)}")
        check_arguments(
            pop_size=pop_size,
            mutation_rate=mutation_rate,
            tournament_size=tournament_size,
            elitism_count=elitism_count,
            generations=generations,
        )
        if pop_size <= elitism_count:
            raise ValueError(f"pop_size must be greater than elitism_count={elitism_count}, got {pop_size}")
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ValueError("EvoLFQ needs either an lfq instance or dim / codebook_size")
            lfq = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **lfq_kwargs)
        elif not isinstance(lfq, LFQ):
            raise TypeError(f"lfq must be a fastvq.LFQ or None, got {describe(lfq)}")
        self.encoder, self.decoder, self.lfq = encoder, decoder, lfq
        self.pop_size, self.mutation_rate, self.generations = pop_size, mutation_rate, generations
        self.tournament_size, self.elitism_count = tournament_size, elitism_count

    @property
    def device(self) -> torch.device:
        """Where the LFQ (and the populations it draws) live."""
        return self.lfq.mask.device

    def _quantize_latents(self, x, **kwargs):
        """The LFQ's (quantized, indices, aux loss) for encoder(x); (B, d) latents as one token each."""
        latents = self.encoder(x)
        if latents.dim() != 2:
            return self.lfq(latents, **kwargs)
        quantized, indices, aux_loss = self.lfq(latents[:, None], **kwargs)
        return quantized[:, 0], indices[:, 0], aux_loss

    def forward(self, x, **kwargs):
        quantized, indices, aux_loss = self._quantize_latents(x, **kwargs)
        return EvoLFQReturn(self.decoder(quantized), indices, aux_loss)

    @torch.no_grad()
    def encode(self, x, return_signs=False) -> torch.Tensor:
        """The genes of x (in eval mode): the bits of its LFQ codes (..., codebook_dim [* num_codebooks])
        float32, 1 (or +1 with return_signs) for a set bit, else 0 (-1)."""
        with evaluating(self):
            indices = self._quantize_latents(x)[1]
        bits = (indices[..., None] & self.lfq.mask) != 0
        bits = bits.flatten(-2) if self.lfq.keep_num_codebooks_dim else bits
        return torch.where(bits, 1.0, -1.0) if return_signs else bits.float()

    @torch.no_grad()
    def decode_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """bits (..., codebook_dim [* num_codebooks]) (> 0: 1) -> decoder(the LFQ's codes of those
        bits) (..., *the decoder's output), in eval mode."""
        if not isinstance(bits, torch.Tensor) or bits.dim() < 1:
            raise TypeError(f"bits must be a tensor (..., bits), got {describe(bits)}")
        with evaluating(self):
            leading, width = bits.shape[:-1], bits.shape[-1]
            flat = (bits > 0).int().reshape(-1, width)
            lfq = self.lfq
            if lfq.num_codebooks > 1 and width == lfq.codebook_dim * lfq.num_codebooks:
                flat = flat.unflatten(-1, (lfq.num_codebooks, lfq.codebook_dim))
            else:
                flat = flat[:, None]
            indices = (flat * lfq.mask).sum(-1)
            if not lfq.keep_num_codebooks_dim and indices.shape[-1] == 1:
                indices = indices[:, 0]
            codes = lfq.indices_to_codes(indices)
            return self.decoder(codes.reshape(*leading, codes.shape[-1]))

    # ------------------------------------------------------------------------------------------
    # the genetic algorithm; every draw is 1.32.0's (same calls, shapes and order)
    # ------------------------------------------------------------------------------------------

    def init_random_population(self, pop_size=None, shape=None, device=None, is_sign=False) -> torch.Tensor:
        """(pop_size, *shape) random genes, float32 bits (signs with is_sign)."""
        pop_size = self.pop_size if pop_size is None else pop_size
        if shape is None:
            raise ValueError("shape (of one gene) must be given to draw a random population")
        bits = torch.randint(0, 2, (pop_size, *shape), device=self.device if device is None else device).float()
        return torch.where(bits > 0, 1.0, -1.0) if is_sign else bits

    def init_population_from_data(self, x, pop_size=None, mutation_rate=None, is_sign=False) -> torch.Tensor:
        """The genes of x, the batch repeated (or cut) to pop_size, then mutated: (pop_size, ...)."""
        pop_size = self.pop_size if pop_size is None else pop_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        genes = self.encode(x, return_signs=is_sign)
        repeats = -(-pop_size // genes.shape[0])
        genes = genes.repeat(repeats, *[1] * (genes.dim() - 1))[:pop_size]
        return self.mutate(genes, mutation_rate=mutation_rate, is_sign=is_sign) if mutation_rate > 0 else genes

    def uniform_crossover(self, parent1: torch.Tensor, parent2: torch.Tensor) -> torch.Tensor:
        """Each gene position from parent1 or parent2 with probability 1/2."""
        return torch.where(torch.rand_like(parent1.float()) < 0.5, parent1, parent2)

    def mutate(self, population: torch.Tensor, mutation_rate=None, is_sign=False) -> torch.Tensor:
        """Each gene position flipped with probability mutation_rate (bits: 1 - b; signs: -s)."""
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand_like(population.float()) < mutation_rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_winners(self, fitnesses: torch.Tensor, shape: tuple, tournament_size=None) -> torch.Tensor:
        """Indices (*shape) into the population of fitnesses (P,), each the fittest of tournament_size
        members drawn uniformly with replacement."""
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        contenders = torch.randint(0, fitnesses.shape[0], (*shape, tournament_size), device=self.device)
        return contenders.gather(-1, fitnesses[contenders].argmax(-1, keepdim=True))[..., 0]

    def tournament_selection(self, population, fitnesses, tournament_size=None) -> torch.Tensor:
        """population (P, ...) -> P tournament winners (P, ...)."""
        return population[self.tournament_winners(fitnesses, (population.shape[0],), tournament_size)]

    @torch.no_grad()
    def step(
        self,
        pop_bits,
        fitness_fn,
        tournament_size=None,
        mutation_rate=None,
        elitism_count=None,
        is_sign=False,
        batch_size=None,
        **kwargs,
    ):
        """One generation: (the next population (P, ...): the elitism_count fittest, then children of
        two tournament winners each, crossed over and mutated; the fitnesses (P,) of pop_bits).
        batch_size: decode the population that many genes at a time."""
        elitism_count = self.elitism_count if elitism_count is None else elitism_count
        pop_size = pop_bits.shape[0]
        chunks = pop_bits.split(batch_size) if batch_size is not None else (pop_bits,)
        decoded = torch.cat([self.decode_bits(chunk) for chunk in chunks])
        fitnesses = fitness_fn(decoded, pop_bits)
        if not isinstance(fitnesses, torch.Tensor):
            fitnesses = torch.tensor(fitnesses, device=self.device, dtype=torch.float32)
        if fitnesses.shape != (pop_size,):
            raise ValueError(f"fitness_fn must return one fitness per gene ({pop_size},), got {describe(fitnesses)}")
        elites = pop_bits[torch.argsort(fitnesses, descending=True)[:elitism_count]].clone()
        parents = self.tournament_winners(fitnesses, (pop_size - elitism_count, 2), tournament_size)
        offspring = self.uniform_crossover(pop_bits[parents[:, 0]], pop_bits[parents[:, 1]])
        offspring = self.mutate(offspring, mutation_rate=mutation_rate, is_sign=is_sign)
        return torch.cat([elites, offspring]), fitnesses

    @torch.no_grad()
    def evolve(
        self,
        fitness_fn,
        pop_bits=None,
        pop_size=None,
        shape=None,
        generations=None,
        is_sign=False,
        return_best_decoded=False,
        **step_kwargs,
    ):
        """Yield an EvolveResult per generation (generations of them), from pop_bits or a random
        population of pop_size genes of this shape."""
        generations = self.generations if generations is None else generations
        if pop_bits is None:
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness, best_gene, best_decoded = float("-inf"), None, None
        for _ in range(generations):
            evaluated = pop_bits
            pop_bits, fitnesses = self.step(evaluated, fitness_fn, is_sign=is_sign, **step_kwargs)
            fittest = torch.argmax(fitnesses)
            if fitnesses[fittest].item() > best_fitness:
                best_fitness, best_gene = fitnesses[fittest].item(), evaluated[fittest].clone()
            if return_best_decoded:
                best_decoded = self.decode_bits(best_gene[None])[0]
            yield EvolveResult(pop_bits, best_gene, best_fitness, best_decoded)
