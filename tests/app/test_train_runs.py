"""Training runs through the command: exact resume, Ctrl-C and SIGTERM checkpoints, one run per
folder, torchrun, TensorBoard, progress output, periodic evaluation, mixed precision, memory."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_sigint, needs_vqp
from PIL import Image
from tiny_runs import TINY, folder, run, train_tiny  # noqa: F401 (folder: a fixture)

from fastvq.app import checkpoint, loop, runlog, training
from fastvq.app.config import make_config
from fastvq.app.progress import Progress
from fastvq.app.runlock import LOCK_FILE
from fastvq.app.state import CHECKPOINT
from fastvq.app.step import make_optimizers, train_step
from fastvq.models import VQVAE

REPO = Path(__file__).resolve().parents[2]


VQT = "vector-quantize-pytorch"


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_resumed_exactly(resumed, full, out, full_out):
    """A resumed 60-step run (metrics ``resumed``, folder ``out``) equals the uninterrupted one
    (``full``, ``full_out``) bit for bit: every step's losses, the weights and the optimizer states."""
    assert resumed["history"]["step"] == list(range(1, 61))
    for key in ("loss", "rec_loss", "vq_loss", "psnr", "usage"):
        assert resumed["history"][key] == full["history"][key], key  # bitwise
    a, _ = checkpoint.load(full_out / CHECKPOINT)
    b, _ = checkpoint.load(out / CHECKPOINT)
    for key in a:
        if key.startswith(("model.", "optim")):
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("quantizer", ["fastvq", pytest.param(VQT, marks=needs_vqp)])
def test_resume_after_interrupt_reproduces_losses_exactly(capsys, folder, tmp_path, monkeypatch, quantizer):
    """fastvq's layer with k-means init and dead-code replacement draws from torch's RNG at every
    step, so its bitwise check also proves that --resume restores the RNG."""
    extra = (
        ("--quantizer", VQT)
        if quantizer == VQT
        else ("--set", "kmeans_init=true", "--set", "threshold_ema_dead_code=2")
    )
    full = train_tiny(capsys, folder, tmp_path / "full", *extra)

    real_step = training.train_step

    def interrupted(model, optimizers, x, step, perceptual=None, **precision):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(model, optimizers, x, step, perceptual, **precision)

    monkeypatch.setattr(training, "train_step", interrupted)
    out = tmp_path / "resumed"
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, "--ckpt-every", 3, *TINY, *extra)
    assert code == 130 and "--resume" in text
    assert checkpoint.load(out / CHECKPOINT)[1]["step"] == 3  # lost only steps 4 and 5
    monkeypatch.setattr(training, "train_step", real_step)
    code, text = run(
        capsys, "train", "--data", folder, "--out", out, "--steps", 6, "--ckpt-every", 3, *TINY, *extra, "--resume"
    )
    assert code == 0, text
    resumed = json.loads((out / "metrics.json").read_text())
    for key in ("loss", "rec_loss", "vq_loss", "psnr", "usage"):
        assert resumed["history"][key] == full["history"][key], key  # bitwise
    a, _ = checkpoint.load(tmp_path / "full" / CHECKPOINT)
    b, _ = checkpoint.load(out / CHECKPOINT)
    for key in a:
        if key.startswith(("model.", "optim")):
            assert torch.equal(a[key], b[key]), key


def test_ctrl_c_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(capsys, folder, tmp_path):
    """A real SIGINT to a training process: it finishes its step, checkpoints it (--ckpt-every is
    beyond the run, so no other checkpoint exists) and exits 130; --resume then reproduces the
    uninterrupted run bit for bit. Resuming the finished run again rewrites nothing."""
    argv = [
        "train",
        "--data",
        folder,
        "--steps",
        60,
        "--ckpt-every",
        1000,
        "--set",
        "kmeans_init=true",
        "--set",
        "threshold_ema_dead_code=2",
        *TINY,
    ]
    code, text = run(capsys, *argv, "--out", tmp_path / "full")
    assert code == 0, text
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # 2 data-loading workers here, none in the other runs: the batches do not depend on them
    command = [sys.executable, "-m", "fastvq", *map(str, argv), "--out", str(out), "--workers", "2"]
    command.remove("--no-progress")  # the progress line says that the loop has started
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint
    )
    for line in child.stderr:
        if line.startswith("train: "):
            child.send_signal(signal.SIGINT)
            break
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stdout + stderr
    step = checkpoint.load(out / CHECKPOINT)[1]["step"]
    assert 1 <= step < 60 and f"interrupted after step {step}, saved in {out / CHECKPOINT}" in stderr
    assert "--resume" in stderr and not (out / "metrics.json").exists()

    code, text = run(capsys, *argv, "--out", out, "--resume")
    assert code == 0, text
    resumed = json.loads((out / "metrics.json").read_text())
    assert_resumed_exactly(resumed, full, out, tmp_path / "full")

    written = (out / "metrics.json").read_bytes()
    assert resumed["timing"]["steps_per_s"] > 0
    code, text = run(capsys, *argv, "--out", out, "--resume")
    assert code == 0 and "finished at step 60: nothing trained" in text
    assert (out / "metrics.json").read_bytes() == written


