"""What the app tests share (import the fixture names): images of flat colour blocks, the command run
in this process, the tiny settings of a tokenizer run, and tiny trained runs (session fixtures): a
VQ-VAE whose 16-pixel crops become 1x1 latents (factor 16), and a prior and a diffusion model over it."""

import json

import numpy as np
import pytest
from PIL import Image

from fastvq.app.cli import main

TOKENIZER_ARGS = [
    "--device",
    "cpu",
    "--image-size",
    16,
    "--batch-size",
    4,
    "--num-eval",
    2,
    "--steps",
    2,
    "--set",
    "channels=8",
    "--set",
    "res_channels=4",
    "--set",
    "num_res_blocks=1",
    "--set",
    "downsample=16",
    "--codebook-dim",
    2,
    "--codebook-size",
    8,
    "--threads",
    1,
    "--workers",
    0,
    "--no-progress",
]
TINY = [
    "--device",
    "cpu",
    "--image-size",
    "16",
    "--batch-size",
    "8",
    "--num-eval",
    "4",
    "--set",
    "channels=32",
    "--set",
    "res_channels=8",
    "--set",
    "num_res_blocks=1",
    "--set",
    "decay=0.8",
    "--codebook-dim",
    "8",
    "--codebook-size",
    "32",
    "--lr",
    "3e-3",
    "--threads",
    "1",
    "--workers",
    "0",
    "--no-progress",
]
"""A tokenizer run of a few seconds on 16-pixel crops (`train_tiny`)."""
GENERATOR_ARGS = {
    "prior": ["--set", "dim=16", "--set", "depth=1", "--set", "heads=2"],
    "diffusion": ["--set", "width=8", "--set", "steps=20"],
}


def run(capsys, *argv):
    """(exit code, stdout + stderr) of the fastvq command run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def smooth_images(n, h, w, seed=0):
    """(n, h, w, 3) uint8 images of flat 4x4-pixel colour blocks."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, (h + 3) // 4, (w + 3) // 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(low.repeat(4, 1).repeat(4, 2)[:, :h, :w])


def write_images(folder, count=6, height=24, width=20, seed=0):
    """``count`` PNG images of `smooth_images`, img0.png ..., in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(smooth_images(count, height, width, seed)):
        Image.fromarray(image).save(folder / f"img{i}.png")
    return folder


def train_tiny(capsys, folder, out, *extra):
    """The metrics of a 6-step `TINY` tokenizer run on ``folder`` into ``out`` (checkpoints every 3)."""
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--steps", 6, "--ckpt-every", 3, *TINY, *extra)
    assert code == 0, text
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture
def folder(tmp_path):
    """A folder of six 24 x 20 images for one test."""
    return write_images(tmp_path / "images")


def _train(argv):
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images") / "photos")


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("runs") / "tokenizer"
    _train(["train", "--data", image_folder, "--out", out, "--ckpt-every", 1, *TOKENIZER_ARGS])
    return out


def _generator_run(tmp_path_factory, tokenizer_run, kind):
    out = tmp_path_factory.mktemp("runs") / kind
    # --num-eval 1: the final evaluation is a batch of one item of 1x1 latents
    _train(
        [
            "train",
            "--model",
            kind,
            "--tokenizer",
            tokenizer_run,
            "--out",
            out,
            "--steps",
            2,
            "--batch-size",
            4,
            "--num-eval",
            1,
            "--threads",
            1,
            "--no-progress",
            *GENERATOR_ARGS[kind],
        ]
    )
    assert json.loads((out / "metrics.json").read_text())["data"]["target_shape"][-2:] == [1, 1]
    return out


@pytest.fixture(scope="session")
def prior_run(tmp_path_factory, tokenizer_run):
    return _generator_run(tmp_path_factory, tokenizer_run, "prior")


@pytest.fixture(scope="session")
def diffusion_run(tmp_path_factory, tokenizer_run):
    return _generator_run(tmp_path_factory, tokenizer_run, "diffusion")
