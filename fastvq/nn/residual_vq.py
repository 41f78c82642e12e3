"""`ResidualVQ` and `GroupedResidualVQ`: drop-ins for vector-quantize-pytorch 1.32.0's residual
quantizers (SoundStream / EnCodec / DAC), each stage a `fastvq.VectorQuantize`.

Same constructor arguments, defaults, outputs and state_dict keys as 1.32.0. The input layout is
parsed once and every stage runs on canonical tokens (B, S, codebook_dim), so no stage builds an
N x K distance matrix or one-hot; beam search keeps (B, S, beam, beam) candidates from the fused
top-k, never N x beam x K.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from . import distributed
from .arguments import check_arguments, check_stage_indices, describe, is_integer_tensor
from .gradient_estimators import directional_reparam
from .implicit_codebook import ImplicitCodebookMLP, conditioned_codes_from_indices, implicit_stage
from .layout import expand_like, from_tokens, sequence_mask, to_index_layout, to_tokens
from .projection import project, projections
from .vector_quantize import VectorQuantize


def frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    """t with its gradient scaled by frac (0: detached)."""
    return t.detach() if frac <= 0 else frac * t + (1.0 - frac) * t.detach()


def synced_seed(device: torch.device, high: int = 10_000) -> int:
    """A random int in [0, high) from the device's generator, summed over ranks (as 1.32.0, so the
    same torch.manual_seed gives the same quantize-dropout stage)."""
    seed = torch.randint(0, high, (), device=device)
    if distributed.is_distributed():
        torch.distributed.all_reduce(seed)
    return int(seed.item())


def grouped_forward(rvqs, x: torch.Tensor, split_dim: int, return_all_codes: bool, **forward_kwargs) -> tuple:
    """Each residual quantizer of rvqs on its chunk of x's channels (at split_dim), all with one quantize
    dropout seed (drawn by `synced_seed` in training, as 1.32.0): (the outputs concatenated at split_dim,
    each further output stacked over the groups, with return_all_codes a tuple of each group's all_codes)."""
    seed = synced_seed(x.device) if rvqs.training else None
    outs = [
        rvq(chunk, return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed, **forward_kwargs)
        for rvq, chunk in zip(rvqs, x.chunk(len(rvqs), dim=split_dim))
    ]
    parts = list(zip(*outs))
    all_codes = (parts.pop(),) if return_all_codes else ()
    return (torch.cat(parts[0], dim=split_dim), *(torch.stack(part) for part in parts[1:]), *all_codes)


def last_stage(
    num_quantizers: int,
    dropout: bool,
    fixed_seed: int | None,
    device: torch.device,
    cutoff_index: int,
    multiple_of: int,
) -> int:
    """The last stage a residual quantizer runs: with quantize dropout (in training) a random one in
    [cutoff_index, num_quantizers), rounded up to end a multiple of `multiple_of` stages, as 1.32.0
    (from `random.Random(seed)`, the seed drawn by `synced_seed` unless given); else the last."""
    if not dropout:
        return num_quantizers - 1
    seed = synced_seed(device) if fixed_seed is None else fixed_seed
    last = random.Random(seed).randrange(cutoff_index, num_quantizers)
    return last if multiple_of == 1 else math.ceil((last + 1) / multiple_of) * multiple_of - 1


class ResidualVQ(nn.Module):
    """Residual vector quantization (Zeghidour et al. 2021, arXiv:2107.03312, algorithm 1);
    arguments as vector-quantize-pytorch 1.32.0, the rest passed to each stage's `VectorQuantize`.

    x in the layout the layout keywords say ((B, N, dim), (B, dim), (B, dim, N) with
    channel_last=False, (B, dim, H, W) with accept_image_fmap, (B, dim, D, H, W) with
    accept_3d_fmap); any float dtype. forward -> quantized (like x), indices int64 (x's token layout
    + a last dim of num_quantizers; -1 for dropped-out stages, masked and non-finite tokens) and
    losses (num_quantizers,) float32, plus all_codes (num_quantizers, *token layout, codebook_dim)
    with return_all_codes.

    The layout is parsed once: every stage is a `VectorQuantize` on token sequences (B, S,
    codebook_dim), driven through its public forward. With `implicit_neural_codebook` (QINCo)
    stage q > 0 searches its learnable codebook as conditioned by an MLP (`mlps[q - 1]`, built from
    `mlp_kwargs`) on the quantized-so-far output, in blocks of codes (`fastvq.nn.implicit_codebook`),
    never as an (N, K, D) tensor. `diveq=True` (DiVeQ) learns the codebooks by gradient through
    `directional_reparam` of the summed codes, in training and eval (as 1.32.0).
    """

    def __init__(
        self,
        *,
        dim,
        num_quantizers=None,
        codebook_size,
        codebook_dim=None,
        shared_codebook=False,
        diveq=False,
        heads=1,
        quantize_dropout=False,
        quantize_dropout_cutoff_index=0,
        quantize_dropout_multiple_of=1,
        accept_image_fmap=False,
        implicit_neural_codebook=False,
        mlp_kwargs=None,
        beam_size=None,
        eval_beam_size=None,
        beam_score_quantizer_weights=None,
        quant_grad_frac=0.0,
        return_zeros_for_masked_padding=True,
        **vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError(f"ResidualVQ needs heads=1 (as vector-quantize-pytorch), got heads={heads!r}")
        sizes = tuple(codebook_size) if isinstance(codebook_size, (tuple, list)) else None
        if num_quantizers is None and sizes is None:
            raise ValueError("pass num_quantizers, or codebook_size as a tuple of one size per quantizer")
        check_arguments(
            dim=dim,
            num_quantizers=num_quantizers,
            beam_size=beam_size,
            eval_beam_size=eval_beam_size,
            quantize_dropout_cutoff_index=quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=quantize_dropout_multiple_of,
        )
        sizes = sizes or (codebook_size,) * num_quantizers
        if num_quantizers is not None and len(sizes) != num_quantizers:
            raise ValueError(f"codebook_size must have num_quantizers={num_quantizers} entries, got {len(sizes)}")
        for size in sizes:
            check_arguments(codebook_size=size)
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size (as vector-quantize-pytorch)")
        weights = [1.0] * len(sizes) if beam_score_quantizer_weights is None else list(beam_score_quantizer_weights)
        if len(weights) != len(sizes):
            raise ValueError(
                f"beam_score_quantizer_weights must have one weight per quantizer ({len(sizes)}), got {len(weights)}"
            )
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError(f"shared_codebook needs one codebook_size for every quantizer, got {sizes}")

        self.dim, self.num_quantizers, self.codebook_sizes = dim, len(sizes), sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.codebook_dim = dim if codebook_dim is None else codebook_dim
        self.has_projections = self.codebook_dim != dim
        self.project_in, self.project_out = projections(dim, self.codebook_dim)
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = vq_kwargs.pop("channel_last", True)
        self.accept_3d_fmap = vq_kwargs.pop("accept_3d_fmap", False)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.shared_codebook = shared_codebook
        if shared_codebook:  # the shared layer's EMA and in-place optimizer step once per forward
            vq_kwargs.update(manual_ema_update=True, manual_in_place_optimizer_update=True)
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        if self.implicit_neural_codebook:
            if beam_size is not None and beam_size > 1:
                raise ValueError(
                    f"beam_size needs implicit_neural_codebook=False (as vector-quantize-pytorch), got {beam_size}"
                )
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        self.diveq = bool(diveq)
        if self.diveq:  # DiVeQ: codebooks learnt through directional_reparam on the summed output
            vq_kwargs.update(
                ema_update=False, learnable_codebook=True, route_gradients_to_input=False, commitment_weight=0.0
            )
        self.layers = nn.ModuleList(
            VectorQuantize(
                dim=self.codebook_dim,
                codebook_size=size,
                codebook_dim=self.codebook_dim,
                return_zeros_for_masked_padding=return_zeros_for_masked_padding,
                **vq_kwargs,
            )
            for size in sizes
        )
        if shared_codebook:
            for layer in self.layers[1:]:
                layer.use_codebook(self.layers[0].token_quantizer)
        self.quantize_dropout = bool(quantize_dropout) and self.num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.quant_grad_frac = 1.0 if self.diveq else quant_grad_frac
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        self.register_buffer("beam_score_weights", torch.tensor(weights), persistent=False)
        self.mlps = (None,) * (self.num_quantizers - 1)
        if self.implicit_neural_codebook:
            l2norm_output = bool(vq_kwargs.get("use_cosine_sim", False))
            self.mlps = nn.ModuleList(
                ImplicitCodebookMLP(dim=self.codebook_dim, l2norm_output=l2norm_output, **(mlp_kwargs or {}))
                for _ in range(self.num_quantizers - 1)
            )

    # ------------------------------------------------------------------------------------------
    # codebooks
    # ------------------------------------------------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(num_quantizers, K, codebook_dim), or a tuple of (K_q, codebook_dim) for mixed sizes."""
        codebooks = tuple(layer.codebook for layer in self.layers)
        return torch.stack(codebooks) if self.uniform_codebook_size else codebooks

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, ..., q <= num_quantizers; -1: dropped) -> codes (num_quantizers, B, ..., codebook_dim),
        zeros for -1 and for the quantizers beyond q (given only with quantize_dropout)."""
        given = check_stage_indices(indices, self.num_quantizers, self.quantize_dropout)
        if self.implicit_neural_codebook:
            flat = conditioned_codes_from_indices(self.layers[:given], self.mlps, indices.reshape(-1, given))
            codes = [stage_codes.reshape(*indices.shape[:-1], -1) for stage_codes in flat]
        else:
            codes = [layer.get_codes_from_indices(indices[..., q]) for q, layer in enumerate(self.layers[:given])]
        codes += [codes[0].new_zeros(codes[0].shape)] * (self.num_quantizers - given)
        return torch.stack(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as quantized for these indices, channel last: (B, ..., dim)."""
        return project(self.project_out, self.get_codes_from_indices(indices).sum(0))

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        x,
        mask=None,
        indices=None,
        return_all_codes=False,
        sample_codebook_temp=None,
        freeze_codebook=False,
        beam_size=None,
        rand_quantize_dropout_fixed_seed=None,
    ):
        """Quantize x stage by stage (see the class docstring for shapes); in training also update
        the codebooks. With `indices` (target codes, (B, ..., num_quantizers)): (quantized, the sum
        over stages of the cross-entropy of each stage's code logits against its target), each
        stage seeing the residual left by the previous targets (1.32.0 raises there)."""
        tokens, layout = to_tokens(
            x,
            self.dim,
            channel_last=self.channel_last,
            accept_image_fmap=self.accept_image_fmap,
            accept_3d_fmap=self.accept_3d_fmap,
        )
        batch, seq = tokens.shape[:2]
        mask = sequence_mask(mask, None, layout, batch, seq)
        z = project(self.project_in, tokens)
        stage_kwargs = dict(sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook)
        if indices is not None and self.implicit_neural_codebook:
            raise ValueError(
                "indices (the cross-entropy against target codes) needs implicit_neural_codebook=False "
                "(vector-quantize-pytorch 1.32.0 fails on it too)"
            )
        if indices is not None:
            return self._teacher_forced(tokens, z, mask, indices, layout, stage_kwargs)
        check_arguments(beam_size=beam_size)
        beam = beam_size or (self.beam_size if self.training else self.eval_beam_size)
        if beam is not None and beam > 1 and self.implicit_neural_codebook:
            raise ValueError(
                f"beam search needs implicit_neural_codebook=False (as vector-quantize-pytorch), got beam_size={beam}"
            )
        dropout = self.training and self.quantize_dropout
        last = last_stage(
            self.num_quantizers,
            dropout,
            rand_quantize_dropout_fixed_seed,
            x.device,
            self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of,
        )
        if beam is not None and beam > 1:
            quantized, idx, losses, inputs = self._beam_search(z, mask, beam, last, stage_kwargs)
        else:
            quantized, idx, losses, inputs = self._greedy(z, mask, last, stage_kwargs)
        if self.training and self.shared_codebook:
            if self.vq_is_ema_updating:
                self.layers[0].token_quantizer.update_ema()
                self.layers[0].update_in_place_optimizer()
            flat = torch.stack(inputs, 2).flatten(1, 2)  # (B, S * stages, codebook_dim)
            self.layers[0].expire_codes_(flat, None if mask is None else mask.repeat_interleave(len(inputs), 1))
        dropped = self.num_quantizers - idx.shape[-1]
        idx = torch.cat([idx, idx.new_full((batch, seq, dropped), -1)], -1)
        losses = torch.cat([losses, losses.new_zeros(dropped)])
        quantized = directional_reparam(z, quantized) if self.diveq else quantized
        out = from_tokens(self._output(quantized, tokens, mask), layout)
        idx = to_index_layout(idx, layout)
        if not return_all_codes:
            return out, idx, losses
        return out, idx, losses, self.get_codes_from_indices(idx)

    def _greedy(self, z, mask, last, stage_kwargs):
        """Stages 0..last on z (B, S, codebook_dim): quantized sum, indices (B, S, stages), losses
        (stages,), and each stage's input."""
        residual, total = z, torch.zeros_like(z)
        indices, losses, inputs = [], [], []
        for layer, mlp in zip(self.layers[: last + 1], (None, *self.mlps)):
            inputs.append(residual)
            if mlp is None:
                quantized, stage_indices, loss = layer(residual, mask=mask, **stage_kwargs)
            else:
                quantized, stage_indices, loss = implicit_stage(layer, mlp, residual, total, mask, **stage_kwargs)
            residual = residual - frac_gradient(quantized, self.quant_grad_frac)
            total = total + quantized
            indices.append(stage_indices)
            losses.append(loss)
        return total, torch.stack(indices, -1), torch.stack(losses), inputs

    def _beam_search(self, z, mask, beam, last, stage_kwargs):
        """As `_greedy`, keeping the `beam` paths of least weighted commitment loss through the
        stages (1.32.0's beam search) from each stage's fused top-k; updates the codebooks from the
        best path in training. Keeps (B, S, beam, beam) candidates, never (B, S, beam, K)."""
        batch, seq = z.shape[:2]
        scores = z.new_zeros(batch, seq, 1)
        residual, total = z.unsqueeze(2), torch.zeros_like(z).unsqueeze(2)  # (B, S, paths, D)
        indices = torch.zeros(batch, seq, 1, 0, dtype=torch.long, device=z.device)
        losses = torch.zeros(batch, seq, 1, 0, device=z.device)
        for q, layer in enumerate(self.layers[: last + 1]):
            paths = residual.shape[2]
            flat_mask = None if mask is None else mask.repeat_interleave(paths, 1)
            quantized, stage_indices, loss = layer(residual.flatten(1, 2), mask=flat_mask, topk=beam, **stage_kwargs)
            k = stage_indices.shape[-1]
            quantized = quantized.unflatten(1, (seq, paths))  # (B, S, paths, k, D)
            loss = loss.expand(batch, seq * paths, k).unflatten(1, (seq, paths))
            scores = (scores.unsqueeze(-1) - loss * self.beam_score_weights[q]).flatten(2)
            residual = (residual.unsqueeze(3) - frac_gradient(quantized, self.quant_grad_frac)).flatten(2, 3)
            total = (total.unsqueeze(3) + quantized).flatten(2, 3)
            indices = torch.cat([indices.repeat_interleave(k, 2), stage_indices.reshape(batch, seq, paths * k, 1)], -1)
            losses = torch.cat([losses.repeat_interleave(k, 2), loss.reshape(batch, seq, paths * k, 1)], -1)
            keep = beam if q < last else 1
            if scores.shape[-1] > keep:
                scores, chosen = scores.topk(keep, dim=-1)
                residual, total, indices, losses = (
                    t.gather(
                        2, chosen.reshape(*chosen.shape, *([1] * (t.dim() - 3))).expand(*chosen.shape, *t.shape[3:])
                    )
                    for t in (residual, total, indices, losses)
                )
        total, indices, losses = total[:, :, 0], indices[:, :, 0], losses[:, :, 0]
        if mask is None:
            losses = losses.mean((0, 1))
        else:
            losses = torch.where(expand_like(mask, losses), losses, 0.0).sum((0, 1)) / mask.sum().clamp_min(1e-4)
        inputs = self._stage_inputs(z.detach(), indices)
        if self.training and not stage_kwargs["freeze_codebook"]:
            for layer, stage_input, stage_indices in zip(self.layers, inputs, indices.unbind(-1)):
                layer.update_indices(stage_input, stage_indices, mask)
        return total, indices, losses, inputs

    def _stage_inputs(self, z: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        """The residual each stage saw on the path of indices (B, S, stages) from z (B, S, D):
        recomputed from the codes, so the search keeps no (B, S, beam, stages, D) tensor."""
        inputs, residual = [], z
        for layer, stage_indices in zip(self.layers, indices.unbind(-1)):
            inputs.append(residual)
            codes = layer.token_quantizer.codes_from_indices(stage_indices.reshape(1, -1), check_indices=False)[0]
            residual = residual - codes.reshape(residual.shape).to(residual.dtype)
        return inputs

    def _teacher_forced(self, tokens, z, mask, targets, layout, stage_kwargs):
        """(quantized from the targets, summed cross-entropy), stage q given z minus the codes of
        targets 0..q-1."""
        expected = (tokens.shape[0], tokens.shape[1], self.num_quantizers)
        if not is_integer_tensor(targets) or targets.numel() != math.prod(expected):
            raise ValueError(
                f"indices must be an integer tensor shaped as the returned indices "
                f"({math.prod(expected)} entries), got {describe(targets)}"
            )
        targets = targets.reshape(expected)
        if bool((targets < 0).any()):
            raise ValueError(
                "indices contain -1 (quantizers dropped out): take target codes from the module in "
                "eval mode to compute the cross-entropy"
            )
        residual, total, cross_entropy = z, torch.zeros_like(z), 0.0
        for q, layer in enumerate(self.layers):
            _, stage_cross_entropy = layer(residual, mask=mask, indices=targets[..., q], **stage_kwargs)
            codes = layer.get_codes_from_indices(targets[..., q]).to(residual.dtype)
            residual = residual - frac_gradient(codes, self.quant_grad_frac)
            total = total + codes
            cross_entropy = cross_entropy + stage_cross_entropy
        total = directional_reparam(z, total) if self.diveq else total
        return from_tokens(self._output(total, tokens, mask), layout), cross_entropy

    def _output(self, total: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Summed codes (B, S, codebook_dim) -> projected out, masked positions zero (or the input)."""
        out = project(self.project_out, total)
        if mask is None:
            return out
        fill = torch.zeros_like(out) if self.return_zeros_for_masked_padding else tokens.to(out.dtype)
        return torch.where(expand_like(mask, out), out, fill)


class GroupedResidualVQ(nn.Module):
    """`groups` independent `ResidualVQ`s, each on dim / groups channels (vector-quantize-pytorch
    1.32.0). forward -> quantized (like x), indices (groups, *token layout, num_quantizers), losses
    (groups, num_quantizers), plus with return_all_codes a tuple of each group's all_codes
    (num_quantizers, *token layout, codebook_dim)."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, **kwargs):
        super().__init__()
        check_arguments(groups=groups)
        if not isinstance(dim, int) or dim % groups:
            raise ValueError(f"dim must be a multiple of groups={groups}, got {dim!r}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(
            ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs) for _ in range(groups)
        )

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self) -> int:
        rvq = self.rvqs[0]
        return 1 if self.accept_image_fmap or rvq.accept_3d_fmap or not rvq.channel_last else -1

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices) -> torch.Tensor:
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=-1)

    def forward(
        self, x, indices=None, return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False, mask=None
    ):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have dim={self.dim} channels at dim {self.split_dim}, got {describe(x)}")
        targets = tuple(indices) if indices is not None else (None,) * self.groups
        if len(targets) != self.groups:
            raise ValueError(f"indices must hold one tensor per group ({self.groups}), got {len(targets)}")
        seed = synced_seed(x.device) if self.training else None
        outs = [
            rvq(
                chunk,
                indices=target,
                return_all_codes=return_all_codes,
                sample_codebook_temp=sample_codebook_temp,
                mask=mask,
                freeze_codebook=freeze_codebook,
                rand_quantize_dropout_fixed_seed=seed,
            )
            for rvq, chunk, target in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim), targets)
        ]
        quantized = torch.cat([out[0] for out in outs], dim=self.split_dim)
        if indices is not None:
            return quantized, sum(out[1] for out in outs)
        result = (quantized, torch.stack([out[1] for out in outs]), torch.stack([out[2] for out in outs]))
        return result + ((tuple(out[3] for out in outs),) if return_all_codes else ())
