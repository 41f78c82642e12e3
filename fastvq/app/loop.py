"""The one training loop of ``fastvq train``, for every model it trains (tokenizers, priors,
diffusion): settings checks, the run-folder lock, resume, Ctrl-C and SIGTERM, progress, checkpoint
and evaluation cadence, history, timing, TensorBoard and metrics.json.

What differs between models is a `TrainingTask`: its data and model, its step, its evaluation and
its metrics (`fastvq.app.training.TokenizerTraining`, `fastvq.app.generation.GeneratorTraining`).
`run` drives one through a whole run:

1. check the settings (counts >= 1, then the task's own checks); join torchrun's process group;
2. lock the run folder (process 0), refuse one that holds a checkpoint unless resuming, read the
   checkpoint's step (a finished run returns its metrics.json and rewrites nothing);
3. build the task, restore the checkpoint into its model, optimizers, loss scaler and RNG;
4. step from the checkpoint's step to ``steps``: evaluate every ``eval_every`` steps, checkpoint
   every ``ckpt_every`` steps, at the end and when asked to stop (then raise `TrainingInterrupted`);
5. evaluate the final model (reusing the last step's evaluation when it had one), let the task
   write its outputs, and write metrics.json once, last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, report
from .config import RunConfig, check_run_config
from .device import now, peak_memory_mib, resolve_device, torch_threads
from .errors import SettingError
from .progress import Progress
from .runlock import RunFolderLock
from .runlog import RunLog, tensorboard_enabled
from .state import CHECKPOINT, read_checkpoint, restore_training_state, save_training_state


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
            then = (
                "torchrun stops the run after its --shutdown-timeout"
                if self.forwarded
                else "send it again to stop at once"
            )
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


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Where a run writes and runs: its folder, device, place in a torchrun launch, whether this
    process shows progress, and its TensorBoard log (a no-op off process 0 or without TensorBoard)."""

    out: Path
    device: torch.device
    ranks: distributed.Ranks
    progress: bool
    log: RunLog


