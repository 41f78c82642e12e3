"""The one training loop (fastvq.app.loop) driven by a toy task, and the run-folder lock
(fastvq.app.runlock). The real trainers' end-to-end behaviour through the same loop is tested in
test_cli.py (tokenizers) and test_generation.py (prior, diffusion)."""

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastvq.app import checkpoint, loop, report, runlock, state
from fastvq.app.config import RunConfig
from fastvq.app.errors import SettingError
from fastvq.app.runlock import LOCK_FILE, RunFolderLock, check_unlocked
from fastvq.app.state import CHECKPOINT, read_checkpoint

REPO = Path(__file__).resolve().parents[2]


class Weights(nn.Module):
    kind = "vqvae"  # what the checkpoint records; the loop checks it on resume
    config: dict = {}

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))


class ToyTask(loop.TrainingTask):
    """SGD with momentum pulling a 3-vector towards step + noise drawn from torch's RNG, so that
    an exact resume needs the weights, the optimizer state and the RNG restored. Records what the
    loop asks of it; ``signals[step]`` is raised during that 0-based step, ``crash_at`` raises
    RuntimeError there."""

    built: list["ToyTask"] = []
    signals: dict[int, int] = {}
    crash_at: int | None = None

    def __init__(self, config, run):
        self.config, self.run = config, run
        torch.manual_seed(config.seed)
        self.model = Weights()
        self.optimizers = [torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)]
        self.steps, self.evaluations, self.finished = [], [], None
        ToyTask.built.append(self)

    def batches(self, start):
        return (torch.full((3,), float(step)) for step in range(start, self.config.steps))

    def step(self, step, batch):
        if step == self.crash_at:
            raise RuntimeError("crash")
        self.steps.append(step)
        loss = ((self.model.weight - batch - torch.randn(3)) ** 2).sum()
        self.optimizers[0].zero_grad()
        loss.backward()
        self.optimizers[0].step()
        if step in self.signals:
            signal.raise_signal(self.signals[step])
        return {"loss": float(loss.detach())}

    def evaluate(self, step):
        self.evaluations.append(step)
        return {"eval_norm": float(self.model.weight.detach().norm())}, ("evaluation", step)

    def finish(self, evaluation, history, timing, logged):
        self.finished = evaluation, logged
        return {"step": self.config.steps, "history": history, "timing": timing, "weight": self.model.weight.tolist()}


@pytest.fixture
def toy(monkeypatch):
    """ToyTask with a clean record, and the steps at which the loop checkpointed (``toy.saved``)."""
    monkeypatch.setattr(ToyTask, "built", [])
    monkeypatch.setattr(ToyTask, "signals", {})
    monkeypatch.setattr(ToyTask, "crash_at", None)
    saved, save = [], loop.save_training_state
    monkeypatch.setattr(
        loop,
        "save_training_state",
        lambda path, model, opt, step, *a: saved.append(step) or save(path, model, opt, step, *a),
    )
    monkeypatch.setattr(ToyTask, "saved", saved, raising=False)
    # a checkpoint is read back as the header says, unchecked against a real model's description: the
    # toy's 3-vector describes no VQ-VAE (tests/app/test_checkpoint_validation.py tests those checks)
    monkeypatch.setattr(state, "_checked_header", lambda path, kind: checkpoint.read_header(path))
    return ToyTask


def config(**settings):
    return RunConfig(**{"device": "cpu", "threads": 1, "batch_size": 1, "steps": 7, "ckpt_every": 3, **settings})


def train(out, resume=False, **settings):
    return loop.run(ToyTask, config(**settings), out, resume=resume, progress=False, tensorboard=False)


