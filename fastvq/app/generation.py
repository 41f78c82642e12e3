"""Training a prior or a diffusion model over a trained tokenizer, and sampling new images from it.

The training images are encoded once by the tokenizer (codes for a prior, pre-quantization latents
for diffusion) and held in memory; each step draws a batch from them with an RNG seeded by (seed,
step), so a resumed run sees the same batches and reaches the same weights as an uninterrupted one.
Outputs mirror a tokenizer run: checkpoint.safetensors (the tokenizer inside, so sampling needs
nothing else), metrics.json, loss.png and a grid of samples.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import loop, report
from .config import GENERATORS, RunConfig, check_model_args
from .data import ImageSource, class_labels, split_images, to_uint8
from .device import now
from .errors import SettingError
from .evaluation import encode_images
from .generators import Generator
from .progress import Progress
from .settings import check_setting
from .state import load_model

WARMUP_STEPS = 100
"""Steps of linear learning-rate warm-up (a fixed count, so --steps may change on resume)."""
GRAD_CLIP = 1.0
SAMPLE_GRID = 64
"""Images in the samples.png a training run ends with."""
LATENT_CHANNELS_PER_WIDTH = 16
"""A diffusion run warns when its latents have more than width / 16 channels (measured on MNIST
at width 64: 4 channels gave digits, 64 gave noise)."""


def generator_width(model_args: dict[str, Any]) -> int:
    """The denoiser width of diffusion ``model_args`` (its default when not set)."""
    return model_args.get("width", inspect.signature(GENERATORS["diffusion"]).parameters["width"].default)


def train_generator(
    config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True, tensorboard: bool | None = None
) -> dict[str, Any]:
    """Train ``config.model`` ('prior' or 'diffusion') over the tokenizer ``config.tokenizer`` (a
    run folder or checkpoint of ``fastvq train``), writing to ``out_dir`` through the same loop as
    `fastvq.app.training.train` (checkpoints, exact resume, Ctrl-C and SIGTERM checkpoints, the
    run-folder lock, metrics.json, loss.png, TensorBoard event files per ``tensorboard``) plus
    samples.png. Returns the metrics dict."""
    return loop.run(GeneratorTraining, config, out_dir, resume, progress, tensorboard)


def training_data(
    config: RunConfig, tokenizer_meta: dict[str, Any]
) -> tuple[RunConfig, ImageSource, ImageSource, list[str]]:
    """The run's images (training ones limited to ``max_images``, chosen by ``seed``; the first
    ``num_eval`` held-out ones) and their class names ([] without classes), with ``data`` and
    ``image_size`` resolved from the tokenizer's run where not given."""
    config = dataclasses.replace(
        config,
        data=config.data or tokenizer_meta["config"]["data"],
        image_size=config.image_size or tokenizer_meta["config"]["image_size"],
    )
    crop = config.crop if config.resize or config.crop else config.image_size
    train_images, eval_images = split_images(config.data, config.holdout, config.seed, config.resize, crop)
    if config.max_images is not None and config.max_images < len(train_images):
        chosen = np.random.default_rng(config.seed).permutation(len(train_images))[: config.max_images]
        train_images = train_images.select(np.sort(chosen))
    eval_images = eval_images.select(np.arange(min(config.num_eval, len(eval_images))))
    classes = class_labels(train_images)
    return config, train_images, eval_images, [] if classes is None else classes[1]


def labels_of(images: ImageSource, class_names: list[str]) -> torch.Tensor | None:
    """(N,) int64 indices into ``class_names`` of the images' classes; None without classes."""
    if not class_names:
        return None
    found = class_labels(images, class_names)
    return None if found is None else torch.from_numpy(found[0])


def _num_classes(config: RunConfig, class_names: list[str]) -> tuple[dict[str, Any], list[str]]:
    """model_args with num_classes resolved (default: the data's classes) and the class names used."""
    wanted = config.model_args.get("num_classes")
    if wanted is None:
        wanted = len(class_names)
    elif wanted and wanted != len(class_names):
        found = f"{len(class_names)} classes" if class_names else "no classes (images in class folders, or mnist)"
        raise SettingError(
            "{model_args} num_classes=%d, but {data} {data_value} has %s; use num_classes=0 for an "
            "unconditional model" % (wanted, found),
            data_value=config.data,
        )
    return {**config.model_args, "num_classes": wanted}, class_names if wanted else []


def _encode(
    kind: str, tokenizer, images: ImageSource, batch_size: int, device: torch.device, progress: bool
) -> torch.Tensor:
    return torch.from_numpy(encode_images(tokenizer, images, batch_size, device, progress, latents=kind == "diffusion"))


