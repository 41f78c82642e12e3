"""The second stage on the command line: `fastvq train --model prior|diffusion --tokenizer RUN`,
`fastvq sample` and `fastvq eval-samples`, on MNIST with a tiny tokenizer."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastvq.app import generation, sample_quality
from fastvq.app.cli import main
from fastvq.app.config import make_config
from fastvq.app.data import FileImages, class_labels, split_images
from fastvq.app.errors import SettingError
from fastvq.app.generation import Generator
from fastvq.app.runlock import RunFolderLock
from fastvq.app.state import CHECKPOINT, load, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TOKENIZER = [
    "--data",
    "mnist",
    "--steps",
    3,
    "--batch-size",
    8,
    "--image-size",
    32,
    "--num-eval",
    4,
    "--threads",
    1,
    "--no-progress",
    "--set",
    "channels=16",
    "--set",
    "res_channels=8",
    "--set",
    "num_res_blocks=1",
    "--codebook-dim",
    8,
    "--codebook-size",
    32,
]
SMALL = {
    "prior": ["--set", "dim=32", "--set", "depth=1", "--set", "heads=2"],
    "diffusion": ["--set", "width=16", "--set", "steps=100"],
}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer") / "run"
    assert main([str(a) for a in ["train", "--out", out, *TINY_TOKENIZER]]) == 0
    return out


def train_generator(capsys, kind, tokenizer, out, *extra):
    code, text = run(
        capsys,
        "train",
        "--model",
        kind,
        "--tokenizer",
        tokenizer,
        "--out",
        out,
        "--steps",
        6,
        "--ckpt-every",
        3,
        "--batch-size",
        8,
        "--max-images",
        64,
        "--num-eval",
        16,
        "--threads",
        1,
        "--no-progress",
        *SMALL[kind],
        *extra,
    )
    assert code == 0, text
    return json.loads((out / "metrics.json").read_text()), text


@pytest.mark.parametrize("kind", ["prior", "diffusion"])
def test_training_writes_outputs_and_resumes_exactly(capsys, tokenizer, tmp_path, kind, monkeypatch):
    evaluations = []
    real_eval_loss = generation.eval_loss
    monkeypatch.setattr(generation, "eval_loss", lambda *a: evaluations.append(1) or real_eval_loss(*a))
    metrics, text = train_generator(capsys, kind, tokenizer, tmp_path / "full", "--eval-every", 3)
    assert f"{kind}, step 6: held-out loss" in text
    history = metrics["history"]
    assert len(evaluations) == 2 and metrics["eval"]["loss"] == history["eval_loss"][5]  # step 6's, reused
    assert history["step"] == list(range(1, 7)) and np.isfinite(history["loss"]).all()
    assert history["eval_loss"][0] is None and np.isfinite(history["eval_loss"][2])  # NaN: null in JSON
    assert metrics["data"]["train_images"] == 64 and metrics["data"]["eval_images"] == 16
    assert metrics["data"]["classes"] == [str(d) for d in range(10)]  # mnist digits: class-conditional
    assert metrics["config"]["model_args"]["num_classes"] == 10 and metrics["config"]["data"] == "mnist"
    shape = [8, 8] if kind == "prior" else [8, 8, 8]  # 32 px / 4; diffusion adds the 8 latent channels
    assert metrics["data"]["target_shape"] == shape
    for name in ("samples.png", "loss.png", CHECKPOINT):
        assert (tmp_path / "full" / name).stat().st_size > 0
    assert Image.open(tmp_path / "full" / "samples.png").size[0] > 10 * 32  # one column per digit

    code, _ = run(
        capsys,
        "train",
        "--model",
        kind,
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "part",
        "--steps",
        3,
        "--batch-size",
        8,
        "--max-images",
        64,
        "--num-eval",
        16,
        "--threads",
        1,
        "--no-progress",
        "--eval-every",
        3,
        *SMALL[kind],
    )
    assert code == 0
    code, text = run(
        capsys,
        "train",
        "--model",
        kind,
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "part",
        "--steps",
        6,
        "--resume",
        "--no-progress",
    )
    assert code == 0, text
    resumed = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert resumed["history"]["loss"] == history["loss"]  # bit-exact: batches and noise depend on (seed, step)
    written = (tmp_path / "part" / "metrics.json").read_bytes()
    code, text = run(
        capsys,
        "train",
        "--model",
        kind,
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "part",
        "--steps",
        6,
        "--resume",
        "--no-progress",
    )
    assert code == 0 and "finished at step 6" in text, text
    assert (tmp_path / "part" / "metrics.json").read_bytes() == written  # a finished run: nothing rewritten
    full, part = (read_checkpoint(tmp_path / r / CHECKPOINT)[0] for r in ("full", "part"))
    assert all(torch.equal(full[k], part[k]) for k in full if k.startswith("model."))


def test_a_second_run_into_the_same_out_fails_at_once(capsys, tokenizer, tmp_path):
    """A prior or diffusion run goes through the tokenizers' training loop, and its run-folder lock."""
    out = tmp_path / "prior"
    with RunFolderLock(out):
        code, text = run(
            capsys,
            "train",
            "--model",
            "prior",
            "--tokenizer",
            tokenizer,
            "--out",
            out,
            "--steps",
            2,
            "--no-progress",
            *SMALL["prior"],
        )
        assert code == 2 and f"--out {out}: another run (process {os.getpid()}) is writing there" in text, text
        config = make_config("prior", tokenizer=str(tokenizer), steps=2, threads=1)
        with pytest.raises(SettingError, match=f"out_dir {out}: another run"):  # past the command line's check
            generation.train_generator(config, out, progress=False)
    assert not out.exists()  # nothing was written there


