"""Run configuration: the models the command trains (tokenizers, and generative models over a
trained tokenizer's codes or latents), per-model defaults, presets, and the `RunConfig` stored in
every checkpoint."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from typing import Any

import torch
from torch import nn

from fastvq.models import QUANTIZERS, VQGAN, VQVAE, CodePrior, LatentDiffusion, VQModel
from fastvq.models.quantizers import WITHOUT_EMA

from .errors import SettingError
from .settings import check_choice_setting, check_setting, conforms, describe, parse_text

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""--precision: the autocast dtype of the model's forward and losses (None: no autocast)."""

MODELS: dict[str, type[VQModel]] = {"vqvae": VQVAE, "vqgan": VQGAN}
"""Tokenizers: trained on images."""

GENERATORS: dict[str, type[nn.Module]] = {"prior": CodePrior, "diffusion": LatentDiffusion}
"""Generative models, trained on what a trained tokenizer (`RunConfig.tokenizer`) makes of images:
its codes (prior) or its pre-quantization latents (diffusion)."""

GENERATOR_DERIVED = {"num_codes", "grid", "codebook", "channels", "backend", "precision"}
"""Constructor arguments of GENERATORS that come from the tokenizer, not from --set."""
GENERATOR_EXTRA: dict[str, dict[str, Any]] = {"prior": {"codebook_init": bool}, "diffusion": {}}
"""--set keys of GENERATORS that are not constructor arguments, and their types: codebook_init
starts the prior's output layer from the tokenizer's codebook."""
MIN_IMAGE_SIZE = 11
"""The smallest training crop: the final evaluation's SSIM slides an 11-pixel Gaussian window
(sigma 1.5, `fastvq.app.metrics.ssim`) over the images."""

