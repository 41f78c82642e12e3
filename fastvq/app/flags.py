"""The flags of the ``fastvq`` command: its parser, help texts with the defaults of every model and
preset, and the names flags give to `fastvq.app` settings (errors below the command name settings;
the command spells them as flags)."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastvq import __version__
from fastvq.models import QUANTIZERS

from . import sample_quality
from .config import GENERATORS, MODELS, PRECISIONS, PRESETS, RunConfig, model_arg_names, preset_config
from .state import CHECKPOINT

# train flags that map onto RunConfig fields; None means "not given".
RUN_FLAGS = (
    (
        "--data",
        str,
        "builtin (scikit-image photos), mnist (digits padded to 32x32: train split for training, "
        "test split held out), a folder of images (searched recursively, e.g. class/image.jpg), "
        "one image file or a .npy/.npz; prior, diffusion: none means the tokenizer's",
    ),
    ("--steps", int, "number of training steps"),
    ("--batch-size", int, "images per step"),
    (
        "--image-size",
        int,
        "side of the square training crops (a multiple of the model's factor); prior, "
        "diffusion: of the center crops encoded, none means the tokenizer's",
    ),
    ("--lr", float, "Adam learning rate"),
    ("--seed", int, "seed of initialisation and batch sampling"),
    ("--ckpt-every", int, "steps between checkpoints"),
    ("--log-every", int, "steps between progress-bar updates"),
    (
        "--eval-every",
        int,
        "steps between held-out evaluations during training (metrics in the history as "
        "eval_*, a grid of inputs and reconstructions in OUT/samples/); none: at the end only",
    ),
    ("--holdout", float, "fraction of PATH images held out for evaluation (builtin, mnist: a fixed split)"),
    ("--num-eval", int, "held-out crops evaluated at the end"),
    ("--resize", int, "resize the shorter side to S then center-crop SxS before cropping"),
    ("--crop", int, "center-crop SxS before cropping"),
    ("--lpips-weights", str, "VGG16-LPIPS weights file; adds the perceptual loss (VQGAN)"),
    ("--device", str, "auto (CUDA when present), cpu or cuda[:N]"),
    (
        "--workers",
        int,
        "data-loading processes; auto: 0 for builtin and array data (in memory), else one per CPU but one, at most 8",
    ),
    (
        "--threads",
        int,
        "CPU threads of torch; auto: the CPUs not busy with other work (the load "
        "average), at least 1; on CUDA, torch's default",
    ),
    (
        "--tokenizer",
        str,
        "prior, diffusion: the trained tokenizer, a run folder (or checkpoint) of fastvq train; "
        "--data and --image-size default to its own",
    ),
    ("--max-images", int, "prior, diffusion: encode at most this many training images, chosen by --seed"),
)

DEVICE_HELP = "auto (CUDA when present), cpu or cuda[:N] (default: %(default)s)"
THREADS_HELP = "CPU threads of torch (default: the CPUs not busy with other work, at least 1)"
NO_PROGRESS_HELP = (
    "no progress output (on a terminal a live bar; in a log, a line at the start, at most one "
    "every 30 s, and one at the end)"
)
CKPT_HELP = "a run folder of fastvq train, or its checkpoint.safetensors"


FLAG_OF_SETTING = {"out_dir": "--out", "model_args": "--set", "class_": "--class"}
"""Settings whose flag is not `--` + the name with dashes."""


def flag(setting: str) -> str:
    """The command-line flag that sets `setting` (an argument name of `fastvq.app`)."""
    return FLAG_OF_SETTING.get(setting, "--" + setting.replace("_", "-"))


def _model_arg(text: str) -> tuple[str, str]:
    """KEY=VALUE -> (KEY, VALUE); the value is typed once the model is known (`parse_model_args`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _model_arg_default(model: str, setting: str, config: RunConfig) -> Any:
    if setting in config.model_args:
        return config.model_args[setting]
    return inspect.signature(MODELS[model]).parameters[setting].default


def default_text(setting: str) -> str:
    """'default: ...' for a train setting, whose default depends on --model and --preset."""
    values: dict[str, list[str]] = {}
    models = MODELS if setting in ("codebook_size", "codebook_dim") else (*MODELS, *GENERATORS)
    for model in models:
        for preset in (None, *(p for p in PRESETS if model in PRESETS[p])):
            config = preset_config(model, preset)
            if setting in ("codebook_size", "codebook_dim"):
                value = _model_arg_default(model, setting, config)
            else:
                value = getattr(config, setting)
            shown = str(value) if value is not None else "auto" if setting in ("threads", "workers") else "none"
            values.setdefault(shown, []).append(" ".join(filter(None, (model, preset))))
    if len(values) == 1:
        return f"default: {next(iter(values))}"
    return "default: " + "; ".join(f"{value} ({', '.join(labels)})" for value, labels in values.items())


def model_arg_keys() -> str:
    """The keys --set accepts, per model."""
    return "; ".join(f"{model}: {', '.join(model_arg_names(model))}" for model in (*MODELS, *GENERATORS))


def build_parser(description: str, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The parser of the ``fastvq`` command; each command's parsed arguments carry its handler
    (``args.func``, from ``handlers``: command name -> function)."""
    parser = argparse.ArgumentParser(
        prog="fastvq", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fastvq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_encode, _add_decode, _add_sample, _add_eval_samples):
        add(commands)
    for name, command in commands.choices.items():
        command.set_defaults(func=handlers[name])
    return parser


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train a VQ-VAE or VQGAN, or a prior or diffusion model over one",
        description="Train a tokenizer (VQ-VAE, VQGAN) on images, or a generative model over "
        "a trained tokenizer (--tokenizer): an autoregressive prior over its codes "
        "or latent diffusion over its latents. Defaults depend on --model and "
        "--preset; each option's help lists them.",
    )
    p.add_argument(
        "--model",
        choices=[*MODELS, *GENERATORS],
        help="vqvae, vqgan: tokenizers; prior: a transformer over a tokenizer's codes; diffusion: a "
        "DDPM over its pre-quantization latents (default: vqvae)",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="demo: minutes on a 2-core CPU; gpu: 128 px, sized for one GPU (default: none, the model's own defaults)",
    )
    p.add_argument("--quantizer", choices=QUANTIZERS, help="quantizer implementation (default: fastvq)")
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="mixed precision: the model's forward and losses under autocast in bf16 or fp16 (fp16 "
        "with a loss scaler); the quantizer keeps its own rules for 16-bit latents (default: fp32)",
    )
    for name, kind, text in RUN_FLAGS:
        p.add_argument(name, type=kind, help=f"{text} ({default_text(name[2:].replace('-', '_'))})")
    for name in ("codebook_size", "codebook_dim"):
        what = "number of codes K" if name == "codebook_size" else "code width D"
        p.add_argument(flag(name), type=int, help=f"{what} ({default_text(name)})")
    p.add_argument(
        "--set",
        dest="model_args",
        type=_model_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor argument, repeatable, typed as the constructor "
        "declares it: true/false (also yes/no, 1/0, any case), a number, a list (1,2,2 or [1, 2, 2]), "
        f"none where allowed (default: the model's and the preset's values); keys: {model_arg_keys()}",
    )
    p.add_argument("--out", type=Path, help="output folder (default: runs/MODEL[-PRESET])")
    p.add_argument("--resume", action="store_true", help="continue from OUT/" + CHECKPOINT)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        help="TensorBoard event files in OUT/tensorboard/ (tensorboard --logdir OUT); --tensorboard fails "
        "if the tensorboard package is missing (default: written when it is installed)",
    )


def _add_eval(commands) -> None:
    p = commands.add_parser("eval", help="PSNR, SSIM, codebook usage (and rFID) on held-out images")
    p.add_argument("--ckpt", type=Path, required=True, help=CKPT_HELP)
    p.add_argument(
        "--data",
        default="builtin",
        help="builtin (held-out photos), mnist (the test digits), a folder of images (recursively), an "
        "image file or a .npy/.npz (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: CKPT's run folder/eval)")
    p.add_argument(
        "--num-eval", type=int, default=64, help="crops of the builtin held-out photos (default: %(default)s)"
    )
    p.add_argument("--image-size", type=int, help="side of those crops (default: the training size)")
    p.add_argument(
        "--inception-weights",
        type=Path,
        help="TorchScript Inception feature extractor (inception-2015-12-05.pt) for rFID. "
        "TorchScript is a program, not data: fastvq runs it, so pass only a file you "
        "trust (never one from an untrusted source); without this flag nothing is run (default: none)",
    )
    _shared(p, "evaluate with this quantizer instead of the checkpoint's (default: the checkpoint's)")


def _add_encode(commands) -> None:
    p = commands.add_parser("encode", help="images -> code indices (indices.npy + manifest.json)")
    p.add_argument("--ckpt", type=Path, required=True, help=CKPT_HELP)
    p.add_argument("--data", required=True, help="a folder of images (recursively), an image file or a .npy/.npz")
    p.add_argument("--out", type=Path, required=True, help="output folder for indices.npy and manifest.json")
    _shared(p)


def _add_decode(commands) -> None:
    p = commands.add_parser("decode", help="code indices (from encode) -> PNG images")
    p.add_argument("--ckpt", type=Path, required=True, help=CKPT_HELP)
    p.add_argument("--indices", type=Path, required=True, help="folder written by fastvq encode")
    p.add_argument("--out", type=Path, required=True, help="output folder for the PNG images")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_sample(commands) -> None:
    p = commands.add_parser(
        "sample",
        help="new images from a prior or diffusion run (a grid PNG, optionally .npy)",
        description="Draw new images from a model trained by fastvq train --model prior or "
        "diffusion, decoded by its tokenizer.",
    )
    p.add_argument(
        "--ckpt",
        type=Path,
        required=True,
        help="a run folder of fastvq train --model prior or diffusion, or its checkpoint.safetensors",
    )
    p.add_argument("--num", type=int, default=64, help="images to draw (default: %(default)s)")
    p.add_argument("--out", type=Path, help="the grid PNG (default: CKPT's run folder/samples-seedS.png)")
    p.add_argument("--npy", type=Path, help="also write the images as an (N, H, W, 3) uint8 .npy array (default: none)")
    p.add_argument(
        "--class",
        dest="class_",
        metavar="CLASS",
        help="draw this class only: one of the training classes (a digit for mnist, a folder name) or "
        "its index (default: every class equally often, one column each)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: %(default)s)")
    for name, kind, options in SAMPLE_OPTIONS:
        p.add_argument(name, **{**options, "help": f"{kind}: {options['help']}"})
    p.add_argument(
        "--eval",
        action="store_true",
        help="also judge the samples as eval-samples does (MNIST digits), writing OUT with .json",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)


def _add_eval_samples(commands) -> None:
    p = commands.add_parser(
        "eval-samples",
        help="judge generated MNIST digits beside real ones (a digit "
        "classifier's confidence, coverage, Frechet distance)",
        description=sample_quality.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        help="the images: a .npy/.npz (fastvq sample --npy), a folder of images or an image file",
    )
    p.add_argument("--out", type=Path, help="also write the numbers to this JSON file (default: none)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="the classifier runs on the CPU (default: %(default)s)")


SAMPLE_OPTIONS = (
    (
        "--temperature",
        "prior",
        {"type": float, "help": "softmax temperature; 0 takes the most likely code (default: 1.0)"},
    ),
    (
        "--top-k",
        "prior",
        {"type": int, "help": "draw among the k most likely codes only, k <= 16 (default: all codes)"},
    ),
    (
        "--steps",
        "diffusion",
        {"type": int, "help": "DDIM steps (default: 50, or the model's diffusion steps when fewer)"},
    ),
    (
        "--guidance",
        "diffusion",
        {"type": float, "help": "classifier-free guidance scale (models with classes), 1 for none (default: 1.0)"},
    ),
    ("--eta", "diffusion", {"type": float, "help": "DDIM eta, 0 deterministic, 1 as noisy as DDPM (default: 0.0)"}),
    (
        "--no-quantize",
        "diffusion",
        {"action": "store_true", "help": "decode the latents as they are (default: quantize them first, as LDM does)"},
    ),
)
"""The options of `fastvq sample` that apply to one model kind: (flag, kind, argparse keywords)."""
SAMPLE_KIND = {flag[2:].replace("-", "_"): kind for flag, kind, _ in SAMPLE_OPTIONS}
"""The model kind each sample option (its argparse dest) applies to."""


def _shared(p: argparse.ArgumentParser, quantizer_help: str | None = None) -> None:
    """The options every command that runs a tokenizer over images has."""
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--resize", type=int, help="resize the shorter side to S, center-crop SxS (default: none)")
    p.add_argument("--crop", type=int, help="center-crop SxS (default: none)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    if quantizer_help:
        p.add_argument("--quantizer", choices=QUANTIZERS, help=quantizer_help)