def test_sample_writes_a_grid_and_an_array_reproducibly(capsys, tokenizer, tmp_path):
    train_generator(capsys, "prior", tokenizer, tmp_path / "prior")
    arrays = []
    for seed, batch in ((3, 2), (3, 2), (4, 2)):
        out, npy = tmp_path / f"s{seed}-{len(arrays)}.png", tmp_path / f"s{seed}-{len(arrays)}.npy"
        code, text = run(
            capsys,
            "sample",
            "--ckpt",
            tmp_path / "prior",
            "--num",
            5,
            "--out",
            out,
            "--npy",
            npy,
            "--seed",
            seed,
            "--batch-size",
            batch,
            "--top-k",
            4,
            "--no-progress",
        )
        assert code == 0, text
        assert "ms per image" in text and Image.open(out).size[0] > 0
        arrays.append(np.load(npy))
    assert arrays[0].shape == (5, 32, 32, 3) and arrays[0].dtype == np.uint8
    assert np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[0], arrays[2])

    code, _ = run(
        capsys,
        "sample",
        "--ckpt",
        tmp_path / "prior",
        "--num",
        3,
        "--class",
        "7",
        "--npy",
        tmp_path / "sevens.npy",
        "--out",
        tmp_path / "sevens.png",
        "--temperature",
        0,
        "--no-progress",
    )
    assert code == 0 and np.load(tmp_path / "sevens.npy").shape == (3, 32, 32, 3)
    generator = load(tmp_path / "prior")
    assert isinstance(generator, Generator) and generator.class_names[7] == "7"
    greedy = generator.model.sample(2, labels=torch.tensor([7, 7]), temperature=0)
    assert torch.equal(greedy[0], greedy[1])  # temperature 0: the most likely code at every position

    for argv, message in (
        (["--steps", 10], "--steps applies to diffusion models"),
        (["--class", "cat"], "--class 'cat' is not one of the model's classes"),
        (["--num", 0], "--num must be an int >= 1"),
        (["--out", tmp_path / "grid.jpg"], "--out"),
    ):
        code, text = run(capsys, "sample", "--ckpt", tmp_path / "prior", "--no-progress", *argv)
        assert code == 2 and message in text, text
    code, text = run(capsys, "sample", "--ckpt", tokenizer, "--no-progress")
    assert code == 2 and "holds a vqvae tokenizer" in text, text


def test_diffusion_samples_with_and_without_quantizing(capsys, tokenizer, tmp_path):
    train_generator(capsys, "diffusion", tokenizer, tmp_path / "diffusion")
    images = {}
    for flags in ([], ["--no-quantize"], ["--guidance", 2.0, "--steps", 4, "--eta", 1.0]):
        npy = tmp_path / f"{len(images)}.npy"
        code, text = run(
            capsys,
            "sample",
            "--ckpt",
            tmp_path / "diffusion",
            "--num",
            4,
            "--steps",
            5,
            "--npy",
            npy,
            "--out",
            tmp_path / f"{len(images)}.png",
            "--no-progress",
            *flags,
        )
        assert code == 0, text
        images[len(images)] = np.load(npy)
    assert images[0].shape == (4, 32, 32, 3)
    assert not np.array_equal(images[0], images[1])  # the quantizer changed what the decoder saw
    code, text = run(capsys, "sample", "--ckpt", tmp_path / "diffusion", "--top-k", 3, "--no-progress")
    assert code == 2 and "--top-k applies to prior models" in text


