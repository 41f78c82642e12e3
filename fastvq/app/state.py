"""A training run's state in a checkpoint: what an exact resume needs, and loading a trained
model back.

A checkpoint is data, checked before use: its metadata against a schema (types, ranges, the run's
settings as `check_run_config` takes them), then the model it describes is built on the meta device
(nothing allocated) and its state's names, shapes and dtypes compared with the tensors the file's
header lists; only then are the tensors read and a real model built. So a small file cannot make
`fastvq.load`, `fastvq sample` or `fastvq train --resume` allocate more than its tensors hold, and
every problem is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastvq.models import QUANTIZERS, VQModel

from . import checkpoint
from .config import GENERATORS, MODELS, RunConfig, build_model, check_model_args, check_run_config
from .device import resolve_device
from .errors import CheckpointError, SettingError
from .generators import Generator
from .settings import conforms, describe

TRAINING_META = {
    "kind": str,
    "config": dict[str, Any],
    "model_config": dict[str, Any],
    "step": int,
    "optimizers": list[Any],
}
"""The metadata every training checkpoint holds, and its types ("scaler": None or a mapping, too)."""
MAX_STEP = 2**53

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
    meta = {
        "kind": model.kind,
        "config": config.to_dict(),
        "model_config": model.config,
        "step": step,
        "optimizers": skeletons,
        "scaler": scaler.state_dict() if scaler else None,
    }
    checkpoint.save(path, tensors, meta)


def restore_training_state(
    path: Path,
    model: VQModel | Generator,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, dict[str, list[float]]]:
    """Load what ``save_training_state`` wrote into ``model``, ``optimizers``, ``scaler`` and the
    RNGs; returns (step, history). A checkpoint of another model kind, or whose states do not fit
    these, raises CheckpointError before anything is loaded."""
    layout, meta = _checked_header(path, model.kind)
    _check_fit(path, model, layout)
    tensors, _ = checkpoint.load(path)
    if len(meta["optimizers"]) != len(optimizers):
        raise CheckpointError(
            path, f"holds {len(meta['optimizers'])} optimizer states, this run has {len(optimizers)} optimizers"
        )
    states = []
    for opt, skeleton in zip(optimizers, meta["optimizers"]):
        try:
            states.append(checkpoint.unpack(skeleton, tensors))
        except ValueError as err:
            raise CheckpointError(path, f"has a malformed optimizer state: {err}") from None
        _check_optimizer_state(path, opt, states[-1])
    scaler_state = meta.get("scaler") if scaler is not None else None
    if scaler_state:
        _check_like(path, "scaler state", scaler_state, scaler.state_dict())
    rng = {"rng.torch": torch.get_rng_state()}
    rng.update(
        {
            f"rng.cuda.{i}": torch.cuda.get_rng_state(i)
            for i in range(torch.cuda.device_count())
            if f"rng.cuda.{i}" in tensors
        }
    )
    for name, like in rng.items():
        if name not in tensors or tensors[name].dtype != like.dtype or tensors[name].shape != like.shape:
            raise CheckpointError(path, f"has no usable {name} (a {like.dtype} tensor of shape {tuple(like.shape)})")
    history = {k[len("history.") :]: v for k, v in tensors.items() if k.startswith("history.")}
    for key, values in history.items():
        if values.dim() != 1 or len(values) != meta["step"] or not values.dtype.is_floating_point:
            raise CheckpointError(
                path, f"has a history.{key} of shape {tuple(values.shape)}, not {meta['step']} numbers (one per step)"
            )

    _load_model_state(model, tensors, path)
    for opt, state in zip(optimizers, states):
        opt.load_state_dict(state)
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    for name, state in rng.items():
        if name == "rng.torch":
            torch.set_rng_state(tensors[name])
        else:
            torch.cuda.set_rng_state(tensors[name], int(name.rsplit(".", 1)[1]))
    return meta["step"], {k: v.tolist() for k, v in history.items()}


def _check_optimizer_state(path: Path, opt: torch.optim.Optimizer, state: Any) -> None:
    """``state`` must be what ``opt.state_dict()`` gives for these parameters: the same groups and
    parameter ids, settings of the same kinds, per-parameter tensors shaped as their parameter
    (or scalars, as Adam's step)."""
    live = opt.state_dict()
    if (
        not isinstance(state, dict)
        or set(state) != {"state", "param_groups"}
        or not isinstance(state["param_groups"], list)
        or not isinstance(state["state"], dict)
    ):
        raise CheckpointError(path, "has a malformed optimizer state (not a state and param_groups mapping)")
    if len(state["param_groups"]) != len(live["param_groups"]):
        raise CheckpointError(
            path, f"has {len(state['param_groups'])} optimizer parameter groups, this run {len(live['param_groups'])}"
        )
    params = {}
    for group, live_group, opt_group in zip(state["param_groups"], live["param_groups"], opt.param_groups):
        if not isinstance(group, dict) or group.get("params") != live_group["params"]:
            raise CheckpointError(path, "has optimizer parameter groups that do not fit this model's parameters")
        _check_like(
            path,
            "optimizer setting",
            {k: v for k, v in group.items() if k in live_group},
            {k: v for k, v in live_group.items() if k in group},
        )
        params.update(zip(live_group["params"], opt_group["params"]))
    for key, entry in state["state"].items():
        if (
            key not in params
            or not isinstance(entry, dict)
            or not all(
                isinstance(v, torch.Tensor) and v.shape in (params[key].shape, torch.Size()) for v in entry.values()
            )
        ):
            raise CheckpointError(path, f"has an optimizer state for parameter {key!r} that does not fit it")


def _check_like(path: Path, what: str, given: dict[str, Any], live: dict[str, Any]) -> None:
    """Each value of ``given`` must be of the kind of the same key's value in ``live``: a number
    (finite) for a number, a bool for a bool, None or a bool for None, a string for a string, a
    list of as many such for a list or tuple; the keys must be the same."""
    if not isinstance(given, dict) or set(given) != set(live):
        raise CheckpointError(path, f"has a {what} mapping with other keys than {sorted(live)}")
    for key, value in given.items():
        if not _same_kind(value, live[key]):
            raise CheckpointError(
                path, f"has {what} {key} = {checkpoint._short(value)} where this run has {live[key]!r}"
            )


def _same_kind(value: Any, like: Any) -> bool:
    if isinstance(like, bool) or like is None:
        return isinstance(value, bool) or (like is None and value is None)
    if isinstance(like, numbers.Real):
        return conforms(value, float)
    if isinstance(like, str):
        return isinstance(value, str)
    if isinstance(like, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(like) and all(map(_same_kind, value, like))
    return False


def _load_model_state(model: VQModel | Generator, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(path, f"does not fit a {_described(model)}: {str(err).splitlines()[0]} ...") from err


def _described(model: nn.Module) -> str:
    config = getattr(model, "config", {})
    return model.kind + (f" with quantizer {config['quantizer']!r}" if "quantizer" in config else "")


def _check_fit(path: Path, model: nn.Module, layout: dict[str, tuple[torch.dtype | None, tuple[int, ...]]]) -> None:
    """The file's model.* tensors (``layout``, from its header) must be ``model``'s state: the same
    names, shapes and dtypes."""
    expected = {f"model.{k}": (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    found = {k: v for k, v in layout.items() if k.startswith("model.")}
    problems = [f"{k} is missing" for k in sorted(expected.keys() - found.keys())]
    problems += [f"{k} is not in the model" for k in sorted(found.keys() - expected.keys())]
    problems += [
        f"{k} is {_layout_text(found[k])} in the file, {_layout_text(expected[k])} in the model"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(path, f"does not fit a {_described(model)}: {'; '.join(problems[:3])}{more}")


def _layout_text(layout: tuple[torch.dtype | None, tuple[int, ...]]) -> str:
    dtype, shape = layout
    return f"{str(dtype).replace('torch.', '') if dtype else 'of an unknown dtype'} {shape}"


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or ``path``/checkpoint.safetensors when ``path`` is a run folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / CHECKPOINT).is_file():
        raise FileNotFoundError(
            f"checkpoint {path}: a folder without {CHECKPOINT} (pass a run folder of fastvq train or a checkpoint file)"
        )
    return path / CHECKPOINT


def read_meta(path: Path, kind: str | None = None) -> dict[str, Any]:
    """The metadata of a training checkpoint, checked (see the module docstring) from its header
    alone; with ``kind`` given, one of another model raises CheckpointError."""
    return _checked_header(path, kind)[1]


def read_checkpoint(path: Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a training checkpoint, checked as ``read_meta`` does, then its checksum."""
    meta = read_meta(path, kind)
    return checkpoint.load(path)[0], meta


def _checked_header(path: Path, kind: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor layout, metadata) of a training checkpoint whose metadata passed `_check_meta` and
    whose model.* tensors fit the model it describes."""
    layout, meta = checkpoint.read_header(path)
    _check_meta(path, meta, kind)
    model = _build(path, meta, None, on_meta=True)
    _check_fit(path, model, layout)
    config = RunConfig(**meta["config"])  # checked by _check_meta; missing settings take their defaults
    if meta["kind"] in GENERATORS:
        same = config.model_args == meta["model_config"]["model_args"]
    else:  # what a resume builds: from the run's settings
        described = {"kind": meta["kind"], "model_config": {**config.model_args, "quantizer": config.quantizer}}
        same = _build(path, described, None, on_meta=True).config == model.config
    if not same:
        raise CheckpointError(
            path, "has invalid metadata: its run settings describe another model than its model_config"
        )
    return layout, meta


def _check_meta(path: Path, meta: Any, kind: str | None) -> None:
    """The schema of a training checkpoint's metadata (CheckpointError naming what is wrong)."""
    missing = [key for key in TRAINING_META if key not in meta] if isinstance(meta, dict) else list(TRAINING_META)
    if missing:
        raise CheckpointError(
            path, f"is not a training checkpoint of the fastvq command (its metadata lacks {missing})"
        )
    wrong = [
        f"{key} is not {describe(type_)}" for key, type_ in TRAINING_META.items() if not conforms(meta[key], type_)
    ]
    if not conforms(meta.get("scaler"), dict[str, Any] | None):
        wrong.append("scaler is not none or a mapping")
    if wrong:
        raise CheckpointError(path, f"has malformed metadata: {'; '.join(wrong)}")
    if meta["kind"] not in (*MODELS, *GENERATORS):
        raise CheckpointError(path, f"holds a model of an unknown kind {meta['kind']!r}")
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(path, f"holds a {meta['kind']} model, but a {kind} was requested")
    if not 0 <= meta["step"] <= MAX_STEP:
        raise CheckpointError(path, f"has a step {meta['step']} outside [0, 2^53]")
    unknown = sorted(set(meta["config"]) - {f.name for f in dataclasses.fields(RunConfig)})
    try:
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        config = RunConfig(**meta["config"])
        check_run_config(config)
        if config.model != meta["kind"]:
            raise ValueError(f"model {config.model!r} for a {meta['kind']} checkpoint")
        _check_model_config(meta["kind"], meta["model_config"])
    except ValueError as err:  # SettingError among them
        raise CheckpointError(path, f"has invalid metadata: {err}") from None


def _check_model_config(kind: str, model_config: dict[str, Any]) -> None:
    """ValueError naming what is malformed in the ``model_config`` of a ``kind`` checkpoint."""
    if kind in MODELS:
        args = {k: v for k, v in model_config.items() if k != "quantizer"}
        check_model_args(kind, args)
        if "quantizer" not in model_config or model_config["quantizer"] not in (None, *QUANTIZERS):
            raise ValueError(f"model_config quantizer {model_config.get('quantizer')!r} is not one of {QUANTIZERS}")
        return
    fields = {"tokenizer": dict[str, Any], "model_args": dict[str, Any], "shape": list[int], "class_names": list[str]}
    wrong = [key for key, type_ in fields.items() if key not in model_config or not conforms(model_config[key], type_)]
    tokenizer = model_config.get("tokenizer", {})
    if (
        wrong
        or set(tokenizer) != {"kind", "model_config"}
        or tokenizer["kind"] not in MODELS
        or not isinstance(tokenizer["model_config"], dict)
    ):
        raise ValueError(f"model_config of a {kind} needs {fields} with a tokenizer's kind and model_config")
    _check_model_config(tokenizer["kind"], tokenizer["model_config"])
    check_model_args(kind, model_config["model_args"])
    num_classes = model_config["model_args"].get("num_classes", 0)
    if num_classes != len(model_config["class_names"]):
        raise ValueError(
            f"model_config has {len(model_config['class_names'])} class names for num_classes={num_classes}"
        )


def _build(path: Path, meta: dict[str, Any], quantizer: str | None, on_meta: bool) -> VQModel | Generator:
    """The untrained model a checkpoint's (checked) metadata describes, ``quantizer`` replacing a
    tokenizer's; ``on_meta``: on the meta device, where nothing is allocated."""
    refused = (ValueError, TypeError, RuntimeError) if on_meta else (ValueError, TypeError)  # meta: sizes torch refuses
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            if meta["kind"] in GENERATORS:
                return Generator.from_config(meta["kind"], meta["model_config"])
            args = {k: v for k, v in meta["model_config"].items() if k != "quantizer"}
            return build_model(meta["kind"], args, quantizer or meta["model_config"]["quantizer"])
    except refused as err:
        raise CheckpointError(
            path, f"describes a {meta['kind']} that cannot be built: {str(err).splitlines()[0]}"
        ) from None


def load_model(
    path: str | Path, device: torch.device, quantizer: str | None = None
) -> tuple[VQModel | Generator, dict[str, Any]]:
    """A trained model (eval mode, on ``device``) and the checkpoint's metadata, from a checkpoint
    file or a run folder: a tokenizer, or a `Generator` (prior or diffusion, with its tokenizer).
    ``quantizer`` replaces a tokenizer's recorded one (fastvq and vector-quantize-pytorch share
    state_dict keys). The file is checked before anything is allocated (CheckpointError)."""
    path = checkpoint_file(path)
    layout, meta = _checked_header(path, None)
    if quantizer is not None:
        if meta["kind"] in GENERATORS:
            raise SettingError("{quantizer} applies to tokenizers; {path} holds a %s" % meta["kind"], path=path)
        _check_fit(path, _build(path, meta, quantizer, on_meta=True), layout)
    tensors, _ = checkpoint.load(path)
    model = _build(path, meta, quantizer, on_meta=False)
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
