"""Training, evaluation and tokenization for the reference models, independent of the command
line: run configurations and presets, the training loop with exact resume, checkpoints and
held-out evaluation."""

from __future__ import annotations

import dataclasses
import inspect
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastvq import checkpoint, report
from fastvq.data import CropSampler, fixed_crops, split_images, to_tensor, to_uint8
from fastvq.metrics import InceptionFeatures, batch_psnr, codebook_stats, frechet_distance, psnr, ssim
from fastvq.models import LPIPS, VQGAN, VQVAE, VQModel

MODELS: dict[str, type[VQModel]] = {"vqvae": VQVAE, "vqgan": VQGAN}
CHECKPOINT = "checkpoint.safetensors"

# Per-model run defaults: Adam settings of the two papers' reference code.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqvae": {"image_size": 64, "batch_size": 32, "lr": 2e-4, "betas": [0.9, 0.999]},
    "vqgan": {"image_size": 128, "batch_size": 8, "lr": 1e-4, "betas": [0.5, 0.9]},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A few minutes on a 2-core CPU.
    "demo": {
        "vqvae": {
            "image_size": 32, "batch_size": 32, "steps": 2000, "lr": 1e-3, "ckpt_every": 500,
            "model_args": {
                "channels": 64, "res_channels": 32, "num_res_blocks": 2, "downsample": 4,
                "codebook_dim": 64, "codebook_size": 512, "kmeans_init": True,
                "threshold_ema_dead_code": 2,
            },
        },
        "vqgan": {
            "image_size": 32, "batch_size": 16, "steps": 600, "lr": 5e-4, "ckpt_every": 200,
            "model_args": {
                "channels": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 64,
                "norm_groups": 8, "codebook_dim": 64, "codebook_size": 512, "disc_channels": 32,
                "disc_layers": 2, "disc_start": 400, "disc_weight": 0.1, "kmeans_init": True,
                "threshold_ema_dead_code": 2,
            },
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

# Settings that may differ between a run and its resumption without changing its results.
RESUMABLE = ("steps", "ckpt_every", "log_every", "device", "num_eval")


@dataclasses.dataclass
class RunConfig:
    """Everything that determines a training run (stored in its checkpoints as JSON)."""

    model: str = "vqvae"
    quantizer: str = "fastvq"
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: str = "builtin"
    image_size: int = 64
    batch_size: int = 32
    steps: int = 10000
    lr: float = 2e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 10
    holdout: float = 0.1
    num_eval: int = 64
    resize: int | None = None
    crop: int | None = None
    lpips_weights: str | None = None
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def make_config(model: str = "vqvae", preset: str | None = None, **overrides: Any) -> RunConfig:
    """Defaults for ``model``, then ``preset``, then ``overrides`` (``model_args`` merged key by
    key). Unknown models, presets, settings or model arguments raise ValueError."""
    if model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    settings: dict[str, Any] = {**RUN_DEFAULTS[model], **(PRESETS[preset][model] if preset else {})}
    model_args = {**settings.pop("model_args", {}), **overrides.pop("model_args", {})}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown run settings {unknown}; known: {sorted(known)}")
    config = RunConfig(model=model, model_args=model_args, **{**settings, **overrides})
    check_model_args(model, model_args)
    return RunConfig(**config.to_dict())


def check_model_args(model: str, model_args: dict[str, Any]) -> None:
    """Raise ValueError naming any argument that ``MODELS[model]`` does not take."""
    valid = set(inspect.signature(MODELS[model]).parameters) - {"quantizer"}
    unknown = sorted(set(model_args) - valid)
    if unknown:
        raise ValueError(f"{model} takes no argument {unknown}; valid: {sorted(valid)}")


def build_model(kind: str, model_args: dict[str, Any], quantizer: str) -> VQModel:
    """Instantiate ``MODELS[kind](**model_args, quantizer=quantizer)``."""
    check_model_args(kind, model_args)
    return MODELS[kind](**model_args, quantizer=quantizer)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; other names as given (must be usable)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after waiting for queued CUDA work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class QuantizerTimer:
    """Wall-clock seconds spent in a quantizer's forward and backward, via module and tensor
    hooks: backward time runs from the gradient reaching the quantizer's output to the gradient
    of its input being complete. Synchronises CUDA at each boundary. ``close()`` removes hooks."""

    def __init__(self, quantizer: nn.Module, device: torch.device):
        self.device, self.seconds, self._start = device, 0.0, 0.0
        self._handles = [
            quantizer.register_forward_pre_hook(self._forward_start),
            quantizer.register_forward_hook(self._forward_end),
        ]

    def _forward_start(self, module, args) -> None:
        self._start = now(self.device)
        if args[0].requires_grad:
            args[0].register_hook(self._backward_end)

    def _forward_end(self, module, args, output) -> None:
        self.seconds += now(self.device) - self._start
        if output[0].requires_grad:
            output[0].register_hook(self._backward_start)

    def _backward_start(self, grad: torch.Tensor) -> None:
        self._start = now(self.device)

    def _backward_end(self, grad: torch.Tensor) -> None:
        self.seconds += now(self.device) - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def make_optimizers(model: VQModel, config: RunConfig) -> list[torch.optim.Optimizer]:
    """Adam for the autoencoder (+ quantizer parameters); VQGAN adds one for its discriminator."""
    adam = dict(lr=config.lr, betas=tuple(config.betas))
    if isinstance(model, VQGAN):
        return [
            torch.optim.Adam(model.generator_parameters(), **adam),
            torch.optim.Adam(model.discriminator.parameters(), **adam),
        ]
    return [torch.optim.Adam(model.parameters(), **adam)]


def train_step(
    model: VQModel,
    optimizers: list[torch.optim.Optimizer],
    x: torch.Tensor,
    step: int,
    perceptual: nn.Module | None = None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """One optimisation step on batch ``x`` (B, 3, H, W) at 0-based ``step``: (float logs,
    indices (B, h, w), detached reconstruction (B, 3, H, W))."""
    reconstruction, indices, vq_loss = model(x)
    if isinstance(model, VQGAN):
        loss, logs = model.generator_loss(x, reconstruction, vq_loss, step, perceptual)
    else:
        loss, logs = model.loss(x, reconstruction, vq_loss)
    optimizers[0].zero_grad(set_to_none=True)
    loss.backward()
    optimizers[0].step()
    if isinstance(model, VQGAN) and step >= model.disc_start:
        d_loss, d_logs = model.discriminator_loss(x, reconstruction)
        optimizers[1].zero_grad(set_to_none=True)
        d_loss.backward()
        optimizers[1].step()
        logs.update(d_logs)
    logs = {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}
    return logs, indices, reconstruction.detach()


def save_training_state(
    path: Path,
    model: VQModel,
    optimizers: list[torch.optim.Optimizer],
    step: int,
    history: dict[str, list[float]],
    config: RunConfig,
) -> None:
    """Checkpoint everything a bit-exact resume needs: model, optimizers, RNG, history, config."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    skeletons = [checkpoint.pack(opt.state_dict(), f"optim{i}", tensors) for i, opt in enumerate(optimizers)]
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    for key, values in history.items():
        tensors[f"history.{key}"] = torch.tensor(values, dtype=torch.float64)
    meta = {"kind": model.kind, "config": config.to_dict(), "model_config": model.config,
            "step": step, "optimizers": skeletons}
    checkpoint.save(path, tensors, meta)


def restore_training_state(
    path: Path, model: VQModel, optimizers: list[torch.optim.Optimizer]
) -> tuple[int, dict[str, list[float]]]:
    """Load what ``save_training_state`` wrote into ``model``, ``optimizers`` and the RNGs;
    returns (step, history). A checkpoint of another model kind raises ValueError."""
    tensors, meta = read_checkpoint(path, model.kind)
    _load_model_state(model, tensors, path)
    for opt, skeleton in zip(optimizers, meta["optimizers"]):
        opt.load_state_dict(checkpoint.unpack(skeleton, tensors))
    torch.set_rng_state(tensors["rng.torch"])
    for i in range(torch.cuda.device_count()):
        if f"rng.cuda.{i}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    history = {k[len("history."):]: v.tolist() for k, v in tensors.items() if k.startswith("history.")}
    return meta["step"], history


def _load_model_state(model: VQModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not fit a {model.kind} with quantizer "
            f"{model.config['quantizer']!r}: {str(err).splitlines()[0]} ..."
        ) from err


def read_checkpoint(path: Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a training checkpoint; with ``kind`` given, one of another model raises ValueError."""
    tensors, meta = checkpoint.load(path)
    if kind is not None and meta["kind"] != kind:
        raise ValueError(
            f"checkpoint {path} holds a {meta['kind']} model, but a {kind} was requested"
        )
    return tensors, meta


def load_model(
    path: str | Path, device: torch.device, quantizer: str | None = None
) -> tuple[VQModel, dict[str, Any]]:
    """A trained model (eval mode, on ``device``) and the checkpoint's metadata. ``quantizer``
    replaces the recorded one (fastvq and vector-quantize-pytorch share state_dict keys)."""
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    model_args = {k: v for k, v in meta["model_config"].items() if k != "quantizer"}
    model = build_model(meta["kind"], model_args, quantizer or meta["model_config"]["quantizer"])
    _load_model_state(model, tensors, path)
    return model.to(device).eval(), meta


def encode_images(
    model: VQModel, images: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> code indices (N, H/f, W/f) int64, in batches of ``batch_size``.
    Puts the model in eval mode (no codebook updates)."""
    model.eval()
    return np.concatenate([
        model.encode(to_tensor(images[i : i + batch_size]).to(device)).cpu().numpy()
        for i in range(0, len(images), batch_size)
    ])


def decode_indices(
    model: VQModel, indices: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Code indices (N, h, w) int -> images (N, h*f, w*f, 3) uint8, in batches of ``batch_size``.
    Puts the model in eval mode."""
    model.eval()
    return np.concatenate([
        to_uint8(model.decode(torch.from_numpy(indices[i : i + batch_size]).long().to(device)))
        for i in range(0, len(indices), batch_size)
    ])


def reconstruct(
    model: VQModel, images: np.ndarray, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 -> reconstructions (N, H, W, 3) uint8 and indices (N, h, w) int64:
    ``encode_images`` then ``decode_indices``, so they equal an encode/decode round trip."""
    indices = encode_images(model, images, batch_size, device)
    return decode_indices(model, indices, batch_size, device), indices


def evaluate(
    model: VQModel,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    inception: InceptionFeatures | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Held-out metrics of (N, H, W, 3) uint8 ``images``: PSNR (dB), SSIM, codebook usage and
    perplexity, plus rFID when ``inception`` is given; also the reconstructions and indices."""
    recons, indices = reconstruct(model, images, batch_size, device)
    metrics = {
        "num_images": len(images),
        "psnr": float(psnr(images, recons).mean()),
        "ssim": float(ssim(images, recons).mean()),
        **codebook_stats(indices, model.codebook_size),
    }
    if inception is not None:
        metrics["rfid"] = frechet_distance(inception(images, batch_size), inception(recons, batch_size))
    return metrics, recons, indices


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def train(
    config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train per ``config``, writing to ``out_dir``: checkpoint.safetensors (every
    ``ckpt_every`` steps and at the end), metrics.json, reconstructions.png, loss.png and
    codebook_usage.png. ``resume`` continues from the checkpoint there; batches depend only on
    (seed, step), so the losses match an uninterrupted run exactly. Returns the metrics dict."""
    from tqdm import tqdm

    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    if not resume and ckpt_path.exists():
        raise ValueError(
            f"--out {out} already holds {CHECKPOINT}; pass --resume to continue it or choose "
            "another --out"
        )
    for name in ("steps", "batch_size", "image_size", "ckpt_every", "log_every", "num_eval"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.lpips_weights and config.model != "vqgan":
        raise ValueError(f"--lpips-weights applies to --model vqgan only, not {config.model}")
    device = resolve_device(config.device)
    train_images, eval_images = split_images(
        config.data, config.holdout, config.seed, config.resize, config.crop
    )
    sampler = CropSampler(train_images, config.image_size, config.batch_size, config.seed)
    eval_set = fixed_crops(eval_images, config.image_size, config.num_eval)
    perceptual = LPIPS.from_file(config.lpips_weights).to(device) if config.lpips_weights else None

    torch.manual_seed(config.seed)
    model = build_model(config.model, config.model_args, config.quantizer).to(device)
    optimizers = make_optimizers(model, config)
    history: dict[str, list[float]] = {}
    start = 0
    if resume:
        start, history = restore_training_state(ckpt_path, model, optimizers)
        if start > config.steps:
            raise ValueError(f"--steps {config.steps} is below the checkpoint's step {start}")
    out.mkdir(parents=True, exist_ok=True)

    model.train()
    timer = QuantizerTimer(model.quantizer, device)
    step_seconds, quantizer_seconds = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, unit="step",
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        x = sampler.batch(step).to(device)
        q_before, t0 = timer.seconds, now(device)
        logs, indices, reconstruction = train_step(model, optimizers, x, step, perceptual)
        step_seconds.append(now(device) - t0)
        quantizer_seconds.append(timer.seconds - q_before)
        logs["psnr"] = batch_psnr(x, reconstruction)
        logs["usage"] = torch.unique(indices).numel() / model.codebook_size
        row = {"step": step + 1, **logs}
        for key in set(history) | set(row):
            history.setdefault(key, [float("nan")] * step)  # keys that start late (GAN losses)
            history[key].append(float(row.get(key, float("nan"))))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            bar.set_postfix(loss=f"{logs['loss']:.4f}", psnr=f"{logs['psnr']:.2f}",
                            usage=f"{logs['usage']:.3f}", refresh=False)
        if (step + 1) % config.ckpt_every == 0 or step + 1 == config.steps:
            save_training_state(ckpt_path, model, optimizers, step + 1, history, config)
    bar.close()
    timer.close()

    eval_metrics, recons, _ = evaluate(model, eval_set, config.batch_size, device)
    timed = slice(1, None) if len(step_seconds) > 1 else slice(None)  # skip warm-up step
    step_total, quantizer_total = sum(step_seconds[timed]), sum(quantizer_seconds[timed])
    timing = {
        "device": str(device),
        "steps_timed": len(step_seconds[timed]),
        "steps_per_s": len(step_seconds[timed]) / step_total if step_total else None,
        "step_s": step_total,
        "quantizer_s": quantizer_total,
        "quantizer_share": quantizer_total / step_total if step_total else None,
        "peak_memory_mib": peak_memory_mib(device),
    }
    metrics = {
        "kind": model.kind,
        "quantizer": config.quantizer,
        "step": config.steps,
        "config": config.to_dict(),
        "eval": eval_metrics,
        "train": {k: history[k][-1] for k in ("loss", "psnr", "usage") if history.get(k)},
        "timing": timing,
        "history": history,
    }
    report.write_json(out / "metrics.json", metrics)
    report.save_grid(eval_set[:16], recons[:16], out / "reconstructions.png")
    report.plot_curves(history, out)
    return metrics
