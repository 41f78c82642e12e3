"""A training run's state in a checkpoint: what an exact resume needs, and loading a trained
model back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastvq.models import VQModel

from . import checkpoint
from .config import GENERATORS, RunConfig, build_model
from .device import resolve_device
from .errors import SettingError
from .generators import Generator

CHECKPOINT = "checkpoint.safetensors"
"""The checkpoint's file name inside a run folder."""


def save_training_state(
    path: Path,
    model: VQModel | Generator,
    optimizers: list[torch.optim.Optimizer],
    step: int,
    history: dict[str, list[float]],
    config: RunConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Checkpoint everything a bit-exact resume needs: model, optimizers, fp16 loss scale, RNG,
    history, config."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    skeletons = [checkpoint.pack(opt.state_dict(), f"optim{i}", tensors) for i, opt in enumerate(optimizers)]
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    for key, values in history.items():
        tensors[f"history.{key}"] = torch.tensor(values, dtype=torch.float64)
    meta = {"kind": model.kind, "config": config.to_dict(), "model_config": model.config,
            "step": step, "optimizers": skeletons, "scaler": scaler.state_dict() if scaler else None}
    checkpoint.save(path, tensors, meta)


def restore_training_state(
    path: Path, model: VQModel | Generator, optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, dict[str, list[float]]]:
    """Load what ``save_training_state`` wrote into ``model``, ``optimizers``, ``scaler`` and the
    RNGs; returns (step, history). A checkpoint of another model kind raises ValueError."""
    tensors, meta = read_checkpoint(path, model.kind)
    _load_model_state(model, tensors, path)
    for opt, skeleton in zip(optimizers, meta["optimizers"]):
        opt.load_state_dict(checkpoint.unpack(skeleton, tensors))
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    for i in range(torch.cuda.device_count()):
        if f"rng.cuda.{i}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    history = {k[len("history."):]: v.tolist() for k, v in tensors.items() if k.startswith("history.")}
    return meta["step"], history


def _load_model_state(model: VQModel | Generator, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = f" with quantizer {model.config['quantizer']!r}" if "quantizer" in model.config else ""
        raise ValueError(
            f"checkpoint {path} does not fit a {model.kind}{detail}: {str(err).splitlines()[0]} ..."
        ) from err


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or ``path``/checkpoint.safetensors when ``path`` is a run folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / CHECKPOINT).is_file():
        raise FileNotFoundError(f"checkpoint {path}: a folder without {CHECKPOINT} (pass a run folder of "
                                f"fastvq train or a checkpoint file)")
    return path / CHECKPOINT


def read_checkpoint(path: Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a training checkpoint; with ``kind`` given, one of another model raises ValueError."""
    tensors, meta = checkpoint.load(path)
    missing = [key for key in ("kind", "config", "model_config", "step", "optimizers") if key not in meta]
    if missing or not isinstance(meta.get("model_config"), dict):
        raise ValueError(f"checkpoint {path} is not a training checkpoint of the fastvq command (its metadata "
                         f"lacks {missing or ['a model_config mapping']})")
    if kind is not None and meta["kind"] != kind:
        raise ValueError(
            f"checkpoint {path} holds a {meta['kind']} model, but a {kind} was requested"
        )
    return tensors, meta


def load_model(
    path: str | Path, device: torch.device, quantizer: str | None = None
) -> tuple[VQModel | Generator, dict[str, Any]]:
    """A trained model (eval mode, on ``device``) and the checkpoint's metadata, from a checkpoint
    file or a run folder: a tokenizer, or a `Generator` (prior or diffusion, with its tokenizer).
    ``quantizer`` replaces a tokenizer's recorded one (fastvq and vector-quantize-pytorch share
    state_dict keys)."""
    path = checkpoint_file(path)
    tensors, meta = read_checkpoint(path)
    if meta["kind"] in GENERATORS:
        if quantizer is not None:
            raise SettingError("{quantizer} applies to tokenizers; {path} holds a %s" % meta["kind"], path=path)
        model = Generator.from_config(meta["kind"], meta["model_config"])
    else:
        model_args = {k: v for k, v in meta["model_config"].items() if k != "quantizer"}
        model = build_model(meta["kind"], model_args, quantizer or meta["model_config"]["quantizer"])
    _load_model_state(model, tensors, path)
    return model.to(device).eval(), meta


def load(run: str | Path, device: str | torch.device = "cpu", quantizer: str | None = None) -> VQModel | Generator:
    """The trained model of a run folder of ``fastvq train`` (or of its checkpoint file), in eval
    mode on ``device`` ('cpu', 'auto', 'cuda[:N]' or a torch.device). A tokenizer:
    ``model.encode(x)`` takes (B, 3, H, W) images in [-1, 1] (H, W multiples of
    ``model.downsample``) to (B, H/f, W/f) int64 codes and ``model.decode(indices)`` takes them back;
    ``quantizer`` replaces the recorded one. A prior or diffusion run: a `Generator`, whose
    ``generate(num, labels=..., seed=...)`` returns new images (num, 3, H, W) in about [-1, 1]."""
    return load_model(run, resolve_device(str(device)), quantizer)[0]