def test_sigterm_checkpoints_the_step(folder, tmp_path):
    """SIGTERM to the training process (`kill PID`, Kubernetes, torchrun): it finishes its step,
    checkpoints it and exits 143; its data-loading processes are shut down as on any exit."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fastvq",
        "train",
        "--data",
        str(folder),
        "--steps",
        "500",
        "--ckpt-every",
        "1000",
        "--workers",
        "2",
        "--out",
        str(out),
        *map(str, TINY),
    ]
    command.remove("--no-progress")  # the progress line says that the loop has started
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    for line in child.stderr:
        if line.startswith("train: "):
            child.send_signal(signal.SIGTERM)
            break
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, stdout + stderr
    step = checkpoint.load(out / CHECKPOINT)[1]["step"]
    assert 1 <= step < 500 and "SIGTERM: saving a checkpoint after this step" in stderr
    assert f"interrupted after step {step}, saved in {out / CHECKPOINT}" in stderr and "Traceback" not in stderr


def test_a_second_run_into_the_same_out_fails_at_once_and_the_first_one_keeps_its_outputs(capsys, folder, tmp_path):
    """Two runs into one --out: the second fails at once, naming --out and the first run's process,
    with or without --resume, before or after the first has checkpointed; the first one goes on.
    Without the run-folder lock both trained and exited 0, and the first one's outputs were lost."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "fastvq",
        "train",
        "--data",
        str(folder),
        "--steps",
        "500",
        "--ckpt-every",
        "2",
        "--out",
        str(out),
        *map(str, TINY),
    ]
    command.remove("--no-progress")  # the progress line says that the loop has started
    first = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    for line in first.stderr:
        if line.startswith("train: "):
            break
    busy = f"--out {out}: another run (process {first.pid}) is writing there"
    for checkpointed in (False, True):
        while checkpointed and not (out / CHECKPOINT).exists() and first.poll() is None:
            time.sleep(0.1)
        for extra in ([], ["--resume"]):
            code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, *TINY, *extra)
            assert code == 2 and busy in text and "choose another --out" in text, text
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, stdout + stderr
    meta = checkpoint.load(out / CHECKPOINT)[1]
    assert meta["config"]["steps"] == 500 and not (out / "metrics.json").exists()  # the first run's alone
    assert not (out / LOCK_FILE).exists()
    code, text = run(capsys, "train", "--out", out, "--resume", "--steps", meta["step"] + 1, "--no-progress")
    assert code == 0, text  # the lock ended with its process


def test_rerunning_a_finished_run_reports_it_or_offers_resume_and_another_out(capsys, folder, tmp_path):
    out = tmp_path / "run"
    metrics = train_tiny(capsys, folder, out)
    written = (out / "metrics.json").read_bytes()
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, "--ckpt-every", 3, *TINY)
    assert code == 0 and "already holds this run, finished at step 6: nothing trained" in text
    assert f"held-out PSNR {metrics['eval']['psnr']:.2f} dB" in text and (out / "metrics.json").read_bytes() == written
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, *TINY, "--lr", "1e-3")
    assert code == 2 and "already holds a vqvae run with other settings (finished)" in text
    assert "add --resume to continue it, or choose another --out" in text


# Runs the command in argv[1:] and prints its peak RSS in KiB (with the children it waited for) last.
PEAK_RSS = (
    "import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:]); "
    "_, status, usage = os.wait4(child.pid, 0); print(usage.ru_maxrss); "
    "sys.exit(os.waitstatus_to_exitcode(status))"
)


