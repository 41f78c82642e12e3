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
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import report
from .config import GENERATORS, RunConfig, check_model_args, check_run_config
from .data import ImageSource, class_labels, split_images, to_uint8
from .device import now, peak_memory_mib, resolve_device, torch_threads
from .errors import SettingError
from .evaluation import encode_images
from .generators import Generator
from .progress import Progress
from .runlog import RunLog, tensorboard_enabled
from .settings import check_setting
from .state import CHECKPOINT, load_model, read_checkpoint, restore_training_state, save_training_state
from .training import StopRequest, TrainingInterrupted, append_history

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


def train_generator(config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
                    tensorboard: bool | None = None) -> dict[str, Any]:
    """Train ``config.model`` ('prior' or 'diffusion') over the tokenizer ``config.tokenizer`` (a
    run folder or checkpoint of ``fastvq train``), writing to ``out_dir`` as `fastvq.app.training.train`
    does (checkpoints, exact resume, Ctrl-C checkpoint, metrics.json, loss.png, TensorBoard event
    files per ``tensorboard``) plus samples.png. Returns the metrics dict."""
    out = Path(out_dir)
    check_run_config(config, training=True)
    if config.model not in GENERATORS:
        raise SettingError("{model} must be one of {choices} here, got {value!r}", choices=", ".join(GENERATORS),
                           value=config.model)
    if not config.tokenizer:
        raise SettingError("{model} %s needs {tokenizer}: a run folder (or checkpoint) of fastvq train with "
                           "{model} vqvae or vqgan" % config.model)
    if not resume and (out / CHECKPOINT).exists():
        raise SettingError("{out_dir} {out} already holds {checkpoint}; set {resume} to continue it or choose "
                           "another {out_dir}", out=out, checkpoint=CHECKPOINT)
    for name in ("steps", "batch_size", "ckpt_every", "log_every", "num_eval", "max_images", "image_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise SettingError("{%s} must be >= 1, got {value}" % name, value=value)
    if config.eval_every is not None and config.eval_every < 1:
        raise SettingError("{eval_every} must be >= 1, got {value}", value=config.eval_every)
    for name, default in (("precision", "fp32"), ("quantizer", "fastvq"), ("lpips_weights", None)):
        if getattr(config, name) != default:
            raise SettingError("{%s} applies to the tokenizers (vqvae, vqgan), not to {model} %s"
                               % (name, config.model))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SettingError("{model} %s trains in one process; run it without torchrun" % config.model)
    check_model_args(config.model, config.model_args)
    device = resolve_device(config.device)
    tensorboard = tensorboard_enabled(tensorboard)
    with torch_threads(config.threads, device) as threads:  # stored: a resume uses the same count
        return _train(dataclasses.replace(config, threads=threads), out, device, resume, progress, tensorboard)


def training_data(config: RunConfig, tokenizer_meta: dict[str, Any]
                  ) -> tuple[RunConfig, ImageSource, ImageSource, list[str]]:
    """The run's images (training ones limited to ``max_images``, chosen by ``seed``; the first
    ``num_eval`` held-out ones) and their class names ([] without classes), with ``data`` and
    ``image_size`` resolved from the tokenizer's run where not given."""
    config = dataclasses.replace(config, data=config.data or tokenizer_meta["config"]["data"],
                                 image_size=config.image_size or tokenizer_meta["config"]["image_size"])
    crop = config.crop if config.resize or config.crop else config.image_size
    train_images, eval_images = split_images(config.data, config.holdout, config.seed, config.resize, crop)
    if config.max_images is not None and config.max_images < len(train_images):
        chosen = np.random.default_rng(config.seed).permutation(len(train_images))[:config.max_images]
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
        raise SettingError("{model_args} num_classes=%d, but {data} {data_value} has %s; use num_classes=0 for an "
                           "unconditional model" % (wanted, found), data_value=config.data)
    return {**config.model_args, "num_classes": wanted}, class_names if wanted else []


def _encode(kind: str, tokenizer, images: ImageSource, batch_size: int, device: torch.device,
            progress: bool) -> torch.Tensor:
    return torch.from_numpy(encode_images(tokenizer, images, batch_size, device, progress,
                                          latents=kind == "diffusion"))


@torch.no_grad()
def eval_loss(generator: Generator, targets: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
              seed: int) -> float:
    """Mean loss over held-out targets, its noise (diffusion) drawn from ``seed``: the same number
    at every evaluation. Leaves torch's RNG and the training mode as they were."""
    training = generator.training
    generator.eval()
    device = next(generator.model.parameters()).device
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(targets), batch_size):
            batch = targets[i:i + batch_size].to(device)
            label = None if labels is None else labels[i:i + batch_size].to(device)
            total += float(generator.loss(batch, label)) * len(batch)
    generator.train(training)
    return total / len(targets)


