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
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastvq.models.checks import check_int
from fastvq.models.prior import check_sampling

from . import flags, report, sample_quality
from .config import (
    GENERATORS,
    RESUMABLE,
    RunConfig,
    make_config,
    parse_model_args,
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
from .training import train


def _train_config(args: argparse.Namespace, out: Path) -> tuple[RunConfig, int]:
    """The run's settings from the flags (on --resume, from the checkpoint, with the flags that may
    change applied) and the step of the checkpoint resumed from (0 for a new run)."""
    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in flags.RUN_FLAGS}
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
        raise SettingError(
            "{out_dir} {out} was trained with %d CPU threads, more than the %d of this machine: "
            "resume with {threads} N, N <= %d (the last bits of the results depend on the count)"
            % (stored["threads"], machine_cpus(), machine_cpus()),
            out=out,
        )
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
        print(
            f"{out} already holds this run, finished at step {metrics['step']}: nothing trained. To train "
            f"further add --resume --steps N; for a new run choose another --out."
        )
    else:
        if args.resume and resumed_step == config.steps:
            print(f"{out} is finished at step {resumed_step}: nothing trained (raise --steps to train further)")
        run = train_generator if config.model in GENERATORS else train
        metrics = run(config, out, resume=args.resume, progress=not args.no_progress, tensorboard=args.tensorboard)
    if int(os.environ.get("RANK", "0")):  # one summary for a torchrun launch
        return 0
    if config.model in GENERATORS:
        bits = metrics["eval"].get("bits_per_code")
        print(
            f"{config.model}, step {metrics['step']}: held-out loss {metrics['eval']['loss']:.4f}"
            f"{'' if bits is None else f' ({bits:.3f} bits per code)'} on {metrics['data']['eval_images']} "
            f"images, trained on {metrics['data']['train_images']}; samples in {out / 'samples.png'} (more: "
            f"fastvq sample --ckpt {out})"
        )
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
    settings = {
        k: v
        for k, v in wanted.items()
        if k not in RESUMABLE and k != "model_args" and not (v is None and k in ("data", "image_size"))
    }
    model_args = {k: v for k, v in wanted["model_args"].items() if not (v is None and k == "num_classes")}
    stored_args = {k: v for k, v in stored["model_args"].items() if k in model_args or k != "num_classes"}
    same = all(stored.get(k) == v for k, v in settings.items()) and stored_args == model_args
    if same and meta["step"] == config.steps and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    state = "finished" if meta["step"] == stored["steps"] else f"stopped at step {meta['step']} of {stored['steps']}"
    differs = "" if same else " with other settings"
    raise ValueError(
        f"--out {out} already holds a {meta['kind']} run{differs} ({state}): add --resume to "
        f"continue it, or choose another --out for a new run"
    )


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
    metrics, inputs, recons, counts = evaluate(model, images, args.batch_size, device, inception, not args.no_progress)
    report.write_json(
        out / "metrics.json",
        {
            "checkpoint": str(args.ckpt),
            "step": meta["step"],
            "kind": meta["kind"],
            "quantizer": model.config["quantizer"],
            "data": args.data,
            **metrics,
        },
    )
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
    report.write_json(
        args.out / "manifest.json",
        {
            "format": MANIFEST_FORMAT,
            "checkpoint": str(args.ckpt),
            "kind": meta["kind"],
            "codebook_size": model.codebook_size,
            "shape": list(indices.shape),
            "images": names,
        },
    )
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
        raise ValueError(
            f"{path} holds codes in [{int(indices.min())}, {int(indices.max())}]; this "
            f"{meta['kind']}'s codes are in [0, {model.codebook_size})"
        )
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
    for name, kind in flags.SAMPLE_KIND.items():
        value = getattr(args, name)
        if value is None or value is False:
            continue
        if kind != generator.kind:
            raise SettingError(
                "{%s} applies to %s models; {ckpt} %s holds a %s" % (name, kind, args.ckpt, generator.kind)
            )
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
    images = sample_images(
        generator,
        args.num,
        batch_size=args.batch_size,
        label=label,
        seed=args.seed,
        progress=not args.no_progress,
        **options,
    )
    seconds = time.perf_counter() - start
    what = "" if label is None else f", class {generator.class_names[label]}"
    report.save_samples(
        images,
        out,
        *grid_layout(generator.class_names, label),
        title=f"{generator.kind}, step {meta['step']}, seed {args.seed}{what}",
    )
    if args.npy:
        write_atomic(args.npy, lambda f: np.save(f, images))
    print(
        f"{len(images)} {generator.kind} samples in {out}{f' and {args.npy}' if args.npy else ''}: "
        f"{1000 * seconds / len(images):.1f} ms per image on {device}"
    )
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
    print(
        f"class histogram of the samples: {samples['histogram']} ({samples['count']} images, compared with "
        f"{result['reference_count']} held-out test digits)"
    )
    if out is not None:
        report.write_json(out, result)
        print(f"numbers in {out}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``fastvq`` command (`fastvq.app.flags`), each command with its handler."""
    return flags.build_parser(
        __doc__,
        {
            "train": cmd_train,
            "eval": cmd_eval,
            "encode": cmd_encode,
            "decode": cmd_decode,
            "sample": cmd_sample,
            "eval-samples": cmd_eval_samples,
        },
    )


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
            print(
                f"fastvq train: interrupted after step {err.step}, saved in {err.path}; continue with the "
                "same command and --resume",
                file=sys.stderr,
            )
        else:
            print(f"fastvq {args.command}: interrupted", file=sys.stderr)
            if args.command == "train":
                print("the last checkpoint is intact; continue with the same command and --resume", file=sys.stderr)
        return code
    except (ValueError, OSError, ImportError) as err:
        message = err.spelled(flags.flag) if isinstance(err, SettingError) else err
        print(f"fastvq {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