@pytest.mark.slow
def test_training_encoding_and_eval_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS of training on, encoding and evaluating 300 and 3000 images of 96x96 (3000 read at once: 83 MB).
    Each command is started by a small Python process that reports its peak: a process started by
    pytest itself inherits pytest's peak RSS (Linux keeps the peak of the image it was forked from),
    which would hide the command's. On the plain-PyTorch backend, so that no build of the C++ CPU
    kernels (a compiler of 1.1 GB, counted as a waited-for child) lands in a measured command. The
    same command's peak varies by up to 30 MiB on a busy machine (mapped library pages come and go),
    hence ``noise``; holding the 3000 images would add 75 MiB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTVQ_BACKEND": "torch"}
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, 96, 96, 3), dtype=np.uint8)
    for count in (300, 3000):
        for i in range(count):
            path = tmp_path / f"n{count}" / f"class{i % 10}" / f"sub{i % 3}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(tiles[i % 16]).save(path, quality=50)

    def peak_rss(command, count, *argv):  # MiB
        argv = [
            sys.executable,
            "-m",
            "fastvq",
            command,
            "--data",
            str(tmp_path / f"n{count}"),
            "--out",
            str(tmp_path / f"{command}{count}"),
            *map(str, argv),
        ]
        result = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1]) / 1024

    noise = 40
    small, large = (peak_rss("train", count, "--steps", 3, *TINY) for count in (300, 3000))
    assert large - small < noise, (small, large)
    use = ("--ckpt", tmp_path / "train300", "--batch-size", 64, "--device", "cpu", "--threads", 1, "--no-progress")
    small, large = (peak_rss("encode", count, *use) for count in (300, 3000))  # reads batch by batch
    assert np.load(tmp_path / "encode3000" / "indices.npy").shape == (3000, 24, 24)
    indices_mib = 2 * 2700 * 24 * 24 * 8 / 2**20  # the int64 codes it returns (and their concatenation)
    assert large - small < noise + indices_mib, (small, large)
    small, large = (peak_rss("eval", count, *use) for count in (300, 3000))  # keeps two numbers per image
    assert json.loads((tmp_path / "eval3000" / "metrics.json").read_text())["num_images"] == 3000
    assert large - small < noise, (small, large)  # holding the images and reconstructions would add 150 MiB


def test_progress_is_a_bar_on_a_terminal_and_a_few_lines_in_a_log():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, terminal = io.StringIO(), Terminal()
    for stream, interval in ((log, 30.0), (terminal, 30.0)):
        bar = Progress(range(1000), total=1000, desc="encode", unit="batch", stream=stream, interval=interval)
        assert sum(1 for _ in bar) == 1000
        bar.set_postfix(loss="0.5")
        bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("encode: 0/1000 (") and lines[1].startswith("encode: 1000/1000 (")
    assert lines[1].endswith(", loss 0.5") and "\r" not in log.getvalue()
    assert "\r" in terminal.getvalue() and "1000/1000" in terminal.getvalue()  # tqdm redraws one line
    chatty = io.StringIO()
    with Progress(range(5), total=5, desc="decode", stream=chatty, interval=0.0) as bar:
        list(bar)
    assert len(chatty.getvalue().splitlines()) == 6  # start + one per item, no repeated final line
    silent = io.StringIO()
    with Progress(range(5), total=5, desc="decode", stream=silent, enabled=False) as bar:
        list(bar)
    assert silent.getvalue() == ""


def test_periodic_eval_writes_grids_and_history_without_changing_training(capsys, folder, tmp_path, monkeypatch):
    plain = train_tiny(capsys, folder, tmp_path / "plain")
    out = tmp_path / "evals"
    evaluations = []
    real_evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: evaluations.append(1) or real_evaluate(*a, **k))
    metrics = train_tiny(capsys, folder, out, "--eval-every", 3)
    assert len(evaluations) == 2  # steps 3 and 6: the end of the run reuses step 6's
    history = metrics["history"]
    assert history["eval_psnr"][:2] == [None, None] and history["eval_psnr"][3:5] == [None, None]
    assert history["eval_psnr"][5] == metrics["eval"]["psnr"]  # the same model and held-out crops
    assert 5 < history["eval_psnr"][2] < 60 and 0 < history["eval_usage"][2] <= 1
    for key in ("loss", "rec_loss", "vq_loss", "psnr", "usage"):
        assert history[key] == plain["history"][key], key  # evaluating changes nothing in training
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step_0000003.png", "step_0000006.png"]
    assert Image.open(out / "samples" / grids[0]).size[0] > 120 + 4 * 16 * 6
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "x", *TINY, "--eval-every", 0)
    assert code == 2 and "--eval-every must be an int >= 1, got 0" in text

    code, text = run(capsys, "encode", "--ckpt", out, "--data", folder, "--out", tmp_path / "c", "--batch-size", 4)
    assert code == 0, text
    lines = [line for line in text.splitlines() if line.startswith("encode: ")]
    assert len(lines) == 2 and lines[0].startswith("encode: 0/2 (") and lines[1].startswith("encode: 2/2 (")