def test_checkpoints_evaluations_history_and_timing_follow_their_cadence(toy, tmp_path, monkeypatch):
    written = []
    write_json = report.write_json
    monkeypatch.setattr(report, "write_json", lambda path, obj: written.append(path.name) or write_json(path, obj))
    metrics = train(tmp_path / "run", eval_every=2)
    (task,) = toy.built
    assert toy.saved == [3, 6, 7] and task.steps == list(range(7))
    assert task.evaluations == [2, 4, 6, None]  # every 2 steps, then the final model: step 7 had none
    assert task.finished == (("evaluation", None), False)
    history = metrics["history"]
    assert history["step"] == list(range(1, 8)) and all(math.isfinite(v) for v in history["loss"])
    assert [math.isnan(v) for v in history["eval_norm"]] == [True, False, True, False, True, False, True]
    assert metrics["timing"]["steps_timed"] == 6 and metrics["timing"]["step_s"] > 0  # the warm-up step left out
    assert metrics["timing"]["device"] == "cpu" and metrics["timing"]["threads"] == 1
    assert written == ["metrics.json"] and not (tmp_path / "run" / LOCK_FILE).exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 7


def test_the_last_steps_evaluation_is_the_final_one_when_eval_every_divides_steps(toy, tmp_path):
    train(tmp_path / "run", steps=6, eval_every=3)
    (task,) = toy.built
    assert task.evaluations == [3, 6] and task.finished == (("evaluation", 6), True)


def test_resume_from_a_middle_step_matches_an_uninterrupted_run_exactly(toy, tmp_path):
    full = train(tmp_path / "full", eval_every=2)
    toy.crash_at = 4
    with pytest.raises(RuntimeError, match="crash"):
        train(tmp_path / "cut", eval_every=2)
    assert read_checkpoint(tmp_path / "cut" / CHECKPOINT)[1]["step"] == 3  # steps 4 and 5 lost
    assert not (tmp_path / "cut" / "metrics.json").exists() and not (tmp_path / "cut" / LOCK_FILE).exists()
    toy.crash_at = None
    resumed = train(tmp_path / "cut", resume=True, eval_every=2)
    assert toy.built[-1].steps == [3, 4, 5, 6] and toy.built[-1].evaluations == [4, 6, None]
    same = json.dumps(resumed["history"], sort_keys=True) == json.dumps(full["history"], sort_keys=True)
    assert same  # bit for bit: NaN-aware, floats in their exact repr
    assert resumed["weight"] == full["weight"]
    a, b = (read_checkpoint(tmp_path / run / CHECKPOINT)[0] for run in ("full", "cut"))
    assert all(torch.equal(a[key], b[key]) for key in a if key.startswith(("model.", "optim", "rng.")))

    built, written = len(toy.built), (tmp_path / "cut" / "metrics.json").read_bytes()
    assert train(tmp_path / "cut", resume=True) == json.loads(written)  # finished: nothing built or rewritten
    assert len(toy.built) == built and (tmp_path / "cut" / "metrics.json").read_bytes() == written


@pytest.mark.usefixtures("sigint_delivered")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_request_mid_step_finishes_the_step_checkpoints_it_and_stops(toy, tmp_path, signum, capsys):
    toy.signals = {2: signum}
    handlers = [signal.getsignal(s) for s in loop.STOP_SIGNALS]
    with pytest.raises(loop.TrainingInterrupted) as stopped:
        train(tmp_path / "run", ckpt_every=100)
    assert (stopped.value.step, stopped.value.signum, stopped.value.path) == (3, signum, tmp_path / "run" / CHECKPOINT)
    assert toy.saved == [3] and toy.built[0].steps == [0, 1, 2] and toy.built[0].finished is None
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["step"] == 3
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / LOCK_FILE).exists()
    assert [signal.getsignal(s) for s in loop.STOP_SIGNALS] == handlers
    assert "saving a checkpoint after this step" in capsys.readouterr().err