@torch.no_grad()
def eval_loss(
    generator: Generator, targets: torch.Tensor, labels: torch.Tensor | None, batch_size: int, seed: int
) -> float:
    """Mean loss over held-out targets, its noise (diffusion) drawn from ``seed``: the same number
    at every evaluation. Leaves torch's RNG and the training mode as they were."""
    training = generator.training
    generator.eval()
    device = next(generator.model.parameters()).device
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(targets), batch_size):
            batch = targets[i : i + batch_size].to(device)
            label = None if labels is None else labels[i : i + batch_size].to(device)
            total += float(generator.loss(batch, label)) * len(batch)
    generator.train(training)
    return total / len(targets)


class GeneratorTraining(loop.TrainingTask):
    """A prior or diffusion model trained on the codes or latents of ``config.tokenizer``'s
    encoding of the training images (encoded once, held in memory), each step's batch drawn by an
    RNG seeded by (seed, step); evaluated by its loss on the held-out images."""

    @classmethod
    def check(cls, config: RunConfig) -> None:
        if config.model not in GENERATORS:
            raise SettingError(
                "{model} must be one of {choices} here, got {value!r}",
                choices=", ".join(GENERATORS),
                value=config.model,
            )
        if not config.tokenizer:
            raise SettingError(
                "{model} %s needs {tokenizer}: a run folder (or checkpoint) of fastvq train with "
                "{model} vqvae or vqgan" % config.model
            )
        for name, default in (("precision", "fp32"), ("quantizer", "fastvq"), ("lpips_weights", None)):
            if getattr(config, name) != default:
                raise SettingError(
                    "{%s} applies to the tokenizers (vqvae, vqgan), not to {model} %s" % (name, config.model)
                )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SettingError("{model} %s trains in one process; run it without torchrun" % config.model)
        check_model_args(config.model, config.model_args)

    def __init__(self, config: RunConfig, run: loop.RunContext):
        self.run, self.description = run, f"train {config.model}"
        device = run.device
        tokenizer, tokenizer_meta = load_model(config.tokenizer, device)
        if tokenizer_meta["kind"] in GENERATORS:
            raise SettingError(
                "{tokenizer} {path} holds a %s model, not a tokenizer (vqvae or vqgan)" % tokenizer_meta["kind"],
                path=config.tokenizer,
            )
        config, train_images, eval_images, class_names = training_data(config, tokenizer_meta)
        model_args, self.class_names = _num_classes(config, class_names)
        self.config = config = dataclasses.replace(config, model_args=model_args)
        t0 = now(device)
        self.targets = _encode(config.model, tokenizer, train_images, config.batch_size, device, run.progress)
        self.eval_targets = _encode(config.model, tokenizer, eval_images, config.batch_size, device, run.progress)
        self.labels = labels_of(train_images, self.class_names)
        self.eval_labels = labels_of(eval_images, self.class_names)
        self.encode_seconds = now(device) - t0
        _note_latent_channels(config.model, self.targets, model_args)
        torch.manual_seed(config.seed)
        self.model = Generator(config.model, tokenizer, model_args, tuple(self.targets.shape[1:]), self.class_names).to(
            device
        )
        if config.model == "diffusion":
            self.model.model.fit_scale(self.targets)
        self.optimizers = [torch.optim.Adam(self.model.model.parameters(), lr=config.lr, betas=tuple(config.betas))]

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(targets, labels or None) of each step: ``batch_size`` training items drawn with
        replacement by an RNG seeded by (seed, step)."""
        for step in range(start, self.config.steps):
            rng = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
            take = torch.randint(len(self.targets), (self.config.batch_size,), generator=rng)
            yield (
                self.targets[take].to(self.run.device),
                None if self.labels is None else self.labels[take].to(self.run.device),
            )

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor | None]) -> dict[str, float]:
        """Adam on the loss, after a linear learning-rate warm-up over WARMUP_STEPS and gradient
        clipping at GRAD_CLIP."""
        (optimizer,) = self.optimizers
        for group in optimizer.param_groups:
            group["lr"] = self.config.lr * min(1.0, (step + 1) / WARMUP_STEPS)
        loss = self.model.loss(*batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.model.parameters(), GRAD_CLIP)
        optimizer.step()
        return {"loss": float(loss.detach())}

    def evaluate(self, step: int | None) -> tuple[dict[str, float], float]:
        loss = eval_loss(self.model, self.eval_targets, self.eval_labels, self.config.batch_size, self.config.seed)
        return {"eval_loss": loss}, loss

    def finish(
        self, evaluation: float, history: dict[str, list[float]], timing: dict[str, Any], logged: bool
    ) -> dict[str, Any]:
        """samples.png (SAMPLE_GRID images, timed) and loss.png; the metrics with held-out bits per
        code for a prior."""
        config, device = self.config, self.run.device
        self.model.eval()
        t0 = now(device)
        samples = sample_images(self.model, SAMPLE_GRID, batch_size=SAMPLE_GRID, seed=config.seed)
        sample_seconds = now(device) - t0
        metrics = {
            "kind": config.model,
            "step": config.steps,
            "config": config.to_dict(),
            "data": {
                "train_images": len(self.targets),
                "eval_images": len(self.eval_targets),
                "target_shape": list(self.targets.shape[1:]),
                "classes": self.class_names,
            },
            "eval": {
                "loss": evaluation,
                **({"bits_per_code": evaluation / math.log(2)} if config.model == "prior" else {}),
            },
            "train": {"loss": history["loss"][-1]} if history.get("loss") else {},
            "timing": {**timing, "encode_s": self.encode_seconds, "sample_s_per_image": sample_seconds / SAMPLE_GRID},
            "history": history,
        }
        report.save_samples(
            samples,
            self.run.out / "samples.png",
            *grid_layout(self.class_names),
            title=f"{config.model}, step {config.steps}, seed {config.seed}",
        )
        report.plot_curves(history, self.run.out, panels=(("loss.png", ("loss", "eval_loss"), "loss", True),))
        return metrics


def _note_latent_channels(kind: str, targets: torch.Tensor, model_args: dict[str, Any]) -> None:
    """Warn on stderr when diffusion latents have too many channels for the denoiser's width."""
    if kind == "diffusion" and targets.shape[1] > generator_width(model_args) // LATENT_CHANNELS_PER_WIDTH:
        print(
            f"note: the latents have {targets.shape[1]} channels against a denoiser width of "
            f"{generator_width(model_args)}; at 64 against 64 the demo's samples were noise. Diffusion suits "
            "latents of few channels (LDM's D = 3-4): train the tokenizer with --codebook-dim 4, or raise "
            "--set width",
            file=sys.stderr,
        )