def test_tensorboard_event_files_hold_every_step_once_across_an_interrupted_resume(
    capsys, folder, tmp_path, monkeypatch
):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="TensorBoard logging needs the tensorboard package",
    )
    full = train_tiny(capsys, folder, tmp_path / "full", "--eval-every", 3)["history"]
    real_step = training.train_step

    def interrupted(model, optimizers, x, step, perceptual=None, **precision):
        if step == 4:  # steps 1-4 logged, the checkpoint holds step 3
            raise KeyboardInterrupt
        return real_step(model, optimizers, x, step, perceptual, **precision)

    monkeypatch.setattr(training, "train_step", interrupted)
    out = tmp_path / "resumed"
    code, text = run(
        capsys, "train", "--data", folder, "--out", out, "--steps", 6, "--ckpt-every", 3, *TINY, "--eval-every", 3
    )
    assert code == 130, text
    monkeypatch.setattr(training, "train_step", real_step)
    code, text = run(
        capsys,
        "train",
        "--data",
        folder,
        "--out",
        out,
        "--steps",
        6,
        "--ckpt-every",
        3,
        *TINY,
        "--eval-every",
        3,
        "--resume",
    )
    assert code == 0, text
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process run

    events = accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key in ("loss", "rec_loss", "vq_loss", "psnr", "usage"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == list(range(1, 7)), key  # step 4 of the first run discarded
        assert [e.value for e in logged] == list(np.float32(full[key])), key  # stored as float32
    assert [(e.step, e.value) for e in events.Scalars("eval_psnr")] == [
        (3, np.float32(full["eval_psnr"][2])),
        (6, np.float32(full["eval_psnr"][5])),
    ]
    grids = events.Images("reconstructions")
    assert [e.step for e in grids] == [3, 6]
    assert (grids[1].width, grids[1].height) == Image.open(out / "samples" / "step_0000006.png").size


def test_training_without_tensorboard_says_once_how_to_get_it(capsys, folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(runlog, "_told", False)
    note = "note: no TensorBoard event files (pip install tensorboard"
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "a", "--steps", 2, *TINY, "--tensorboard")
    assert code == 2 and not (tmp_path / "a").exists()
    assert (
        text == "fastvq train: error: --tensorboard needs the tensorboard package, which is not installed: "
        "pip install tensorboard (or fastvq[tensorboard])\n"
    )
    for out, extra, told in (("b", ["--no-tensorboard"], False), ("c", [], True), ("d", [], False)):
        code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / out, "--steps", 2, *TINY, *extra)
        assert code == 0 and (note in text) == told, (out, text)
        assert (tmp_path / out / "metrics.json").is_file() and not (tmp_path / out / "tensorboard").exists()


def test_bf16_autocast_runs_the_model_in_bf16_and_the_quantizer_on_its_output():
    model = VQVAE(channels=16, res_channels=4, num_res_blocks=1, codebook_dim=8, codebook_size=16)
    optimizers = make_optimizers(model, make_config("vqvae", lr=1e-3))
    seen = {}
    model.quantizer.register_forward_hook(lambda m, args, out: seen.update(tokens=args[0].dtype, codes=out[0].dtype))
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, args, out: seen.update(conv=out.dtype))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    logs, indices, reconstruction = train_step(model, optimizers, x, 0, precision="bf16")
    assert seen == {"conv": torch.bfloat16, "tokens": torch.bfloat16, "codes": torch.bfloat16}
    assert reconstruction.dtype == torch.float32 and np.isfinite(logs["loss"]) and indices.shape == (4, 4, 4)
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None
    )
    train_step(model, optimizers, x, 1)
    assert seen["conv"] == torch.float32  # fp32 by default
    with pytest.raises(ValueError, match="'fp16' needs a GradScaler"):
        train_step(model, optimizers, x, 2, precision="fp16")


