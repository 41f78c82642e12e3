"""A generative model paired with the trained tokenizer it works on: a `CodePrior` over the
tokenizer's codes ('prior') or a `LatentDiffusion` over its pre-quantization latents ('diffusion').
One module, so one checkpoint holds both and sampling needs nothing else."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastvq.models import VQModel
from fastvq.models.diffusion import decode_latents

from .config import GENERATOR_EXTRA, GENERATORS, build_model


@torch.no_grad()
def encode_targets(kind: str, tokenizer: VQModel, x: torch.Tensor) -> torch.Tensor:
    """What a `kind` model learns of images x (B, 3, H, W) in [-1, 1]: codes (B, h, w) int64 for a
    prior, pre-quantization latents (B, D, h, w) float32 for diffusion."""
    return tokenizer.encode(x) if kind == "prior" else tokenizer.encode_latents(x).float()


MAX_LATENT_SIDE = 1024
"""The longest side of a generator's code grid or latents (images of 16k pixels at a factor of 16):
a bound on what a checkpoint can ask sampling to allocate."""


class Generator(nn.Module):
    """``tokenizer`` (a trained VQModel: frozen, always in eval mode) and ``model``, the GENERATORS
    ``kind`` built from ``model_args`` (--set keys) for targets of shape ``shape`` ((h, w) codes or
    (D, h, w) latents) and ``class_names`` (empty: unconditional; else ``model_args['num_classes']``
    must be their number). ``config`` (JSON) rebuilds it with ``from_config``."""

    def __init__(
        self, kind: str, tokenizer: VQModel, model_args: dict[str, Any], shape: tuple[int, ...], class_names: list[str]
    ):
        super().__init__()
        if kind not in GENERATORS:
            raise ValueError(f"kind must be one of {sorted(GENERATORS)}, got {kind!r}")
        dims = 2 if kind == "prior" else 3
        if (
            len(shape) != dims
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
            or max(shape[-2:]) > MAX_LATENT_SIDE
        ):
            raise ValueError(
                f"shape of a {kind} must be {dims} ints >= 1, sides at most {MAX_LATENT_SIDE}, got {shape!r}"
            )
        self.kind, self.shape, self.class_names = kind, tuple(shape), list(class_names)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        args = {k: v for k, v in model_args.items() if k not in GENERATOR_EXTRA[kind]}
        if kind == "prior":
            codebook = None
            device = next(tokenizer.parameters()).device
            if model_args.get("codebook_init") and device.type == "meta":  # a build that checks shapes
                codebook = torch.empty(tokenizer.codebook_size, tokenizer.config["codebook_dim"], device=device)
            elif model_args.get("codebook_init"):
                codes = torch.arange(tokenizer.codebook_size, device=device)
                codebook = tokenizer.quantizer.get_output_from_indices(codes[None])[0].float().cpu()
            self.model = GENERATORS[kind](tokenizer.codebook_size, self.shape, codebook=codebook, **args)
        else:
            self.model = GENERATORS[kind](self.shape[0], **args)
        self.config = {
            "tokenizer": {"kind": tokenizer.kind, "model_config": tokenizer.config},
            "model_args": dict(model_args),
            "shape": list(self.shape),
            "class_names": self.class_names,
        }

    @classmethod
    def from_config(cls, kind: str, config: dict[str, Any]) -> Generator:
        """An untrained Generator of the architecture ``config`` describes (load a state_dict into it)."""
        tokenizer_config = dict(config["tokenizer"]["model_config"])
        quantizer = tokenizer_config.pop("quantizer")
        tokenizer = build_model(config["tokenizer"]["kind"], tokenizer_config, quantizer)
        return cls(kind, tokenizer, config["model_args"], tuple(config["shape"]), config["class_names"])

    @property
    def codebook_size(self) -> int:
        return self.tokenizer.codebook_size

    def train(self, mode: bool = True) -> Generator:
        super().train(mode)
        self.tokenizer.eval()  # its codebook never updates here
        return self

    def loss(self, targets: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss () fp32 of a batch of `encode_targets` outputs: cross-entropy of the codes
        (prior) or noise-prediction error (diffusion)."""
        return self.model(targets, labels) if self.kind == "prior" else self.model.loss(targets, labels)

    @torch.no_grad()
    def generate(
        self,
        num: int,
        *,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        eta: float = 0.0,
        quantize: bool = True,
        seed: int | None = None,
    ) -> torch.Tensor:
        """num new images (num, 3, H, W) float32 in about [-1, 1], decoded by the tokenizer.
        Prior: temperature, top_k (see `CodePrior.sample`). Diffusion: DDIM ``steps`` (None: see
        `LatentDiffusion.sample`), ``eta``,
        classifier-free ``guidance`` (with labels), and ``quantize`` the latents before decoding (as
        LDM does) or not. ``seed`` makes the draw reproducible. Images that are not finite raise
        ValueError (saved, they would be black)."""
        device = next(self.model.parameters()).device
        if labels is not None:
            labels = labels.to(device)
        if self.kind == "prior":
            codes = self.model.sample(
                num, labels=labels, temperature=temperature, top_k=top_k, seed=seed, device=device
            )
            images = self.tokenizer.decode(codes)
        else:
            latents = self.model.sample(
                num, self.shape[1:], steps=steps, labels=labels, guidance=guidance, eta=eta, seed=seed
            )
            images = decode_latents(self.tokenizer, latents, quantize=quantize)
        if not bool(torch.isfinite(images).all()):
            raise ValueError(
                f"the {self.kind} model generated images that are not finite (NaN or inf), which would "
                "be saved black: its weights or the sampling options make it diverge"
            )
        return images
