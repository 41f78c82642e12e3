"""The ``fastvq`` command: train, evaluate, encode and decode with the reference tokenizers; train
a prior or a diffusion model over a trained tokenizer and sample new images from it.

    fastvq train --preset demo                       # VQ-VAE on builtin photos, minutes on CPU
    fastvq train --preset demo --data mnist --out runs/mnist           # a tokenizer of MNIST digits
    fastvq train --model prior --preset demo --tokenizer runs/mnist --out runs/mnist-prior
    fastvq sample --ckpt runs/mnist-prior --num 64 --out samples.png --eval
    fastvq train --model vqgan --preset gpu --data PATH --quantizer vector-quantize-pytorch
    torchrun --nproc-per-node 8 -m fastvq train --preset gpu --data PATH --precision bf16   # 8 GPUs
    fastvq eval --ckpt runs/vqvae-demo --data builtin
    fastvq encode --ckpt CKPT --data IMAGES --out CODES
    fastvq decode --ckpt CKPT --indices CODES --out IMAGES
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastvq import __version__
from fastvq.models import QUANTIZERS
from fastvq.models.checks import check_int
from fastvq.models.prior import check_sampling

from . import report, sample_quality
from .config import (
    GENERATORS,
    MODELS,
    PRESETS,
    RESUMABLE,
    RunConfig,
    make_config,
    model_arg_names,
    parse_model_args,
    preset_config,
)
from .data import builtin_images, fixed_crops, load_images, open_images, stack_images
from .device import machine_cpus, resolve_device, torch_threads
from .errors import SettingError
from .evaluation import decode_indices, encode_images, evaluate
from .files import write_atomic
from .generation import class_index, grid_layout, load_generator, sample_images, train_generator
from .loop import TrainingInterrupted
from .manifest import MANIFEST_FORMAT, output_names, read_manifest
from .metrics import InceptionFeatures
from .runlock import check_unlocked
from .settings import check_setting, named
from .state import CHECKPOINT, checkpoint_file, load_model, read_meta
from .step import PRECISIONS
from .training import train

# train flags that map onto RunConfig fields; None means "not given".
RUN_FLAGS = (
    ("--data", str, "builtin (scikit-image photos), mnist (digits padded to 32x32: train split for training, "
                    "test split held out), a folder of images (searched recursively, e.g. class/image.jpg), "
                    "one image file or a .npy/.npz; prior, diffusion: none means the tokenizer's"),
    ("--steps", int, "number of training steps"),
    ("--batch-size", int, "images per step"),
    ("--image-size", int, "side of the square training crops (a multiple of the model's factor); prior, "
                          "diffusion: of the center crops encoded, none means the tokenizer's"),
    ("--lr", float, "Adam learning rate"),
    ("--seed", int, "seed of initialisation and batch sampling"),
    ("--ckpt-every", int, "steps between checkpoints"),
    ("--log-every", int, "steps between progress-bar updates"),
    ("--eval-every", int, "steps between held-out evaluations during training (metrics in the history as "
                          "eval_*, a grid of inputs and reconstructions in OUT/samples/); none: at the end only"),
    ("--holdout", float, "fraction of PATH images held out for evaluation (builtin, mnist: a fixed split)"),
    ("--num-eval", int, "held-out crops evaluated at the end"),
    ("--resize", int, "resize the shorter side to S then center-crop SxS before cropping"),
    ("--crop", int, "center-crop SxS before cropping"),
    ("--lpips-weights", str, "VGG16-LPIPS weights file; adds the perceptual loss (VQGAN)"),
    ("--device", str, "auto (CUDA when present), cpu or cuda[:N]"),
    ("--workers", int, "data-loading processes; auto: 0 for builtin and array data (in memory), else one "
                       "per CPU but one, at most 8"),
    ("--threads", int, "CPU threads of torch; auto: the CPUs not busy with other work (the load "
                       "average), at least 1; on CUDA, torch's default"),
    ("--tokenizer", str, "prior, diffusion: the trained tokenizer, a run folder (or checkpoint) of fastvq train; "
                         "--data and --image-size default to its own"),
    ("--max-images", int, "prior, diffusion: encode at most this many training images, chosen by --seed"),
)

DEVICE_HELP = "auto (CUDA when present), cpu or cuda[:N] (default: %(default)s)"
THREADS_HELP = "CPU threads of torch (default: the CPUs not busy with other work, at least 1)"
NO_PROGRESS_HELP = ("no progress output (on a terminal a live bar; in a log, a line at the start, at most one "
                    "every 30 s, and one at the end)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastvq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a VQ-VAE or VQGAN, or a prior or diffusion model over one",
                            description="Train a tokenizer (VQ-VAE, VQGAN) on images, or a generative model over "
                                        "a trained tokenizer (--tokenizer): an autoregressive prior over its codes "
                                        "or latent diffusion over its latents. Defaults depend on --model and "
                                        "--preset; each option's help lists them.")
    p.add_argument("--model", choices=[*MODELS, *GENERATORS],
                   help="vqvae, vqgan: tokenizers; prior: a transformer over a tokenizer's codes; diffusion: a "
                        "DDPM over its pre-quantization latents (default: vqvae)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="demo: minutes on a 2-core CPU; gpu: 128 px, sized for one GPU (default: none, the "
                        "model's own defaults)")
    p.add_argument("--quantizer", choices=QUANTIZERS, help="quantizer implementation (default: fastvq)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="mixed precision: the model's forward and losses under autocast in bf16 or fp16 (fp16 "
                        "with a loss scaler); the quantizer keeps its own rules for 16-bit latents (default: fp32)")
    for name, kind, text in RUN_FLAGS:
        p.add_argument(name, type=kind, help=f"{text} ({default_text(name[2:].replace('-', '_'))})")
    for name in ("codebook_size", "codebook_dim"):
        what = "number of codes K" if name == "codebook_size" else "code width D"
        p.add_argument(flag(name), type=int, help=f"{what} ({default_text(name)})")
    p.add_argument("--set", dest="model_args", type=_model_arg, action="append", default=[],
                   metavar="KEY=VALUE", help="model constructor argument, repeatable, typed as the constructor "
                   "declares it: true/false (also yes/no, 1/0, any case), a number, a list (1,2,2 or [1, 2, 2]), "
                   f"none where allowed (default: the model's and the preset's values); keys: {model_arg_keys()}")
    p.add_argument("--out", type=Path, help="output folder (default: runs/MODEL[-PRESET])")
    p.add_argument("--resume", action="store_true", help="continue from OUT/" + CHECKPOINT)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="TensorBoard event files in OUT/tensorboard/ (tensorboard --logdir OUT); --tensorboard fails "
                        "if the tensorboard package is missing (default: written when it is installed)")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("eval", help="PSNR, SSIM, codebook usage (and rFID) on held-out images")
    p.add_argument("--ckpt", type=Path, required=True, help=CKPT_HELP)
    p.add_argument("--data", default="builtin",
                   help="builtin (held-out photos), mnist (the test digits), a folder of images (recursively), an "
                        "image file or a .npy/.npz (default: %(default)s)")
    p.add_argument("--out", type=Path, help="output folder (default: CKPT's run folder/eval)")
    p.add_argument("--num-eval", type=int, default=64,
                   help="crops of the builtin held-out photos (default: %(default)s)")
    p.add_argument("--image-size", type=int, help="side of those crops (default: the training size)")
    p.add_argument("--inception-weights", type=Path,
                   help="TorchScript Inception feature extractor (inception-2015-12-05.pt) for rFID. "
                        "TorchScript is a program, not data: fastvq runs it, so pass only a file you "
                        "trust (never one from an untrusted source); without this flag nothing is run (default: none)")
    _shared(p, "evaluate with this quantizer instead of the checkpoint's (default: the checkpoint's)")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("encode", help="images -> code indices (indices.npy + manifest.json)")
    p.add_argument("--ckpt", type=Path, required=True, help=CKPT_HELP)
    p.add_argument("--data", required=True, help="a folder of images (recursively), an image file or a .npy/.npz")
    p.add_argument("--out", type=Path, required=True, help="output folder for indices.npy and manifest.json")
    _shared(p)
    p.set_defaults(func=cmd_encode)

    p = commands.add_parser("decode", help="code indices (from encode) -> PNG images")
    p.add_argument("--ckpt", type=Path, required=True, help=CKPT_HELP)
    p.add_argument("--indices", type=Path, required=True, help="folder written by fastvq encode")
    p.add_argument("--out", type=Path, required=True, help="output folder for the PNG images")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_decode)

    p = commands.add_parser("sample", help="new images from a prior or diffusion run (a grid PNG, optionally .npy)",
                            description="Draw new images from a model trained by fastvq train --model prior or "
                                        "diffusion, decoded by its tokenizer.")
    p.add_argument("--ckpt", type=Path, required=True, help="a run folder of fastvq train --model prior or "
                                                            "diffusion, or its checkpoint.safetensors")
    p.add_argument("--num", type=int, default=64, help="images to draw (default: %(default)s)")
    p.add_argument("--out", type=Path, help="the grid PNG (default: CKPT's run folder/samples-seedS.png)")
    p.add_argument("--npy", type=Path, help="also write the images as an (N, H, W, 3) uint8 .npy array "
                                            "(default: none)")
    p.add_argument("--class", dest="class_", metavar="CLASS",
                   help="draw this class only: one of the training classes (a digit for mnist, a folder name) or "
                        "its index (default: every class equally often, one column each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: %(default)s)")
    for name, kind, options in SAMPLE_OPTIONS:
        p.add_argument(name, **{**options, "help": f"{kind}: {options['help']}"})
    p.add_argument("--eval", action="store_true", help="also judge the samples as eval-samples does (MNIST "
                                                       "digits), writing OUT with .json")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("eval-samples", help="judge generated MNIST digits beside real ones (a digit "
                                                 "classifier's confidence, coverage, Frechet distance)",
                            description=sample_quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the images: a .npy/.npz (fastvq sample --npy), a folder of "
                                                 "images or an image file")
    p.add_argument("--out", type=Path, help="also write the numbers to this JSON file (default: none)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--device", default="cpu", help="the classifier runs on the CPU (default: %(default)s)")
    p.set_defaults(func=cmd_eval_samples)
    return parser


SAMPLE_OPTIONS = (
    ("--temperature", "prior", {"type": float, "help": "softmax temperature; 0 takes the most likely code "
                                                       "(default: 1.0)"}),
    ("--top-k", "prior", {"type": int, "help": "draw among the k most likely codes only, k <= 16 (default: all "
                                               "codes)"}),
    ("--steps", "diffusion", {"type": int, "help": "DDIM steps (default: 50, or the model's diffusion steps when "
                                                   "fewer)"}),
    ("--guidance", "diffusion", {"type": float, "help": "classifier-free guidance scale (models with classes), 1 "
                                                        "for none (default: 1.0)"}),
    ("--eta", "diffusion", {"type": float, "help": "DDIM eta, 0 deterministic, 1 as noisy as DDPM (default: 0.0)"}),
    ("--no-quantize", "diffusion", {"action": "store_true", "help": "decode the latents as they are (default: "
                                                                     "quantize them first, as LDM does)"}),
)
"""The options of `fastvq sample` that apply to one model kind: (flag, kind, argparse keywords)."""
SAMPLE_KIND = {flag[2:].replace("-", "_"): kind for flag, kind, _ in SAMPLE_OPTIONS}
"""The model kind each sample option (its argparse dest) applies to."""


def _shared(p: argparse.ArgumentParser, quantizer_help: str | None = None) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--resize", type=int, help="resize the shorter side to S, center-crop SxS (default: none)")
    p.add_argument("--crop", type=int, help="center-crop SxS (default: none)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    if quantizer_help:
        p.add_argument("--quantizer", choices=QUANTIZERS, help=quantizer_help)


def _train_config(args: argparse.Namespace, out: Path) -> tuple[RunConfig, int]:
    """The run's settings from the flags (on --resume, from the checkpoint, with the flags that may
    change applied) and the step of the checkpoint resumed from (0 for a new run)."""
    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
             for flag, _, _ in RUN_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    for key in ("quantizer", "precision"):
        if getattr(args, key):
            given[key] = getattr(args, key)
    meta = read_meta(out / CHECKPOINT, args.model) if args.resume else None
    model_args = parse_model_args(meta["kind"] if meta else args.model or "vqvae", args.model_args)
    for key in ("codebook_size", "codebook_dim"):
        if getattr(args, key) is not None:
            model_args[key] = getattr(args, key)
    if not args.resume:
        return make_config(args.model or "vqvae", args.preset, model_args=model_args, **given), 0
    stored = meta["config"]
    if "threads" not in given and (stored.get("threads") or 1) > machine_cpus():
        raise SettingError("{out_dir} {out} was trained with %d CPU threads, more than the %d of this machine: "
                           "resume with {threads} N, N <= %d (the last bits of the results depend on the count)"
                           % (stored["threads"], machine_cpus(), machine_cpus()), out=out)
    for key, value in {**given, **{f"model_args.{k}": v for k, v in model_args.items()}}.items():
        old = stored["model_args"].get(key[11:]) if key.startswith("model_args.") else stored[key]
        if key not in RESUMABLE and json.dumps(value) != json.dumps(old):
            raise ValueError(
                f"{key}={value!r} differs from the checkpoint's {old!r}; drop it to resume "
                f"exactly (only {', '.join(RESUMABLE)} may change)"
            )
        if key in RESUMABLE:
            stored[key] = value
    return RunConfig(**stored), meta["step"]


def cmd_train(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / "-".join(filter(None, (args.model or "vqvae", args.preset)))
    check_unlocked(out)  # a run writing there: say so, not what its unfinished checkpoint looks like
    config, resumed_step = _train_config(args, out)
    if not args.resume and (out / CHECKPOINT).is_file():
        metrics = _finished_run(out, config)
        print(f"{out} already holds this run, finished at step {metrics['step']}: nothing trained. To train "
              f"further add --resume --steps N; for a new run choose another --out.")
    else:
        if args.resume and resumed_step == config.steps:
            print(f"{out} is finished at step {resumed_step}: nothing trained (raise --steps to train further)")
        run = train_generator if config.model in GENERATORS else train
        metrics = run(config, out, resume=args.resume, progress=not args.no_progress, tensorboard=args.tensorboard)
    if int(os.environ.get("RANK", "0")):  # one summary for a torchrun launch
        return 0
    if config.model in GENERATORS:
        bits = metrics["eval"].get("bits_per_code")
        print(f"{config.model}, step {metrics['step']}: held-out loss {metrics['eval']['loss']:.4f}"
              f"{'' if bits is None else f' ({bits:.3f} bits per code)'} on {metrics['data']['eval_images']} "
              f"images, trained on {metrics['data']['train_images']}; samples in {out / 'samples.png'} (more: "
              f"fastvq sample --ckpt {out})")
        return 0
    ev, timing = metrics["eval"], metrics["timing"]
    share = timing["quantizer_share"]
    print(
        f"{config.model} ({config.quantizer}), step {metrics['step']}: held-out PSNR "
        f"{ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}, codebook usage {ev['codebook_usage']:.3f}, "
        f"perplexity {ev['perplexity']:.1f}; quantizer share of step time "
        f"{'n/a' if share is None else f'{100 * share:.1f}%'}; outputs in {out}"
    )
    return 0


def _finished_run(out: Path, config: RunConfig) -> dict[str, Any]:
    """The metrics of the finished run in ``out`` if ``config`` would train it again (settings that
    do not change results aside); otherwise an error that offers --resume or another --out."""
    meta = read_meta(out / CHECKPOINT)
    stored, wanted = meta["config"], config.to_dict()
    # a generator's run resolves data, image_size and num_classes (None: from the tokenizer and the data)
    settings = {k: v for k, v in wanted.items()
                if k not in RESUMABLE and k != "model_args" and not (v is None and k in ("data", "image_size"))}
    model_args = {k: v for k, v in wanted["model_args"].items() if not (v is None and k == "num_classes")}
    stored_args = {k: v for k, v in stored["model_args"].items() if k in model_args or k != "num_classes"}
    same = all(stored.get(k) == v for k, v in settings.items()) and stored_args == model_args
    if same and meta["step"] == config.steps and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    state = "finished" if meta["step"] == stored["steps"] else f"stopped at step {meta['step']} of {stored['steps']}"
    differs = "" if same else " with other settings"
    raise ValueError(f"--out {out} already holds a {meta['kind']} run{differs} ({state}): add --resume to "
                     f"continue it, or choose another --out for a new run")


def cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, meta = load_model(args.ckpt, device, args.quantizer)
    out = args.out or checkpoint_file(args.ckpt).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)  # before the work: a folder that cannot be made fails now
    if args.data == "builtin":
        size = args.image_size or meta["config"]["image_size"]
        images = fixed_crops(builtin_images("eval")[1], size, args.num_eval)
    else:
        images = open_images(args.data, args.resize, args.crop)  # read batch by batch
    inception = InceptionFeatures(args.inception_weights, device) if args.inception_weights else None
    metrics, inputs, recons, counts = evaluate(model, images, args.batch_size, device, inception,
                                               not args.no_progress)
    report.write_json(out / "metrics.json", {
        "checkpoint": str(args.ckpt), "step": meta["step"], "kind": meta["kind"],
        "quantizer": model.config["quantizer"], "data": args.data, **metrics,
    })
    report.save_grid(inputs, recons, out / "reconstructions.png")
    report.plot_code_histogram(counts, out / "codebook_usage.png")
    print(", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f"; outputs in {out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, meta = load_model(args.ckpt, device)
    images = open_images(args.data, args.resize, args.crop)  # read batch by batch
    args.out.mkdir(parents=True, exist_ok=True)
    indices = encode_images(model, images, args.batch_size, device, not args.no_progress)
    names = images.names
    compact = indices.astype(np.min_scalar_type(model.codebook_size - 1))
    write_atomic(args.out / "indices.npy", lambda f: np.save(f, compact))
    report.write_json(args.out / "manifest.json", {
        "format": MANIFEST_FORMAT, "checkpoint": str(args.ckpt), "kind": meta["kind"],
        "codebook_size": model.codebook_size, "shape": list(indices.shape), "images": names,
    })
    print(f"encoded {len(names)} images to {args.out / 'indices.npy'} {tuple(indices.shape)}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.indices)
    device = resolve_device(args.device)
    model, meta = load_model(args.ckpt, device)
    if (manifest["kind"], manifest["codebook_size"]) != (meta["kind"], model.codebook_size):
        raise ValueError(
            f"--indices {args.indices} were made by a {manifest['kind']} with "
            f"{manifest['codebook_size']} codes, but --ckpt {args.ckpt} is a {meta['kind']} "
            f"with {model.codebook_size}"
        )
    path = args.indices / "indices.npy"
    indices = np.load(path, allow_pickle=False, mmap_mode="r")  # a header larger than the file fails here
    if indices.shape != tuple(manifest["shape"]):
        raise ValueError(f"{path} has shape {indices.shape}, the manifest says {tuple(manifest['shape'])}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{path} holds {indices.dtype} values; code indices are integers")
    indices = np.array(indices)
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= model.codebook_size):
        raise ValueError(f"{path} holds codes in [{int(indices.min())}, {int(indices.max())}]; this "
                         f"{meta['kind']}'s codes are in [0, {model.codebook_size})")
    names = output_names(manifest["images"], args.indices / "manifest.json")
    args.out.mkdir(parents=True, exist_ok=True)
    images = decode_indices(model, indices, args.batch_size, device, not args.no_progress)
    for name, image in zip(names, images):
        write_atomic(args.out / name, lambda f, image=image: Image.fromarray(image).save(f, format="PNG"))
    print(f"decoded {len(names)} images to {args.out}")
    return 0


def output_file(path: Path, setting: str) -> Path:
    """``path``, a file to write at the end of a command, with its folder made now: a folder that
    cannot be made, or a folder at ``path`` itself, fails before any work."""
    if path.is_dir():
        raise SettingError("{%s} {path} is a folder; name a file" % setting, path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def cmd_sample(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    generator, meta = load_generator(args.ckpt, device)
    options = {}
    for name, kind in SAMPLE_KIND.items():
        value = getattr(args, name)
        if value is None or value is False:
            continue
        if kind != generator.kind:
            raise SettingError("{%s} applies to %s models; {ckpt} %s holds a %s" % (name, kind, args.ckpt,
                                                                                  generator.kind))
        options[name] = value
    if options.pop("no_quantize", False):
        options["quantize"] = False
    if generator.kind == "prior":
        with named("top_k"):
            check_sampling(1, options.get("top_k"), generator.codebook_size)
    elif "steps" in options:
        with named("steps"):
            check_int("steps", options["steps"], 1, generator.model.schedule.steps)
    if "guidance" in options and not generator.class_names:
        raise SettingError("{guidance} applies to a model trained with classes; {ckpt} %s has none" % args.ckpt)
    out = args.out or checkpoint_file(args.ckpt).parent / f"samples-seed{args.seed}.png"
    if out.suffix.lower() != ".png":
        raise SettingError("{out} {path}: the grid is a PNG file; end the name in .png", path=out)
    output_file(out, "out")
    if args.npy:
        output_file(args.npy, "npy")
    label = None if args.class_ is None else class_index(args.class_, generator.class_names)
    start = time.perf_counter()
    images = sample_images(generator, args.num, batch_size=args.batch_size, label=label, seed=args.seed,
                           progress=not args.no_progress, **options)
    seconds = time.perf_counter() - start
    what = "" if label is None else f", class {generator.class_names[label]}"
    report.save_samples(images, out, *grid_layout(generator.class_names, label),
                        title=f"{generator.kind}, step {meta['step']}, seed {args.seed}{what}")
    if args.npy:
        write_atomic(args.npy, lambda f: np.save(f, images))
    print(f"{len(images)} {generator.kind} samples in {out}{f' and {args.npy}' if args.npy else ''}: "
          f"{1000 * seconds / len(images):.1f} ms per image on {device}")
    if args.eval:
        _report_quality(images, out.with_suffix(".json"))
    return 0


def cmd_eval_samples(args: argparse.Namespace) -> int:
    if args.out is not None:
        output_file(args.out, "out")
    images = stack_images(*load_images(args.data))
    _report_quality(images, args.out)
    return 0


def _report_quality(images: np.ndarray, out: Path | None) -> None:
    """Print (and write to ``out`` as JSON) the sample-quality numbers of images beside real digits'."""
    result = sample_quality.evaluate_samples(images, progress=lambda text: print(text, file=sys.stderr))
    samples, real = result["samples"], result["real"]
    print(f"{'':28}{'samples':>12}{'real digits':>14}")
    print(f"{'classifier confidence':28}{samples['confidence']:>12.3f}{real['confidence']:>14.3f}")
    print(f"{'coverage of the 10 digits':28}{samples['coverage']:>12.0%}{real['coverage']:>14.0%}")
    print(f"{'Frechet distance':28}{samples['frechet_distance']:>12.2f}{real['frechet_distance']:>14.2f}")
    print(f"class histogram of the samples: {samples['histogram']} ({samples['count']} images, compared with "
          f"{result['reference_count']} held-out test digits)")
    if out is not None:
        report.write_json(out, result)
        print(f"numbers in {out}")


def main(argv: list[str] | None = None) -> int:
    """Run the ``fastvq`` command with ``argv`` (default sys.argv[1:]); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        for name, value in vars(args).items():  # every number in range before any work
            check_setting(name, value)
        if args.command == "train":  # its threads are a run setting
            return args.func(args)
        with torch_threads(args.threads, resolve_device(args.device)):
            return args.func(args)
    except KeyboardInterrupt as err:
        code = 128 + int(getattr(err, "signum", signal.SIGINT))  # the shell's code for the stopping signal
        if int(os.environ.get("RANK", "0")):  # one message for a torchrun launch
            return code
        if isinstance(err, TrainingInterrupted):
            print(f"fastvq train: interrupted after step {err.step}, saved in {err.path}; continue with the "
                  "same command and --resume", file=sys.stderr)
        else:
            print(f"fastvq {args.command}: interrupted", file=sys.stderr)
            if args.command == "train":
                print("the last checkpoint is intact; continue with the same command and --resume",
                      file=sys.stderr)
        return code
    except (ValueError, OSError, ImportError) as err:
        message = err.spelled(flag) if isinstance(err, SettingError) else err
        print(f"fastvq {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