def test_train_errors_name_the_flags(capsys, tokenizer, tmp_path):
    for argv, message in (
        (["--model", "prior", "--out", tmp_path / "a"], "--model prior needs --tokenizer"),
        (["--model", "prior", "--tokenizer", tmp_path / "missing", "--out", tmp_path / "b"], "missing"),
        (
            ["--model", "diffusion", "--tokenizer", tokenizer, "--precision", "bf16", "--out", tmp_path / "c"],
            "--precision applies to the tokenizers",
        ),
        (
            ["--model", "prior", "--tokenizer", tokenizer, "--set", "width=3", "--out", tmp_path / "d"],
            "prior takes no argument ['width']",
        ),
        (
            [
                "--model",
                "prior",
                "--tokenizer",
                tokenizer,
                "--data",
                "builtin",
                "--set",
                "num_classes=3",
                "--out",
                tmp_path / "e",
            ],
            "num_classes=3, but --data builtin has no classes",
        ),
        (
            ["--model", "prior", "--preset", "gpu", "--tokenizer", tokenizer, "--out", tmp_path / "f"],
            "--preset gpu has no settings for --model prior; presets for it: demo",
        ),
    ):
        code, text = run(capsys, "train", "--steps", 1, "--no-progress", *argv)
        assert code == 2 and message in text, text


def test_class_labels_from_mnist_digits_and_parent_folders(tmp_path):
    train, held_out = split_images("mnist", 0.1, 0)
    labels, names = class_labels(train.select(range(3)))
    assert names == [str(d) for d in range(10)] and labels.tolist() == [5, 0, 4]  # MNIST's first digits
    for i, cls in enumerate(["cat", "cat", "dog", "nested/bird", "dog"]):
        (tmp_path / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    source = FileImages("folder", tmp_path, names)
    labels, classes = class_labels(source)
    assert classes == ["cat", "dog", "nested/bird"] and labels.tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="classes \\['nested/bird'\\] are not among"):
        class_labels(source, ["cat", "dog"])
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "top.png")
    assert class_labels(FileImages("folder", tmp_path, [*names, "top.png"])) is None  # an image without class


def test_eval_samples_judges_images_beside_real_digits(capsys, tmp_path, monkeypatch):
    from fastvq.app.mnist import load_mnist

    images, labels = load_mnist("train")
    classifier = sample_quality.train_digit_classifier(
        images[:2000], labels[:2000], epochs=1, batch=50, progress=lambda text: None
    )
    monkeypatch.setattr(sample_quality, "digit_classifier", lambda progress: classifier)
    test, _ = load_mnist("test")
    np.save(tmp_path / "real.npy", np.repeat(test[100:300, :, :, None], 3, -1))
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8))
    numbers = {}
    for name in ("real", "noise"):
        code, text = run(capsys, "eval-samples", "--data", tmp_path / f"{name}.npy", "--out", tmp_path / f"{name}.json")
        assert code == 0 and "Frechet distance" in text, text
        numbers[name] = json.loads((tmp_path / f"{name}.json").read_text())
    real, noise = numbers["real"], numbers["noise"]
    assert real["reference_count"] == 200 and sum(real["samples"]["histogram"]) == 200
    assert real["samples"]["coverage"] == 1.0
    assert real["samples"]["frechet_distance"] < noise["samples"]["frechet_distance"] / 5
    assert noise["real"] == real["real"]  # the reference point depends only on the count


@pytest.mark.usefixtures("sigint_delivered")
def test_ctrl_c_checkpoints_the_step_and_resume_matches(capsys, tokenizer, tmp_path, monkeypatch):
    import signal

    full, _ = train_generator(capsys, "diffusion", tokenizer, tmp_path / "full")

    def ctrl_c_in_the_second_step(self, step, batch, real_step=generation.GeneratorTraining.step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, step, batch)

    monkeypatch.setattr(generation.GeneratorTraining, "step", ctrl_c_in_the_second_step)
    code, text = run(
        capsys,
        "train",
        "--model",
        "diffusion",
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "cut",
        "--steps",
        6,
        "--ckpt-every",
        3,
        "--batch-size",
        8,
        "--max-images",
        64,
        "--num-eval",
        16,
        "--threads",
        1,
        "--no-progress",
        *SMALL["diffusion"],
    )
    assert code == 130 and "interrupted after step 2" in text, text
    assert read_checkpoint(tmp_path / "cut" / CHECKPOINT)[1]["step"] == 2
    monkeypatch.undo()
    code, text = run(
        capsys,
        "train",
        "--model",
        "diffusion",
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "cut",
        "--steps",
        6,
        "--resume",
        "--no-progress",
    )
    assert code == 0, text
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed["history"]["loss"] == full["history"]["loss"]
