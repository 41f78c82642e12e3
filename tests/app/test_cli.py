"""The ``fastvq`` command run in-process on tiny settings: its outputs, help, errors named by flag,
encode / decode / eval, the taming quantizer and the demo preset."""

import argparse
import inspect
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from tiny_runs import TINY, folder, run, train_tiny  # noqa: F401 (folder: a fixture)

import fastvq
from fastvq.app import checkpoint
from fastvq.app.cli import build_parser, main
from fastvq.app.config import make_config
from fastvq.app.data import (
    load_images,
    split_images,
)
from fastvq.app.device import default_threads
from fastvq.app.errors import SettingError
from fastvq.app.evaluation import evaluate, reconstruct
from fastvq.app.metrics import codebook_stats, psnr, ssim
from fastvq.app.state import CHECKPOINT, load_model
from fastvq.models import VQGAN, VQVAE

REPO = Path(__file__).resolve().parents[2]


VQT = "vector-quantize-pytorch"


pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert (
        "number of training steps (default: 10000 (vqvae, vqgan, prior, diffusion); 2000 (vqvae demo, prior demo);"
    ) in text
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


def test_encode_decode_round_trip_independent_of_batch_size(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    ckpt = out / CHECKPOINT
    for bs in (1, 4):
        code, text = run(
            capsys, "encode", "--ckpt", ckpt, "--data", folder, "--out", tmp_path / f"codes{bs}", "--batch-size", bs
        )
        assert code == 0, text
    one, four = (np.load(tmp_path / f"codes{bs}" / "indices.npy") for bs in (1, 4))
    assert one.shape == (6, 6, 5) and one.dtype == np.uint8 and np.array_equal(one, four)
    manifest = json.loads((tmp_path / "codes4" / "manifest.json").read_text())
    assert manifest["images"] == [f"img{i}.png" for i in range(6)]
    assert manifest["kind"] == "vqvae" and manifest["codebook_size"] == 32

    code, text = run(
        capsys,
        "decode",
        "--ckpt",
        ckpt,
        "--indices",
        tmp_path / "codes4",
        "--out",
        tmp_path / "decoded",
        "--batch-size",
        4,
    )
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
    code, text = run(capsys, "decode", "--ckpt", ckpt, "--indices", tmp_path / "codes4", "--out", tmp_path / "x")
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
    code, text = run(
        capsys,
        "eval",
        "--ckpt",
        out / CHECKPOINT,
        "--data",
        folder,
        "--batch-size",
        4,
        "--inception-weights",
        tmp_path / "inception.pt",
        "--out",
        tmp_path / "ev",
    )
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
    code, text = run(
        capsys,
        "eval",
        "--ckpt",
        out / CHECKPOINT,
        "--data",
        folder / "img0.png",
        "--inception-weights",
        tmp_path / "inception.pt",
    )
    assert code == 2 and "rFID needs at least 2 images (a covariance of features), got 1" in text
    assert (tmp_path / "ev" / "reconstructions.png").exists()
    assert (tmp_path / "ev" / "codebook_usage.png").exists()
    (tmp_path / "bad.pt").write_bytes(b"junk")
    code, text = run(
        capsys, "eval", "--ckpt", out / CHECKPOINT, "--data", folder, "--inception-weights", tmp_path / "bad.pt"
    )
    assert code == 2 and "not a TorchScript Inception model" in text


def test_vqgan_with_taming_quantizer(capsys, folder, tmp_path):
    out = tmp_path / "gan"
    code, text = run(
        capsys,
        "train",
        "--model",
        "vqgan",
        "--quantizer",
        "taming",
        "--data",
        folder,
        "--out",
        out,
        "--steps",
        4,
        "--image-size",
        16,
        "--batch-size",
        2,
        "--num-eval",
        2,
        "--set",
        "channels=8",
        "--set",
        "ch_mult=[1,2,2]",
        "--set",
        "num_res_blocks=1",
        "--set",
        "z_channels=8",
        "--set",
        "norm_groups=4",
        "--set",
        "disc_channels=8",
        "--set",
        "disc_layers=2",
        "--set",
        "disc_start=2",
        "--codebook-dim",
        "8",
        "--codebook-size",
        "16",
        "--no-progress",
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
    code, text = run(
        capsys,
        "train",
        "--preset",
        "demo",
        "--device",
        "cpu",
        "--steps",
        2,
        "--num-eval",
        4,
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["data"] == "builtin" and metrics["eval"]["num_images"] == 4
    code, text = run(capsys, "eval", "--ckpt", out / CHECKPOINT, "--num-eval", 4, "--out", out / "ev")
    assert code == 0 and json.loads((out / "ev" / "metrics.json").read_text())["psnr"] == pytest.approx(
        metrics["eval"]["psnr"]
    )


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
    assert sorted(p.name for p in decoded.iterdir()) == sorted(
        ["escaped.png", "other.png", "absolute.png", "name.png", "b.png", "c.png"]
    )
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