# Per-model run defaults: Adam settings of the two papers' reference code.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqvae": {"image_size": 64, "batch_size": 32, "lr": 2e-4, "betas": [0.9, 0.999]},
    "vqgan": {"image_size": 128, "batch_size": 8, "lr": 1e-4, "betas": [0.5, 0.9]},
    # image_size None: the tokenizer's training size. num_eval: held-out images scored by the loss.
    "prior": {"data": None, "image_size": None, "batch_size": 64, "lr": 3e-4, "betas": [0.9, 0.95], "num_eval": 1000},
    "diffusion": {
        "data": None,
        "image_size": None,
        "batch_size": 64,
        "lr": 2e-4,
        "betas": [0.9, 0.999],
        "num_eval": 1000,
    },
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A few minutes on a 2-core CPU. One thread: for models this small, on a busy 2-core machine,
    # 11 steps/s against 1.6-2.4 with two (vqvae demo, load 4-15), and the results (whose last bits
    # depend on the thread count) do not depend on the machine's load.
    "demo": {
        "vqvae": {
            "image_size": 32,
            "batch_size": 32,
            "steps": 2000,
            "lr": 1e-3,
            "ckpt_every": 500,
            "threads": 1,
            "model_args": {
                "channels": 64,
                "res_channels": 32,
                "num_res_blocks": 2,
                "downsample": 4,
                "codebook_dim": 64,
                "codebook_size": 512,
                "kmeans_init": True,
                "threshold_ema_dead_code": 2,
            },
        },
        "vqgan": {
            "image_size": 32,
            "batch_size": 16,
            "steps": 600,
            "lr": 5e-4,
            "ckpt_every": 200,
            "threads": 1,
            "model_args": {
                "channels": 32,
                "ch_mult": [1, 2, 2],
                "num_res_blocks": 1,
                "z_channels": 64,
                "norm_groups": 8,
                "codebook_dim": 64,
                "codebook_size": 512,
                "disc_channels": 32,
                "disc_layers": 2,
                "disc_start": 400,
                "disc_weight": 0.1,
                "kmeans_init": True,
                "threshold_ema_dead_code": 2,
            },
        },
        # Second stage of the MNIST demo, over a tokenizer trained with --preset demo --data mnist
        # --codebook-dim 4 (diffusion needs latents of few channels, as LDM's D = 3-4). Two threads:
        # these models are matmul- and conv-bound (about 1.8x faster than one on an idle 2-core
        # machine), and a fixed count keeps the results independent of the machine's load.
        "prior": {
            "batch_size": 32,
            "steps": 2000,
            "lr": 1e-3,
            "ckpt_every": 500,
            "threads": 2,
            "model_args": {"dim": 128, "depth": 4, "heads": 4},
        },
        "diffusion": {
            "batch_size": 64,
            "steps": 1500,
            "lr": 1e-3,
            "ckpt_every": 500,
            "threads": 2,
            "model_args": {"width": 64},
        },
    },
    # Sized for one GPU: 128 px crops, 16x16 codes.
    "gpu": {
        "vqvae": {
            "image_size": 128,
            "batch_size": 64,
            "steps": 20000,
            "ckpt_every": 1000,
            "model_args": {
                "channels": 256,
                "res_channels": 64,
                "downsample": 8,
                "codebook_dim": 64,
                "codebook_size": 1024,
                "kmeans_init": True,
                "threshold_ema_dead_code": 2,
            },
        },
        "vqgan": {
            "image_size": 128,
            "batch_size": 16,
            "steps": 20000,
            "ckpt_every": 1000,
            "model_args": {
                "channels": 128,
                "ch_mult": [1, 1, 2, 4],
                "num_res_blocks": 2,
                "codebook_dim": 256,
                "codebook_size": 1024,
                "disc_start": 5000,
                "kmeans_init": True,
                "threshold_ema_dead_code": 2,
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
    key). Unknown models, presets, settings or model arguments, and settings out of range or that
    a run could not finish with (`check_run_config`), raise ValueError (SettingError)."""
    config = preset_config(model, preset, **overrides)
    check_run_config(config, training=True)
    return RunConfig(**config.to_dict())


def preset_config(model: str = "vqvae", preset: str | None = None, **overrides: Any) -> RunConfig:
    """`make_config` without `check_run_config` (which builds the model on the meta device): the
    defaults that --help shows."""
    if model not in MODELS and model not in GENERATORS:
        raise SettingError(
            "{model} must be one of {choices}, got {value!r}", choices=", ".join([*MODELS, *GENERATORS]), value=model
        )
    if preset is not None and preset not in PRESETS:
        raise SettingError("{preset} must be one of {choices}, got {value!r}", choices=", ".join(PRESETS), value=preset)
    if preset is not None and model not in PRESETS[preset]:
        raise SettingError(
            "{preset} %s has no settings for {model} %s; presets for it: %s"
            % (preset, model, ", ".join(p for p in PRESETS if model in PRESETS[p]) or "none")
        )
    settings: dict[str, Any] = {**RUN_DEFAULTS[model], **(PRESETS[preset][model] if preset else {})}
    model_args = {**settings.pop("model_args", {}), **overrides.pop("model_args", {})}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown run settings {unknown}; known: {sorted(known)}")
    return RunConfig(model=model, model_args=model_args, **{**settings, **overrides})


def model_arg_names(model: str) -> list[str]:
    """The --set keys of ``model``, in constructor order."""
    if model in MODELS:
        return [p for p in inspect.signature(MODELS[model]).parameters if p != "quantizer"]
    params = [p for p in inspect.signature(GENERATORS[model]).parameters if p not in GENERATOR_DERIVED]
    return params + sorted(GENERATOR_EXTRA[model])


def model_arg_types(model: str) -> dict[str, Any]:
    """The declared type of each --set key of ``model`` (its constructor's annotations)."""
    hints = typing.get_type_hints((MODELS.get(model) or GENERATORS[model]).__init__)
    if model in GENERATORS:
        hints.update(GENERATOR_EXTRA[model], num_classes=int | None)  # None: the classes of the data
    return {name: hints.get(name, Any) for name in model_arg_names(model)}


def check_model_args(model: str, model_args: dict[str, Any]) -> None:
    """Raise ValueError naming any argument that ``model`` does not take, and SettingError naming
    one whose value is not of its declared type."""
    types = model_arg_types(model)
    unknown = sorted(set(model_args) - set(types))
    if unknown:
        raise ValueError(f"{model} takes no argument {unknown}; valid: {sorted(types)}")
    for key, value in model_args.items():
        if not conforms(value, types[key]):
            raise SettingError(
                "{model_args} %s=%s: expected %s" % (key, _escaped(json.dumps(value)), describe(types[key]))
            )


def parse_model_args(model: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """--set KEY=TEXT pairs of ``model`` as typed values, each parsed by its declared type (a
    boolean takes true/false, yes/no or 1/0 in any case; none where None is allowed); an unknown
    key or a value that is not of its type raises naming it and what was expected."""
    types = model_arg_types(model)
    check_model_args(model, {key: None for key, _ in pairs if key not in types})
    values = {}
    for key, text in pairs:
        try:
            values[key] = parse_text(text, types[key])
        except ValueError as err:
            raise SettingError("{model_args} %s=%s: %s" % (key, _escaped(text), err)) from None
    return values


def _escaped(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def check_run_config(config: RunConfig, training: bool = False) -> None:
    """Raise SettingError naming the first setting of ``config`` of the wrong type or out of range,
    among them a model argument the model's constructor refuses (the model is built on the meta
    device: nothing is allocated, whatever the arguments ask for). ``training``: also what a run here
    needs: the image size (at least MIN_IMAGE_SIZE for the final evaluation, a multiple of the model's
    factor) and threads no more than this machine's CPUs."""
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        value = getattr(config, field.name)
        if not conforms(value, hints[field.name]):
            raise SettingError(
                "{%s} must be %s, got {value!r}" % (field.name, describe(hints[field.name])), value=value
            )
        if training or field.name != "threads":  # a run recorded on a machine of more CPUs is still valid
            check_setting(field.name, value)

    for name, choices in (("model", [*MODELS, *GENERATORS]), ("quantizer", QUANTIZERS), ("precision", PRECISIONS)):
        check_choice_setting(name, getattr(config, name), list(choices))
    check_model_args(config.model, config.model_args)
    for name in ("codebook_size", "codebook_dim"):  # flags of their own
        check_setting(name, config.model_args.get(name))
    if config.model in MODELS:
        check_quantizer_args(config.quantizer, config.model_args)
        for name in ("data", "image_size"):
            if getattr(config, name) is None:
                raise SettingError("{%s} is needed by {model} %s" % (name, config.model))
    model = _meta_model(config)
    if training and config.model in MODELS:
        _check_image_size(config.image_size, model.downsample)


def _meta_model(config: RunConfig) -> nn.Module:
    """The model ``config`` describes, built on the meta device (generators with placeholder code
    counts, grids and channels: those come from the tokenizer)."""
    args = {k: v for k, v in config.model_args.items() if k not in GENERATOR_EXTRA.get(config.model, {})}
    if config.model == "prior":
        args = {"num_codes": 2, "grid": (1, 1), **{k: v for k, v in args.items() if v is not None}}
    elif config.model == "diffusion":
        args = {"channels": 1, **{k: v for k, v in args.items() if v is not None}}
    try:
        with torch.device("meta"):
            if config.model in MODELS:
                return MODELS[config.model](**args, quantizer=config.quantizer)
            return GENERATORS[config.model](**args)
    except (ValueError, TypeError, RuntimeError) as err:  # the last two: sizes torch refuses even on meta
        raise SettingError("{model_args} %s" % _escaped(str(err).splitlines()[0])) from None


def _check_image_size(size: int, factor: int) -> None:
    smallest = -(-MIN_IMAGE_SIZE // factor) * factor
    if size < MIN_IMAGE_SIZE:
        raise SettingError(
            "{image_size} %d is below %d, the side the final evaluation needs (SSIM's window); the "
            "smallest size for this model is %d" % (size, MIN_IMAGE_SIZE, smallest)
        )
    if size % factor:
        raise SettingError(
            "{image_size} %d is not a multiple of the model's downsampling factor %d (try %d)"
            % (size, factor, max(smallest, size // factor * factor))
        )


OFF_VALUES = {"rotation_trick": "false", "kmeans_init": "false", "threshold_ema_dead_code": "0"}
"""Model arguments of the EMA quantizers that the quantizers without EMA lack, and their 'off' values."""

WITHOUT_EMA_KIND = {
    "taming": "a learnable codebook without EMA",
    "simvq": "a learned map of a frozen codebook",
    "ibq": "a learnable codebook trained through a softmax",
}


def check_quantizer_args(quantizer: str, model_args: dict[str, Any]) -> None:
    """Raise SettingError naming the settings that turn off what ``quantizer`` cannot do."""
    used = [key for key in WITHOUT_EMA.get(quantizer, ()) if model_args.get(key)]
    if used:
        fix = " ".join("{model_args} %s=%s" % (key, OFF_VALUES[key]) for key in used)
        raise SettingError(
            "{quantizer} %s has no %s (%s); turn %s off with %s, "
            "or choose {quantizer} fastvq or vector-quantize-pytorch"
            % (quantizer, ", ".join(used), WITHOUT_EMA_KIND[quantizer], "it" if len(used) == 1 else "them", fix)
        )


def build_model(kind: str, model_args: dict[str, Any], quantizer: str) -> VQModel:
    """Instantiate ``MODELS[kind](**model_args, quantizer=quantizer)``."""
    check_model_args(kind, model_args)
    return MODELS[kind](**model_args, quantizer=quantizer)