def test_settings_and_resume_errors_come_before_any_work(toy, tmp_path):
    for settings, message in (
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"eval_every": 0}, "eval_every must be an int >= 1, got 0"),
        ({"max_images": -2}, "max_images must be an int >= 1, got -2"),
        ({"image_size": None}, "image_size is needed by model vqvae"),
        ({"ckpt_every": 2.5}, "ckpt_every must be an int, got 2.5"),
        ({"workers": -1}, "workers must be an int >= 0, got -1"),
    ):
        with pytest.raises(SettingError, match=message):
            train(tmp_path / "new", **settings)
    with pytest.raises(FileNotFoundError):
        train(tmp_path / "new", resume=True)
    assert not toy.built and not (tmp_path / "new").exists()  # a failed start leaves no folder behind

    train(tmp_path / "run")
    with pytest.raises(SettingError, match="out_dir .* already holds checkpoint.safetensors; set resume"):
        train(tmp_path / "run")
    with pytest.raises(SettingError, match="steps 5 is below the checkpoint's step 7"):
        train(tmp_path / "run", resume=True, steps=5)
    with pytest.raises(SettingError) as other_world:
        loop.resume_point(tmp_path / "run", config(), 2, resume=True)
    assert str(other_world.value) == (
        f"out_dir {tmp_path / 'run'} was trained by 1 processes, this run has 2; resume with the same number "
        "(torchrun --nproc-per-node 1)"
    )
    assert len(toy.built) == 1 and sorted(p.name for p in (tmp_path / "run").iterdir()) == [CHECKPOINT, "metrics.json"]


def test_a_run_into_a_folder_another_run_writes_to_fails_at_once(toy, tmp_path):
    out = tmp_path / "run"
    with RunFolderLock(out):
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        for attempt in (lambda: train(out), lambda: check_unlocked(out)):
            with pytest.raises(SettingError) as busy:
                attempt()
            assert str(busy.value).startswith(f"out_dir {out}: another run (process {os.getpid()}) is writing there")
            assert "which ends with that process" in str(busy.value)
    assert not toy.built and not out.exists()  # the lock made the folder, and nothing else was written
    check_unlocked(out)
    train(out)


def test_a_lock_left_by_a_killed_process_does_not_block(toy, tmp_path):
    out = tmp_path / "run"
    script = (
        "import sys, time\nfrom fastvq.app.runlock import RunFolderLock\n"
        "RunFolderLock(sys.argv[1]).__enter__()\nprint('locked', flush=True)\ntime.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(SettingError, match=f"another run \\(process {holder.pid}\\)"):
        check_unlocked(out)
    holder.kill()
    holder.wait(timeout=60)
    assert (out / LOCK_FILE).read_text().split()[0] == str(holder.pid)  # the file stays; its lock died with it
    check_unlocked(out)
    assert train(out)["step"] == 7 and not (out / LOCK_FILE).exists()


def test_a_lock_won_on_a_file_its_holder_removed_is_taken_again(tmp_path, monkeypatch):
    """A holder removes the lock file, then releases it: a process that opened the file before the
    removal and locks it after the release holds a lock on a file no one else sees. It must
    notice and take the lock of the file now there."""
    first = RunFolderLock(tmp_path).__enter__()
    locked, flock = [], fcntl.flock

    def holder_leaves_between_open_and_lock(fd, operation):
        if not locked:
            first.__exit__(None, None, None)
        locked.append(fd)
        return flock(fd, operation)

    monkeypatch.setattr(runlock.fcntl, "flock", holder_leaves_between_open_and_lock)
    with RunFolderLock(tmp_path):
        assert len(locked) == 2  # the first lock was on the removed file: taken again on the new one
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with pytest.raises(SettingError, match="another run"):
            check_unlocked(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_symlink_in_place_of_the_lock_file_is_refused_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(target)
    for attempt in (lambda: RunFolderLock(out).__enter__(), lambda: check_unlocked(out)):
        with pytest.raises(SettingError, match=f"its lock file {LOCK_FILE} is a symbolic link; remove it"):
            attempt()
    assert target.read_text() == "keep" and (out / LOCK_FILE).is_symlink()


def test_the_end_of_a_run_removes_its_own_lock_file_only(tmp_path):
    first = RunFolderLock(tmp_path).__enter__()
    (tmp_path / LOCK_FILE).unlink()  # deleted by hand while the first run holds it: a second one can start
    with RunFolderLock(tmp_path):
        first.__exit__(None, None, None)
        with pytest.raises(SettingError, match=f"another run \\(process {os.getpid()}\\)"):
            check_unlocked(tmp_path)  # the second run's lock file is still there
    assert not (tmp_path / LOCK_FILE).exists()
