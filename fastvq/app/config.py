"""Run configuration: the models the command trains (tokenizers, and generative models over a
trained tokenizer's codes or latents), per-model defaults, presets, and the `RunConfig` stored in
every checkpoint."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

from torch import nn

from fastvq.models import VQGAN, VQVAE, CodePrior, LatentDiffusion, VQModel

from .errors import SettingError

MODELS: dict[str, type[VQModel]] = {"vqvae": VQVAE, "vqgan": VQGAN}
"""Tokenizers: trained on images."""

GENERATORS: dict[str, type[nn.Module]] = {"prior": CodePrior, "diffusion": LatentDiffusion}
"""Generative models, trained on what a trained tokenizer (`RunConfig.tokenizer`) makes of images:
its codes (prior) or its pre-quantization latents (diffusion)."""

GENERATOR_DERIVED = {"num_codes", "grid", "codebook", "channels", "backend", "precision"}
"""Constructor arguments of GENERATORS that come from the tokenizer, not from --set."""
GENERATOR_EXTRA = {"prior": {"codebook_init"}, "diffusion": set()}
"""--set keys of GENERATORS that are not constructor arguments: codebook_init (bool) starts the
prior's output layer from the tokenizer's codebook."""

# Per-model run defaults: Adam settings of the two papers' reference code.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqvae": {"image_size": 64, "batch_size": 32, "lr": 2e-4, "betas": [0.9, 0.999]},
    "vqgan": {"image_size": 128, "batch_size": 8, "lr": 1e-4, "betas": [0.5, 0.9]},
    # image_size None: the tokenizer's training size. num_eval: held-out images scored by the loss.
    "prior": {"data": None, "image_size": None, "batch_size": 64, "lr": 3e-4, "betas": [0.9, 0.95],
              "num_eval": 1000},
    "diffusion": {"data": None, "image_size": None, "batch_size": 64, "lr": 2e-4, "betas": [0.9, 0.999],
                  "num_eval": 1000},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A few minutes on a 2-core CPU. One thread: for models this small, on a busy 2-core machine,
    # 11 steps/s against 1.6-2.4 with two (vqvae demo, load 4-15), and the results (whose last bits
    # depend on the thread count) do not depend on the machine's load.
    "demo": {
        "vqvae": {
            "image_size": 32, "batch_size": 32, "steps": 2000, "lr": 1e-3, "ckpt_every": 500, "threads": 1,
            "model_args": {
                "channels": 64, "res_channels": 32, "num_res_blocks": 2, "downsample": 4,
                "codebook_dim": 64, "codebook_size": 512, "kmeans_init": True,
                "threshold_ema_dead_code": 2,
            },
        },
        "vqgan": {
            "image_size": 32, "batch_size": 16, "steps": 600, "lr": 5e-4, "ckpt_every": 200, "threads": 1,
            "model_args": {
                "channels": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 64,
                "norm_groups": 8, "codebook_dim": 64, "codebook_size": 512, "disc_channels": 32,
                "disc_layers": 2, "disc_start": 400, "disc_weight": 0.1, "kmeans_init": True,
                "threshold_ema_dead_code": 2,
            },
        },
        # Second stage of the MNIST demo, over a tokenizer trained with --preset demo --data mnist
        # --codebook-dim 4 (diffusion needs latents of few channels, as LDM's D = 3-4). Two threads:
        # these models are matmul- and conv-bound (about 1.8x faster than one on an idle 2-core
        # machine), and a fixed count keeps the results independent of the machine's load.
        "prior": {
            "batch_size": 32, "steps": 2000, "lr": 1e-3, "ckpt_every": 500, "threads": 2,
            "model_args": {"dim": 128, "depth": 4, "heads": 4},
        },
        "diffusion": {
            "batch_size": 64, "steps": 1500, "lr": 1e-3, "ckpt_every": 500, "threads": 2,
            "model_args": {"width": 64},
        },
    },
    # Sized for one GPU: 128 px crops, 16x16 codes.
    "gpu": {
        "vqvae": {
            "image_size": 128, "batch_size": 64, "steps": 20000, "ckpt_every": 1000,
            "model_args": {
                "channels": 256, "res_channels": 64, "downsample": 8, "codebook_dim": 64,
                "codebook_size": 1024, "kmeans_init": True, "threshold_ema_dead_code": 2,
            },
        },
        "vqgan": {
            "image_size": 128, "batch_size": 16, "steps": 20000, "ckpt_every": 1000,
            "model_args": {
                "channels": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2,
                "codebook_dim": 256, "codebook_size": 1024, "disc_start": 5000,
                "kmeans_init": True, "threshold_ema_dead_code": 2,
            },
        },
    },
}

# Settings that may differ between a run and its resumption. Results stay the same except for
# rounding, which differs with the device and the CPU thread count (a resume keeps the recorded
# count unless --threads is given).
RESUMABLE = ("steps", "ckpt_every", "log_every", "eval_every", "device", "num_eval", "threads", "workers")


@dataclasses.dataclass
class RunConfig:
    """Everything that determines a training run (stored in its checkpoints as JSON)."""

    model: str = "vqvae"
    quantizer: str = "fastvq"
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: str | None = "builtin"  # generators: None means the tokenizer's data
    image_size: int | None = 64  # generators: None means the tokenizer's
    batch_size: int = 32
    steps: int = 10000
    lr: float = 2e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 10
    eval_every: int | None = None  # None: evaluate at the end only
    holdout: float = 0.1
    num_eval: int = 64
    resize: int | None = None
    crop: int | None = None
    lpips_weights: str | None = None
    precision: str = "fp32"  # autocast dtype of the model: fp32 (none), bf16 or fp16 (with a GradScaler)
    device: str = "auto"
    workers: int | None = None  # None: fastvq.app.data.default_workers
    world_size: int = 1  # processes of a torchrun launch, set by the training loop
    threads: int | None = None  # None: fastvq.app.device.default_threads; a checkpoint records the count used
    tokenizer: str | None = None  # generators: the trained tokenizer (run folder or checkpoint)
    max_images: int | None = None  # generators: encode at most this many training images (None: all)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def make_config(model: str = "vqvae", preset: str | None = None, **overrides: Any) -> RunConfig:
    """Defaults for ``model``, then ``preset``, then ``overrides`` (``model_args`` merged key by
    key). Unknown models, presets, settings or model arguments raise ValueError."""
    if model not in MODELS and model not in GENERATORS:
        raise SettingError("{model} must be one of {choices}, got {value!r}",
                           choices=", ".join([*MODELS, *GENERATORS]), value=model)
    if preset is not None and preset not in PRESETS:
        raise SettingError("{preset} must be one of {choices}, got {value!r}", choices=", ".join(PRESETS),
                           value=preset)
    if preset is not None and model not in PRESETS[preset]:
        raise SettingError("{preset} %s has no settings for {model} %s; presets for it: %s"
                           % (preset, model, ", ".join(p for p in PRESETS if model in PRESETS[p]) or "none"))
    settings: dict[str, Any] = {**RUN_DEFAULTS[model], **(PRESETS[preset][model] if preset else {})}
    model_args = {**settings.pop("model_args", {}), **overrides.pop("model_args", {})}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown run settings {unknown}; known: {sorted(known)}")
    config = RunConfig(model=model, model_args=model_args, **{**settings, **overrides})
    check_model_args(model, model_args)
    check_quantizer_args(config.quantizer, model_args)
    return RunConfig(**config.to_dict())


def model_arg_names(model: str) -> list[str]:
    """The --set keys of ``model``, in constructor order."""
    if model in MODELS:
        return [p for p in inspect.signature(MODELS[model]).parameters if p != "quantizer"]
    params = [p for p in inspect.signature(GENERATORS[model]).parameters if p not in GENERATOR_DERIVED]
    return params + sorted(GENERATOR_EXTRA[model])


def check_model_args(model: str, model_args: dict[str, Any]) -> None:
    """Raise ValueError naming any argument that ``model`` does not take."""
    valid = set(model_arg_names(model))
    unknown = sorted(set(model_args) - valid)
    if unknown:
        raise ValueError(f"{model} takes no argument {unknown}; valid: {sorted(valid)}")


TAMING_UNSUPPORTED = {"rotation_trick": "false", "kmeans_init": "false", "threshold_ema_dead_code": "0"}
"""Model arguments of the EMA quantizers that the taming quantizer lacks, and their 'off' values."""


def check_quantizer_args(quantizer: str, model_args: dict[str, Any]) -> None:
    """Raise SettingError naming the settings that turn off what ``quantizer`` cannot do."""
    used = [key for key in TAMING_UNSUPPORTED if model_args.get(key)] if quantizer == "taming" else []
    if used:
        fix = " ".join("{model_args} %s=%s" % (key, TAMING_UNSUPPORTED[key]) for key in used)
        raise SettingError("{quantizer} taming has no %s (a learnable codebook without EMA); turn %s off with %s, "
                           "or choose {quantizer} fastvq or vector-quantize-pytorch"
                           % (", ".join(used), "it" if len(used) == 1 else "them", fix))


def build_model(kind: str, model_args: dict[str, Any], quantizer: str) -> VQModel:
    """Instantiate ``MODELS[kind](**model_args, quantizer=quantizer)``."""
    check_model_args(kind, model_args)
    return MODELS[kind](**model_args, quantizer=quantizer)