def _train(config: RunConfig, out: Path, device: torch.device, resume: bool, progress: bool,
           tensorboard: bool) -> dict[str, Any]:
    ckpt_path = out / CHECKPOINT
    finished = resume and (out / "metrics.json").is_file() and \
        read_checkpoint(ckpt_path, config.model)[1]["step"] == config.steps
    if finished:  # nothing to encode, train or rewrite
        return json.loads((out / "metrics.json").read_text())
    tokenizer, tokenizer_meta = load_model(config.tokenizer, device)
    if tokenizer_meta["kind"] in GENERATORS:
        raise SettingError("{tokenizer} {path} holds a %s model, not a tokenizer (vqvae or vqgan)"
                           % tokenizer_meta["kind"], path=config.tokenizer)
    config, train_images, eval_images, class_names = training_data(config, tokenizer_meta)
    model_args, class_names = _num_classes(config, class_names)
    config = dataclasses.replace(config, model_args=model_args)
    t0 = now(device)
    batch = config.batch_size
    targets = _encode(config.model, tokenizer, train_images, batch, device, progress)
    eval_targets = _encode(config.model, tokenizer, eval_images, batch, device, progress)
    labels, eval_labels = labels_of(train_images, class_names), labels_of(eval_images, class_names)
    encode_seconds = now(device) - t0

    if config.model == "diffusion" and targets.shape[1] > generator_width(model_args) // LATENT_CHANNELS_PER_WIDTH:
        print(f"note: the latents have {targets.shape[1]} channels against a denoiser width of "
              f"{generator_width(model_args)}; at 64 against 64 the demo's samples were noise. Diffusion suits "
              "latents of few channels (LDM's D = 3-4): train the tokenizer with --codebook-dim 4, or raise "
              "--set width", file=sys.stderr)
    torch.manual_seed(config.seed)
    generator = Generator(config.model, tokenizer, model_args, tuple(targets.shape[1:]), class_names).to(device)
    if config.model == "diffusion":
        generator.model.fit_scale(targets)
    optimizer = torch.optim.Adam(generator.model.parameters(), lr=config.lr, betas=tuple(config.betas))
    history: dict[str, list[float]] = {}
    start = 0
    if resume:
        start, history = restore_training_state(ckpt_path, generator, [optimizer])
        if start > config.steps:
            raise SettingError("{steps} {value} is below the checkpoint's step {start}", value=config.steps,
                               start=start)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    generator.train()
    step_seconds = []
    with RunLog(out / "tensorboard" if tensorboard else None, continues_at=start + 1 if start else None) as log, \
            StopRequest() as stop:
        bar = Progress(range(start, config.steps), total=config.steps, desc=f"train {config.model}", unit="step",
                       initial=start, enabled=progress)
        for step in bar:
            t0 = now(device)
            rng = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            take = torch.randint(len(targets), (batch,), generator=rng)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (step + 1) / WARMUP_STEPS)
            loss = generator.loss(targets[take].to(device), None if labels is None else labels[take].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(generator.model.parameters(), GRAD_CLIP)
            optimizer.step()
            row = {"step": step + 1, "loss": float(loss.detach())}
            step_seconds.append(now(device) - t0)
            if config.eval_every and (step + 1) % config.eval_every == 0:
                row["eval_loss"] = eval_loss(generator, eval_targets, eval_labels, batch, config.seed)
            append_history(history, row, step)
            log.scalars(step + 1, {k: v for k, v in row.items() if k != "step"})
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            last = step + 1 == config.steps
            if (step + 1) % config.ckpt_every == 0 or last or stop.requested:
                save_training_state(ckpt_path, generator, [optimizer], step + 1, history, config)
            if stop.requested and not last:
                bar.close()
                raise TrainingInterrupted(step + 1, ckpt_path, stop.signum)
    bar.close()

    evaluated_last = config.eval_every and config.steps % config.eval_every == 0
    final_loss = (history["eval_loss"][-1] if evaluated_last  # the last step's, of the same final model
                  else eval_loss(generator, eval_targets, eval_labels, batch, config.seed))
    generator.eval()
    t0 = now(device)
    samples = sample_images(generator, SAMPLE_GRID, batch_size=SAMPLE_GRID, seed=config.seed)
    sample_seconds = now(device) - t0
    timed = step_seconds[1:] if len(step_seconds) > 1 else step_seconds  # skip the warm-up step
    metrics = {
        "kind": config.model,
        "step": config.steps,
        "config": config.to_dict(),
        "data": {"train_images": len(targets), "eval_images": len(eval_targets),
                 "target_shape": list(targets.shape[1:]), "classes": class_names},
        "eval": {"loss": final_loss,
                 **({"bits_per_code": final_loss / math.log(2)} if config.model == "prior" else {})},
        "train": {"loss": history["loss"][-1]} if history.get("loss") else {},
        "timing": {"device": str(device), "threads": config.threads, "encode_s": encode_seconds,
                   "steps_timed": len(timed), "steps_per_s": len(timed) / sum(timed) if sum(timed) else None,
                   "sample_s_per_image": sample_seconds / SAMPLE_GRID, "peak_memory_mib": peak_memory_mib(device)},
        "history": history,
    }
    report.write_json(out / "metrics.json", metrics)
    report.save_samples(samples, out / "samples.png", *grid_layout(class_names),
                        title=f"{config.model}, step {config.steps}, seed {config.seed}")
    report.plot_curves(history, out, panels=(("loss.png", ("loss", "eval_loss"), "loss", True),))
    return metrics


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
    raise SettingError("{class_} {value!r} is not one of the model's classes: {names}", value=value,
                       names=", ".join(class_names))


def sample_images(generator: Generator, num: int, *, batch_size: int = 64, label: int | None = None,
                  seed: int = 0, progress: bool = False, **options: Any) -> np.ndarray:
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
            batch_labels = None if labels is None else labels[start:start + count]
            images.append(to_uint8(generator.generate(count, labels=batch_labels, seed=seed * 1_000_003 + i,
                                                      **options)))
    return np.concatenate(images)


def load_generator(path: str | Path, device: torch.device) -> tuple[Generator, dict[str, Any]]:
    """A trained Generator (eval mode) and its checkpoint's metadata, from a run folder or
    checkpoint of a prior or diffusion run; a tokenizer's raises SettingError saying what to do."""
    model, meta = load_model(path, device)
    if not isinstance(model, Generator):
        raise SettingError("{ckpt} {path} holds a %s tokenizer; sample from a prior or diffusion run trained on "
                           "it (fastvq train --model prior --tokenizer %s)" % (meta["kind"], path), path=path)
    return model, meta
