"""The training loop: batches, steps, checkpoints with exact resume, and the run's final report.
Independent of the command line (`fastvq.app.cli` translates its flags into a `RunConfig`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastvq.models import LPIPS, VQModel

from . import distributed, report
from .config import RunConfig, build_model, check_run_config
from .data import CropDataset, batch_loader, default_workers, fixed_crops, split_images, to_model_input
from .device import QuantizerTimer, now, peak_memory_mib, resolve_device, torch_threads
from .errors import SettingError
from .evaluation import evaluate
from .metrics import batch_psnr
from .progress import Progress
from .runlog import RunLog, tensorboard_enabled
from .state import CHECKPOINT, read_checkpoint, restore_training_state, save_training_state
from .step import PRECISIONS, make_optimizers, make_scaler, train_step


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) or SIGTERM after finishing a step and checkpointing it."""

    def __init__(self, step: int, path: Path, signum: int = signal.SIGINT):
        super().__init__(f"interrupted after step {step}, saved in {path}")
        self.step, self.path, self.signum = step, path, signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals that stop training after the step in progress, checkpointed: Ctrl-C, and the SIGTERM of
`kill`, job schedulers (Slurm, Kubernetes) and torchrun before they kill a process."""


class StopRequest:
    """While entered (in the main thread), the first SIGINT or SIGTERM only sets ``requested`` (and
    ``signum``), so that the training loop can finish its step and checkpoint it; a second one of
    the same kind acts at once as it did before (KeyboardInterrupt, termination). With
    ``forwarded`` (a worker of torchrun), every such signal only sets ``requested``: a terminal's
    Ctrl-C reaches each worker twice, from the terminal and forwarded by torchrun, and torchrun's
    SIGKILL after its --shutdown-timeout (30 s by default) is the hard stop. ``announce``: say so on
    stderr. A signal the process ignores stays ignored."""

    def __init__(self, forwarded: bool = False, announce: bool = True):
        self.forwarded, self.announce = forwarded, announce

    def __enter__(self) -> StopRequest:
        self.requested, self.signum, self._previous = False, signal.SIGINT, {}
        if threading.current_thread() is threading.main_thread():
            for signum, fallback in zip(STOP_SIGNALS, (signal.default_int_handler, signal.SIG_DFL)):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle) or fallback
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.signum = signum
        if self.announce and not self.requested:
            then = ("torchrun stops the run after its --shutdown-timeout" if self.forwarded
                    else "send it again to stop at once")
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: saving a checkpoint after this step ({then})", file=sys.stderr, flush=True)
        self.requested = True
        if not self.forwarded:
            signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def append_history(history: dict[str, list[float]], row: dict[str, float], step: int) -> None:
    """Append the values of 0-based ``step`` to ``history``'s per-key lists (NaN for a key missing
    from ``row``, and before the step where a key first appears: GAN losses, evaluations)."""
    for key in set(history) | set(row):
        history.setdefault(key, [float("nan")] * step)
        history[key].append(float(row.get(key, float("nan"))))


def eval_entries(metrics: dict[str, float]) -> dict[str, float]:
    """The history entries of ``evaluate``'s metrics: eval_psnr, eval_ssim, eval_usage, eval_perplexity."""
    return {"eval_psnr": metrics["psnr"], "eval_ssim": metrics["ssim"], "eval_usage": metrics["codebook_usage"],
            "eval_perplexity": metrics["perplexity"]}