class TrainingTask:
    """What one kind of training adds to the loop of `run`. The constructor builds the data, the
    model, its optimizers (and loss scaler) and the config to record, from torch's RNG as
    ``config.seed`` leaves it; the loop restores a checkpoint into them. Only process 0 writes
    files (``run.ranks.main``)."""

    description = "train"
    """The progress line's label."""
    shown: dict[str, str] = {"loss": ".4f"}
    """Logged values shown on the progress line, and their formats."""

    model: nn.Module  # with ``kind`` and ``config``, as `save_training_state` records them
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None = None
    config: RunConfig  # as the checkpoint and metrics.json record it

    @classmethod
    def check(cls, config: RunConfig) -> None:
        """Raise SettingError for a setting this kind cannot use, before any work."""

    def __init__(self, config: RunConfig, run: RunContext):
        raise NotImplementedError

    @property
    def clocks(self) -> dict[str, Callable[[], float]]:
        """Cumulative seconds of parts of a step (e.g. the quantizer's), timed like the step."""
        return {}

    def batches(self, start: int) -> Iterator[Any]:
        """The batches of steps ``start`` .. ``config.steps - 1``, in order. Called before the loop
        takes over SIGINT and SIGTERM, so data-loading processes started here keep their own."""
        raise NotImplementedError

    def step(self, step: int, batch: Any) -> dict[str, float]:
        """One optimisation step (0-based ``step``) on ``batch``; its logged values in this process."""
        raise NotImplementedError

    def agree(self, logs: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """(the step's logs, whether to stop) as every process of the run agrees on them; ``stop``:
        whether this one was asked to."""
        return logs, stop

    def evaluate(self, step: int | None) -> tuple[dict[str, float], Any]:
        """(history entries, what `finish` needs) of a held-out evaluation of the current model, at
        ``step`` during training (the task may write its own outputs for it), or None at the end.
        Leaves torch's RNG and the model's training mode as they were."""
        raise NotImplementedError

    def finish(
        self, evaluation: Any, history: dict[str, list[float]], timing: dict[str, Any], logged: bool
    ) -> dict[str, Any]:
        """Write the task's final outputs (process 0) and return the run's metrics (metrics.json).
        ``evaluation``: `evaluate`'s of the final model; ``logged``: whether the last step's
        evaluation gave it (its entries are then in ``history`` and TensorBoard already)."""
        raise NotImplementedError


def check_settings(config: RunConfig, task_type: type[TrainingTask]) -> None:
    """Raise SettingError naming the first unusable setting: a setting of the wrong type or out of
    range for a training run (`fastvq.app.config.check_run_config`), then the task's own checks."""
    check_run_config(config, training=True)
    task_type.check(config)


def run(
    task_type: type[TrainingTask],
    config: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool | None = None,
) -> dict[str, Any]:
    """Train a ``task_type`` per ``config`` into run folder ``out_dir``, or continue the checkpoint
    there (``resume``), as the module's docstring says; returns the metrics dict. ``tensorboard``:
    event files in out_dir/tensorboard/ (None: if the package is installed)."""
    out = Path(out_dir)
    check_settings(config, task_type)
    device = resolve_device(config.device)
    ranks = distributed.start(device)
    try:
        if ranks.world > 1 and device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        if config.batch_size % ranks.world:
            raise SettingError(
                "{batch_size} {value} (the global batch) must be a multiple of the {world} processes",
                value=config.batch_size,
                world=ranks.world,
            )
        tensorboard = tensorboard_enabled(tensorboard, announce=ranks.main)
        with contextlib.ExitStack() as scope:
            if ranks.main:  # the others write nothing
                scope.enter_context(RunFolderLock(out))
            start = resume_point(out, config, ranks.world, resume)
            if start is None:
                return json.loads((out / "metrics.json").read_text())  # finished: nothing to train or rewrite
            with torch_threads(config.threads, device) as threads:
                config = dataclasses.replace(config, threads=threads, world_size=ranks.world)  # a resume uses them
                log = scope.enter_context(
                    RunLog(
                        out / "tensorboard" if tensorboard and ranks.main else None,
                        continues_at=start + 1 if start else None,
                    )
                )
                context = RunContext(out, device, ranks, progress and ranks.main, log)
                return _train(task_type(config, context), config, context, start)
    finally:
        distributed.stop(ranks)


def resume_point(out: Path, config: RunConfig, world: int, resume: bool) -> int | None:
    """The step to start from: 0 for a new run, the checkpoint's step on ``resume``; None when the
    run there is finished (its checkpoint at ``config.steps`` and its metrics.json written).
    Raises SettingError for a new run into a folder with a checkpoint, or a resume with another
    number of processes or fewer steps than the checkpoint's."""
    ckpt_path = out / CHECKPOINT
    if not resume:
        if ckpt_path.exists():
            raise SettingError(
                "{out_dir} {out} already holds {checkpoint}; set {resume} to continue it or choose another {out_dir}",
                out=out,
                checkpoint=CHECKPOINT,
            )
        return 0
    _, meta = read_checkpoint(ckpt_path, config.model)
    trained_on = meta["config"].get("world_size", 1)
    if trained_on != world:
        raise SettingError(
            "{out_dir} {out} was trained by {trained_on} processes, this run has {world}; resume "
            "with the same number (torchrun --nproc-per-node {trained_on})",
            out=out,
            trained_on=trained_on,
            world=world,
        )
    start = meta["step"]
    if start > config.steps:
        raise SettingError("{steps} {value} is below the checkpoint's step {start}", value=config.steps, start=start)
    if start == config.steps and (out / "metrics.json").is_file():
        return None
    return start


def _train(task: TrainingTask, config: RunConfig, run: RunContext, start: int) -> dict[str, Any]:
    """Restore ``task`` from the checkpoint's step ``start`` (if any), train it to ``config.steps``
    and finish the run."""
    history: dict[str, list[float]] = {}
    if start:
        start, history = restore_training_state(run.out / CHECKPOINT, task.model, task.optimizers, task.scaler)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    task.model.train()
    times = StepTimes(run.device, task.clocks)
    last_evaluation = _steps(task, config, run, start, history, times)
    logged = last_evaluation is not None
    if not logged:
        entries, last_evaluation = task.evaluate(None)
        run.log.scalars(config.steps, entries)
    timing = {
        "device": str(run.device),
        "threads": config.threads,
        **times.summary(),
        "peak_memory_mib": peak_memory_mib(run.device),
    }
    metrics = task.finish(last_evaluation, history, timing, logged)
    if run.ranks.main:
        report.write_json(run.out / "metrics.json", metrics)  # last: it marks the run finished
    distributed.barrier(run.ranks)
    return metrics


def _steps(
    task: TrainingTask,
    config: RunConfig,
    run: RunContext,
    start: int,
    history: dict[str, list[float]],
    times: StepTimes,
) -> Any | None:
    """Steps ``start`` .. ``config.steps - 1`` with their evaluations, history, logs and
    checkpoints; returns the evaluation of the last step, when it had one. Raises
    `TrainingInterrupted` after checkpointing a step during which a stop was requested."""
    ckpt_path = run.out / CHECKPOINT
    batches = task.batches(start)
    last_evaluation = None
    with StopRequest(forwarded=distributed.launched_by_torchrun(), announce=run.ranks.main) as stop:
        distributed.barrier(run.ranks)  # every process handles Ctrl-C before the progress line says the loop started
        bar = Progress(
            range(start, config.steps),
            total=config.steps,
            desc=task.description,
            unit="step",
            initial=start,
            enabled=run.progress,
        )
        for step in bar:
            logs = times.measure(task.step, step, next(batches))
            logs, stopping = task.agree(logs, stop.requested)
            done = step + 1 == config.steps
            if config.eval_every and (step + 1) % config.eval_every == 0:
                entries, evaluation = task.evaluate(step + 1)
                logs.update(entries)
                last_evaluation = evaluation if done else None  # the model does not change after the last step
            append_history(history, {"step": step + 1, **logs}, step)
            run.log.scalars(step + 1, logs)
            if (step + 1) % config.log_every == 0 or done:
                bar.set_postfix(**{key: format(logs[key], spec) for key, spec in task.shown.items()})
            if run.ranks.main and ((step + 1) % config.ckpt_every == 0 or done or stopping):
                save_training_state(ckpt_path, task.model, task.optimizers, step + 1, history, task.config, task.scaler)
            if stopping and not done:
                bar.close()
                distributed.barrier(run.ranks)  # torchrun ends the others when one exits: not before the save
                raise TrainingInterrupted(step + 1, ckpt_path, stop.signum)
    bar.close()
    return last_evaluation


class StepTimes:
    """Wall-clock seconds of each step on ``device`` (CUDA synchronised), and of the parts of it
    that ``clocks`` (cumulative-seconds counters) measure."""

    def __init__(self, device: torch.device, clocks: dict[str, Callable[[], float]]):
        self.device, self.clocks = device, clocks
        self.seconds: list[float] = []
        self.parts: dict[str, list[float]] = {name: [] for name in clocks}

    def measure(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)``, timed as one step."""
        before = {name: clock() for name, clock in self.clocks.items()}
        start = now(self.device)
        result = function(*args)
        self.seconds.append(now(self.device) - start)
        for name, clock in self.clocks.items():
            self.parts[name].append(clock() - before[name])
        return result

    def summary(self) -> dict[str, Any]:
        """steps_timed, steps_per_s, step_s and NAME_s per clock, over the steps measured but the
        first (warm-up: allocations, autotuning, lazy initialisation) when there are more."""
        timed = slice(1, None) if len(self.seconds) > 1 else slice(None)
        total = sum(self.seconds[timed])
        count = len(self.seconds[timed])
        return {
            "steps_timed": count,
            "steps_per_s": count / total if total else None,
            "step_s": total,
            **{f"{name}_s": sum(values[timed]) for name, values in self.parts.items()},
        }