def test_fp16_training_resumes_exactly_with_its_loss_scale(capsys, folder, tmp_path):
    full = train_tiny(capsys, folder, tmp_path / "full", "--precision", "fp16")
    out = tmp_path / "resumed"
    train_tiny(capsys, folder, out, "--precision", "fp16", "--steps", 3)
    assert checkpoint.load(out / CHECKPOINT)[1]["scaler"]["scale"] > 0
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, *TINY, "--resume")
    assert code == 0, text
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["config"]["precision"] == "fp16"
    for key in ("loss", "rec_loss", "psnr", "usage"):
        assert resumed["history"][key] == full["history"][key], key
    assert 5 < full["eval"]["psnr"] < 60
    code, text = run(capsys, "train", "--data", folder, "--out", out, *TINY, "--resume", "--precision", "bf16")
    assert code == 2 and "precision='bf16' differs from the checkpoint's 'fp16'" in text


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_resume_exactly(capsys, folder, tmp_path):
    """gloo on CPU: 2 processes of 4 images each against 1 process of the same 8-image batches."""
    argv = ["train", "--data", folder, "--steps", 6, "--ckpt-every", 3, *TINY]
    code, text = run(capsys, *argv, "--out", tmp_path / "one")
    assert code == 0, text
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())

    def torchrun(out, *extra):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "fastvq",
            *map(str, argv),
            "--out",
            str(out),
            *map(str, extra),
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("held-out PSNR") == 1  # process 0 alone reports
        return json.loads((out / "metrics.json").read_text())

    two = torchrun(tmp_path / "two")
    assert two["config"]["world_size"] == 2
    for key in ("loss", "rec_loss", "vq_loss", "psnr"):
        np.testing.assert_allclose(two["history"][key], one["history"][key], rtol=1e-5, err_msg=key)
    assert two["history"]["usage"] == one["history"]["usage"]  # codes used in the whole global batch
    assert two["eval"]["psnr"] == pytest.approx(one["eval"]["psnr"], abs=1e-3)

    torchrun(tmp_path / "resumed", "--steps", 3)
    resumed = torchrun(tmp_path / "resumed", "--resume")
    for key in ("loss", "rec_loss", "vq_loss", "psnr", "usage"):
        assert resumed["history"][key] == two["history"][key], key  # bitwise
    code, text = run(capsys, "train", "--out", tmp_path / "two", "--resume", "--steps", 8, "--no-progress")
    assert code == 2 and "was trained by 2 processes, this run has 1" in text


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_and_resume_matches_an_uninterrupted_run(folder, tmp_path):
    """A terminal's Ctrl-C: SIGINT to the launcher and its 2 gloo workers at once, torchrun then
    forwarding a second SIGINT to each worker. The workers finish their step together, process 0
    checkpoints it, and a --resume reproduces the uninterrupted 2-process run bit for bit."""
    argv = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fastvq",
        "train",
        "--data",
        folder,
        "--steps",
        60,
        "--ckpt-every",
        1000,
        *TINY,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def torchrun(out, *extra):
        command = [sys.executable, *map(str, argv), "--out", str(out), *map(str, extra)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads((out / "metrics.json").read_text())

    full = torchrun(tmp_path / "full")
    out = tmp_path / "stopped"
    command = [sys.executable, *map(str, argv), "--out", str(out)]
    command.remove("--no-progress")  # process 0's progress line says that every process handles Ctrl-C
    launcher = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=default_sigint,
    )  # own process group, as a job
    for line in launcher.stderr:
        if line.startswith("train: "):
            os.killpg(launcher.pid, signal.SIGINT)
            break
    stdout, stderr = launcher.communicate(timeout=120)
    assert "death signal" in stderr, stdout + stderr  # torchrun forwarded it too
    step = checkpoint.load(out / CHECKPOINT)[1]["step"]
    assert 1 <= step < 60 and not (out / "metrics.json").exists(), stderr
    assert stderr.count(f"interrupted after step {step}, saved in {out / CHECKPOINT}") == 1, stderr  # process 0
    assert stderr.count("Ctrl-C: saving a checkpoint after this step") == 1, stderr

    resumed = torchrun(out, "--resume")
    assert_resumed_exactly(resumed, full, out, tmp_path / "full")


@pytest.mark.usefixtures("sigint_delivered")
def test_a_torchrun_worker_takes_every_sigint_as_one_stop_request():
    """A worker gets a terminal's SIGINT and torchrun's copy of it: neither may stop it mid-step.
    Alone, a second Ctrl-C stops at once; SIGTERM is a stop request too."""
    with loop.StopRequest(forwarded=True, announce=False) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
    with pytest.raises(KeyboardInterrupt):  # alone, a second Ctrl-C stops at once
        with loop.StopRequest(announce=False) as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    before = signal.getsignal(signal.SIGTERM)
    with loop.StopRequest(announce=False) as stop:  # SIGTERM: the same request, remembered
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