def periodic_eval(model: VQModel, images: np.ndarray, batch_size: int, device: torch.device, step: int,
                  out: Path | None, log: RunLog) -> tuple[dict[str, float], tuple]:
    """Held-out metrics during training, as history entries (``eval_entries``), and a grid of
    inputs and reconstructions in out/samples/step_NNNNNNN.png and ``log`` (unless ``out`` is
    None); also ``evaluate``'s whole result, which the end of a run reuses when its last step
    evaluated. Leaves the model in training mode and torch's RNG as it found them, so that
    training continues exactly as without the evaluation."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    result = evaluate(model, images, batch_size, device)
    metrics, inputs, recons, _ = result
    model.train()
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    if out is not None:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        grid = report.save_grid(inputs, recons, out / "samples" / f"step_{step:07d}.png",
                                title=f"step {step}: held-out PSNR {metrics['psnr']:.2f} dB")
        log.images(step, {"reconstructions": grid})
    return eval_entries(metrics), result


def train(
    config: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
    tensorboard: bool | None = None,
) -> dict[str, Any]:
    """Train per ``config``, writing to ``out_dir``: checkpoint.safetensors (every
    ``ckpt_every`` steps and at the end), metrics.json, reconstructions.png, loss.png,
    codebook_usage.png and, per ``tensorboard`` (None: if the package is installed; see
    ``runlog.tensorboard_enabled``), TensorBoard event files in tensorboard/. ``resume``
    continues from the checkpoint there; batches depend only on (seed, step), so the losses match
    an uninterrupted run exactly; resuming a finished run returns its metrics.json and rewrites
    nothing. Ctrl-C (SIGINT) or SIGTERM finishes the step in progress,
    checkpoints it and raises ``TrainingInterrupted``. Returns the metrics dict."""
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    check_run_config(config, training=True)
    if not resume and ckpt_path.exists():
        raise SettingError("{out_dir} {out} already holds {checkpoint}; set {resume} to continue it or choose "
                           "another {out_dir}", out=out, checkpoint=CHECKPOINT)
    for name in ("steps", "batch_size", "image_size", "ckpt_every", "log_every", "num_eval"):
        if getattr(config, name) < 1:
            raise SettingError("{%s} must be >= 1, got {value}" % name, value=getattr(config, name))
    if config.precision not in PRECISIONS:
        raise SettingError("{precision} must be one of {choices}, got {value!r}", choices=", ".join(PRECISIONS),
                           value=config.precision)
    if config.eval_every is not None and config.eval_every < 1:
        raise SettingError("{eval_every} must be >= 1, got {value}", value=config.eval_every)
    if config.workers is not None and config.workers < 0:
        raise SettingError("{workers} must be >= 0, got {value}", value=config.workers)
    if config.lpips_weights and config.model != "vqgan":
        raise SettingError("{lpips_weights} applies to {model} vqgan only, not {value}", value=config.model)
    device = resolve_device(config.device)
    ranks = distributed.start(device)
    try:
        if ranks.world > 1 and device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        tensorboard = tensorboard_enabled(tensorboard, announce=ranks.main)
        if config.batch_size % ranks.world:
            raise SettingError("{batch_size} {value} (the global batch) must be a multiple of the {world} processes",
                               value=config.batch_size, world=ranks.world)
        with torch_threads(config.threads, device) as threads, contextlib.ExitStack() as run_scope:
            config = dataclasses.replace(config, threads=threads, world_size=ranks.world)  # a resume uses them
            return _train(config, out, device, ranks, resume, progress and ranks.main, tensorboard, run_scope)
    finally:
        distributed.stop(ranks)


def _train(config: RunConfig, out: Path, device: torch.device, ranks: distributed.Ranks, resume: bool,
           progress: bool, tensorboard: bool, run_scope: contextlib.ExitStack) -> dict[str, Any]:
    """The run of ``train``; what it opens in ``run_scope`` is closed when the run ends, however it ends."""
    ckpt_path = out / CHECKPOINT
    train_images, eval_images = split_images(
        config.data, config.holdout, config.seed, config.resize, config.crop
    )
    dataset = CropDataset(train_images, config.image_size, config.seed)
    eval_set = fixed_crops(eval_images, config.image_size, config.num_eval)
    perceptual = LPIPS.from_file(config.lpips_weights).to(device) if config.lpips_weights else None

    torch.manual_seed(config.seed)
    model = build_model(config.model, config.model_args, config.quantizer).to(device)
    optimizers = make_optimizers(model, config)
    scaler = make_scaler(config.precision, device)
    history: dict[str, list[float]] = {}
    start = 0
    if resume:
        start, history = restore_training_state(ckpt_path, model, optimizers, scaler)
        trained_on = read_checkpoint(ckpt_path)[1]["config"].get("world_size", 1)
        if trained_on != ranks.world:
            raise SettingError("{out_dir} {out} was trained by {trained_on} processes, this run has {world}; resume "
                               "with the same number (torchrun --nproc-per-node {trained_on})", out=out,
                               trained_on=trained_on, world=ranks.world)
        if start > config.steps:
            raise SettingError("{steps} {value} is below the checkpoint's step {start}", value=config.steps,
                               start=start)
        if start == config.steps and (out / "metrics.json").is_file():
            return json.loads((out / "metrics.json").read_text())  # finished: nothing to train or rewrite
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    log = run_scope.enter_context(RunLog(out / "tensorboard" if tensorboard and ranks.main else None,
                                         continues_at=start + 1 if start else None))

    model.train()
    timer = QuantizerTimer(model.quantizer, device)
    step_seconds, quantizer_seconds = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    workers = default_workers(train_images) if config.workers is None else config.workers
    share = config.batch_size // ranks.world  # this process's slice of each global batch
    batches = iter(batch_loader(dataset, start, config.steps, config.batch_size, workers,
                                pin_memory=device.type == "cuda", items=range(ranks.rank * share,
                                                                             (ranks.rank + 1) * share)))
    final_eval = None  # evaluate's result for the final model, when the last step has one
    with StopRequest(forwarded=distributed.launched_by_torchrun(), announce=ranks.main) as stop:
        distributed.barrier(ranks)  # every process handles Ctrl-C before the progress line says the loop started
        bar = Progress(range(start, config.steps), total=config.steps, desc="train", unit="step", initial=start,
                       enabled=progress)
        for step in bar:
            images, error = next(batches)
            if error is not None:
                raise error
            x = to_model_input(images.to(device, non_blocking=True))
            q_before, t0 = timer.seconds, now(device)
            logs, indices, reconstruction = train_step(model, optimizers, x, step, perceptual,
                                                           precision=config.precision, scaler=scaler)
            step_seconds.append(now(device) - t0)
            quantizer_seconds.append(timer.seconds - q_before)
            logs["psnr"] = batch_psnr(x, reconstruction)
            logs, logs["usage"], stopping = distributed.agree(ranks, logs, indices, model.codebook_size,
                                                              stop.requested)
            if config.eval_every and (step + 1) % config.eval_every == 0:
                entries, evaluated = periodic_eval(model, eval_set, config.batch_size, device, step + 1,
                                                   out if ranks.main else None, log)
                logs.update(entries)
                if step + 1 == config.steps:
                    final_eval = evaluated  # the end of the run reuses it: the model does not change after
            append_history(history, {"step": step + 1, **logs}, step)
            log.scalars(step + 1, logs)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", psnr=f"{logs['psnr']:.2f}",
                                usage=f"{logs['usage']:.3f}")
            last = step + 1 == config.steps
            if ranks.main and ((step + 1) % config.ckpt_every == 0 or last or stopping):
                save_training_state(ckpt_path, model, optimizers, step + 1, history, config, scaler)
            if stopping and not last:
                bar.close()
                distributed.barrier(ranks)  # torchrun ends the others when one exits: not before the save
                raise TrainingInterrupted(step + 1, ckpt_path, stop.signum)
    bar.close()
    timer.close()

    if final_eval is None:
        final_eval = evaluate(model, eval_set, config.batch_size, device)
    eval_metrics, inputs, recons, _ = final_eval
    timed = slice(1, None) if len(step_seconds) > 1 else slice(None)  # skip warm-up step
    step_total, quantizer_total = sum(step_seconds[timed]), sum(quantizer_seconds[timed])
    timing = {
        "device": str(device),
        "threads": config.threads,
        "workers": workers,
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
    if ranks.main:
        report.write_json(out / "metrics.json", metrics)
        grid = report.save_grid(inputs, recons, out / "reconstructions.png")
        report.plot_curves(history, out)
        if not (config.eval_every and config.steps % config.eval_every == 0):  # else logged already
            log.scalars(config.steps, eval_entries(eval_metrics))
            log.images(config.steps, {"reconstructions": grid})
    distributed.barrier(ranks)
    return metrics