def balanced_labels(num: int, num_classes: int) -> torch.Tensor | None:
    """0, 1, .., num_classes - 1, 0, 1, ... (num,) int64: every class equally often; None without classes."""
    return torch.arange(num) % num_classes if num_classes else None


def grid_layout(class_names: list[str], label: int | None = None) -> tuple[int, list[str] | None]:
    """Columns of a sample grid and their labels: one per class when the samples are balanced over
    at most 16 classes (`balanced_labels`), else 8 unlabelled."""
    if class_names and label is None and len(class_names) <= 16:
        return len(class_names), class_names
    return 8, None


def class_index(value: str, class_names: list[str]) -> int:
    """The index of class ``value`` (a class name, or an index) among ``class_names``."""
    if not class_names:
        raise SettingError("{class_} applies to a model trained with classes; this one has none")
    if value in class_names:
        return class_names.index(value)
    if value.isdigit() and int(value) < len(class_names):
        return int(value)
    raise SettingError(
        "{class_} {value!r} is not one of the model's classes: {names}", value=value, names=", ".join(class_names)
    )


def sample_images(
    generator: Generator,
    num: int,
    *,
    batch_size: int = 64,
    label: int | None = None,
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> np.ndarray:
    """``num`` new images (num, H, W, 3) uint8 in batches of ``batch_size``; with classes, all of
    class ``label``, or balanced over the classes when None. The same (num, batch_size, seed,
    options) give the same images. ``options`` go to `Generator.generate`."""
    for name, value in (("num", num), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingError("{%s} must be an int >= 1, got {value!r}" % name, value=value)
    check_setting("seed", seed)  # the batches' seeds below stay under 2^63
    if label is None:
        labels = balanced_labels(num, len(generator.class_names))
    else:
        labels = torch.full((num,), label, dtype=torch.long)
    images = []
    starts = range(0, num, batch_size)
    with Progress(starts, total=len(starts), desc="sample", unit="batch", enabled=progress) as bar:
        for i, start in enumerate(bar):
            count = min(batch_size, num - start)
            batch_labels = None if labels is None else labels[start : start + count]
            images.append(
                to_uint8(generator.generate(count, labels=batch_labels, seed=seed * 1_000_003 + i, **options))
            )
    return np.concatenate(images)


def load_generator(path: str | Path, device: torch.device) -> tuple[Generator, dict[str, Any]]:
    """A trained Generator (eval mode) and its checkpoint's metadata, from a run folder or
    checkpoint of a prior or diffusion run; a tokenizer's raises SettingError saying what to do."""
    model, meta = load_model(path, device)
    if not isinstance(model, Generator):
        raise SettingError(
            "{ckpt} {path} holds a %s tokenizer; sample from a prior or diffusion run trained on "
            "it (fastvq train --model prior --tokenizer %s)" % (meta["kind"], path),
            path=path,
        )
    return model, meta
