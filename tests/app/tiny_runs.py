"""Tiny trained runs shared by the app tests (session fixtures; import the fixture names): a VQ-VAE
whose 16-pixel crops become 1x1 latents (factor 16), and a prior and a diffusion model over it."""

import json

import numpy as np
import pytest
from PIL import Image

from fastvq.app.cli import main

TOKENIZER_ARGS = ["--device", "cpu", "--image-size", 16, "--batch-size", 4, "--num-eval", 2, "--steps", 2,
                  "--set", "channels=8", "--set", "res_channels=4", "--set", "num_res_blocks=1",
                  "--set", "downsample=16", "--codebook-dim", 2, "--codebook-size", 8, "--threads", 1,
                  "--workers", 0, "--no-progress"]
GENERATOR_ARGS = {"prior": ["--set", "dim=16", "--set", "depth=1", "--set", "heads=2"],
                  "diffusion": ["--set", "width=8", "--set", "steps=20"]}


def run(capsys, *argv):
    """(exit code, stdout + stderr) of the fastvq command run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def write_images(folder, count=6, height=24, width=20, seed=0):
    """``count`` PNG images of flat 4x4-pixel colour blocks in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.integers(0, 256, ((height + 3) // 4, (width + 3) // 4, 3), dtype=np.uint8)
        Image.fromarray(np.ascontiguousarray(low.repeat(4, 0).repeat(4, 1)[:height, :width])).save(folder / f"{i}.png")
    return folder


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
    _train(["train", "--model", kind, "--tokenizer", tokenizer_run, "--out", out, "--steps", 2, "--batch-size", 4,
            "--num-eval", 1, "--threads", 1, "--no-progress", *GENERATOR_ARGS[kind]])
    assert json.loads((out / "metrics.json").read_text())["data"]["target_shape"][-2:] == [1, 1]
    return out


@pytest.fixture(scope="session")
def prior_run(tmp_path_factory, tokenizer_run):
    return _generator_run(tmp_path_factory, tokenizer_run, "prior")


@pytest.fixture(scope="session")
def diffusion_run(tmp_path_factory, tokenizer_run):
    return _generator_run(tmp_path_factory, tokenizer_run, "diffusion")
