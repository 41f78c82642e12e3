"""Training a tokenizer (VQ-VAE, VQGAN) on images: its batches, step, held-out evaluation and
metrics, driven by the one training loop of `fastvq.app.loop`. Independent of the command line
(`fastvq.app.cli` translates its flags into a `RunConfig`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fastvq.models import LPIPS

from . import distributed, loop, report
from .config import MODELS, PRECISIONS, RunConfig, build_model
from .data import CropDataset, batch_loader, default_workers, fixed_crops, split_images, to_model_input
from .device import QuantizerTimer
from .errors import SettingError
from .evaluation import evaluate
from .metrics import batch_psnr
from .step import make_optimizers, make_scaler, train_step


def train(
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool | None = None,
) -> dict[str, Any]:
    """Train a tokenizer per ``config``, writing to ``out_dir``: checkpoint.safetensors (every
    ``ckpt_every`` steps and at the end), metrics.json, reconstructions.png, loss.png,
    codebook_usage.png, with ``eval_every`` a grid per evaluation in samples/, and per
    ``tensorboard`` (None: if the package is installed; see ``runlog.tensorboard_enabled``)
    TensorBoard event files in tensorboard/. ``resume`` continues from the checkpoint there;
    batches depend only on (seed, step), so the losses match an uninterrupted run exactly; resuming
    a finished run returns its metrics.json and rewrites nothing. Ctrl-C (SIGINT) or SIGTERM
    finishes the step in progress, checkpoints it and raises ``loop.TrainingInterrupted``; another
    run writing to ``out_dir`` raises SettingError. Returns the metrics dict."""
    return loop.run(TokenizerTraining, config, out_dir, resume, progress, tensorboard)


def eval_entries(metrics: dict[str, float]) -> dict[str, float]:
    """The history entries of ``evaluate``'s metrics: eval_psnr, eval_ssim, eval_usage, eval_perplexity."""
    return {
        "eval_psnr": metrics["psnr"],
        "eval_ssim": metrics["ssim"],
        "eval_usage": metrics["codebook_usage"],
        "eval_perplexity": metrics["perplexity"],
    }


class TokenizerTraining(loop.TrainingTask):
    """A VQ-VAE or VQGAN trained on random crops of ``config.data`` (`fastvq.app.data.CropDataset`),
    each process of a torchrun launch on its slice of every global batch; evaluated on fixed
    held-out crops (PSNR, SSIM, codebook usage and perplexity)."""

    shown = {"loss": ".4f", "psnr": ".2f", "usage": ".3f"}

    @classmethod
    def check(cls, config: RunConfig) -> None:
        if config.model not in MODELS:
            raise SettingError(
                "{model} must be one of {choices} here, got {value!r}", choices=", ".join(MODELS), value=config.model
            )
        if config.precision not in PRECISIONS:
            raise SettingError(
                "{precision} must be one of {choices}, got {value!r}",
                choices=", ".join(PRECISIONS),
                value=config.precision,
            )
        if config.lpips_weights and config.model != "vqgan":
            raise SettingError("{lpips_weights} applies to {model} vqgan only, not {value}", value=config.model)

    def __init__(self, config: RunConfig, run: loop.RunContext):
        self.config, self.run = config, run
        train_images, eval_images = split_images(config.data, config.holdout, config.seed, config.resize, config.crop)
        self.dataset = CropDataset(train_images, config.image_size, config.seed)
        self.eval_set = fixed_crops(eval_images, config.image_size, config.num_eval)
        self.workers = default_workers(train_images) if config.workers is None else config.workers
        self.perceptual = LPIPS.from_file(config.lpips_weights).to(run.device) if config.lpips_weights else None
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, config.model_args, config.quantizer).to(run.device)
        self.optimizers = make_optimizers(self.model, config)
        self.scaler = make_scaler(config.precision, run.device)
        self.timer = QuantizerTimer(self.model.quantizer, run.device)
        self._indices = None  # the last step's codes, for the codebook usage of the global batch

    @property
    def clocks(self) -> dict[str, Callable[[], float]]:
        return {"quantizer": lambda: self.timer.seconds}

    def batches(self, start: int) -> Iterator[torch.Tensor]:
        """(B, 3, H, W) float32 model inputs on the run's device: this process's share of each batch."""
        share = self.config.batch_size // self.run.ranks.world
        rank = self.run.ranks.rank
        loader = iter(
            batch_loader(
                self.dataset,
                start,
                self.config.steps,
                self.config.batch_size,
                self.workers,
                pin_memory=self.run.device.type == "cuda",
                items=range(rank * share, (rank + 1) * share),
            )
        )  # starts its processes now
        return (self._model_input(*batch) for batch in loader)

    def _model_input(self, images: torch.Tensor | None, error: SettingError | None) -> torch.Tensor:
        if error is not None:
            raise error
        return to_model_input(images.to(self.run.device, non_blocking=True))

    def step(self, step: int, x: torch.Tensor) -> dict[str, float]:
        logs, self._indices, reconstruction = train_step(
            self.model, self.optimizers, x, step, self.perceptual, precision=self.config.precision, scaler=self.scaler
        )
        logs["psnr"] = batch_psnr(x, reconstruction)
        return logs

    def agree(self, logs: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """The logs averaged over the processes, plus ``usage``: the fraction of codes used in the
        global batch."""
        logs, logs["usage"], stopping = distributed.agree(
            self.run.ranks, logs, self._indices, self.model.codebook_size, stop
        )
        return logs, stopping

    def evaluate(self, step: int | None) -> tuple[dict[str, float], tuple]:
        """``eval_entries`` of `fastvq.app.evaluation.evaluate` over the held-out crops, and its
        whole result; during training (``step``) also a grid of inputs and reconstructions in
        samples/step_NNNNNNN.png and TensorBoard."""
        device = self.run.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = evaluate(self.model, self.eval_set, self.config.batch_size, device)
        self.model.train()
        metrics, inputs, recons, _ = result
        if step is not None and self.run.ranks.main:
            (self.run.out / "samples").mkdir(parents=True, exist_ok=True)
            grid = report.save_grid(
                inputs,
                recons,
                self.run.out / "samples" / f"step_{step:07d}.png",
                title=f"step {step}: held-out PSNR {metrics['psnr']:.2f} dB",
            )
            self.run.log.images(step, {"reconstructions": grid})
        return eval_entries(metrics), result

    def finish(
        self, evaluation: tuple, history: dict[str, list[float]], timing: dict[str, Any], logged: bool
    ) -> dict[str, Any]:
        """reconstructions.png, loss.png, codebook_usage.png; the metrics with the quantizer's share
        of the step time."""
        self.timer.close()
        eval_metrics, inputs, recons, _ = evaluation
        share = timing["quantizer_s"] / timing["step_s"] if timing["step_s"] else None
        config = self.config
        metrics = {
            "kind": self.model.kind,
            "quantizer": config.quantizer,
            "step": config.steps,
            "config": config.to_dict(),
            "eval": eval_metrics,
            "train": {k: history[k][-1] for k in ("loss", "psnr", "usage") if history.get(k)},
            "timing": {**timing, "workers": self.workers, "quantizer_share": share},
            "history": history,
        }
        if self.run.ranks.main:
            grid = report.save_grid(inputs, recons, self.run.out / "reconstructions.png")
            report.plot_curves(history, self.run.out)
            if not logged:
                self.run.log.images(config.steps, {"reconstructions": grid})
        return metrics
