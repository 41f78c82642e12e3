"""The command line against odd and hostile arguments (issue 24): every number range-checked
against its meaning before any work, naming the flag; --set values typed by their definition;
sampling that cannot silently write black images; runs that cannot fail at their end; outputs
that cannot be lost to a missing folder; uint8 code indices; the thread count and the seed."""

import json

import numpy as np
import pytest
import torch
from tiny_runs import diffusion_run, image_folder, prior_run, run, tokenizer_run  # noqa: F401 (fixtures)

from fastvq.app import checkpoint, cli, device, sample_quality
from fastvq.app.config import make_config, parse_model_args
from fastvq.app.errors import SettingError
from fastvq.app.state import CHECKPOINT
from fastvq.nn import VectorQuantize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_work(monkeypatch):
    """Every entry into real work (reading data or a checkpoint, training, judging samples) fails
    the test: the argument must be refused before any of it."""

    def work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for name in (
        "load_model",
        "load_generator",
        "read_meta",
        "train",
        "train_generator",
        "load_images",
        "open_images",
        "builtin_images",
    ):
        monkeypatch.setattr(cli, name, work)
    monkeypatch.setattr(sample_quality, "evaluate_samples", work)


CKPT = ["--ckpt", "some-run"]
REFUSED = [
    (["train", "--steps", 0], "--steps must be an int >= 1, got 0"),
    (["train", "--batch-size", -4], "--batch-size must be an int >= 1, got -4"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["train", "--lr", 0], "--lr must be a finite number > 0, got 0.0"),
    (["train", "--seed", -1], "--seed must be an int in [0, 4294967295], got -1"),
    (["train", "--seed", 2**40], "--seed must be an int in [0, 4294967295], got 1099511627776"),
    (["train", "--holdout", 1], "--holdout must be a finite number in [0, 1), got 1.0"),
    (["train", "--num-eval", 0], "--num-eval must be an int >= 1, got 0"),
    (["train", "--image-size", 0], "--image-size must be an int >= 1, got 0"),
    (["train", "--workers", -1], "--workers must be an int >= 0, got -1"),
    (["train", "--threads", 0], "--threads must be an int in [1, "),
    (["train", "--eval-every", 0], "--eval-every must be an int >= 1, got 0"),
    (["train", "--ckpt-every", -2], "--ckpt-every must be an int >= 1, got -2"),
    (["train", "--codebook-size", 0], "--codebook-size must be an int >= 1, got 0"),
    (["train", "--max-images", 0], "--max-images must be an int >= 1, got 0"),
    (["train", "--resize", 0], "--resize must be an int >= 1, got 0"),
    (["sample", *CKPT, "--num", 0], "--num must be an int >= 1, got 0"),
    (["sample", *CKPT, "--batch-size", 0], "--batch-size must be an int >= 1, got 0"),
    (["sample", *CKPT, "--seed", -1], "--seed must be an int in [0, 4294967295], got -1"),
    (["sample", *CKPT, "--seed", 9_300_000_000_000], "--seed must be an int in [0, 4294967295], got 9300000000000"),
    (["sample", *CKPT, "--temperature", "nan"], "--temperature must be a finite number >= 0.001, got nan"),
    (["sample", *CKPT, "--temperature", "inf", "--top-k", 3], "--temperature must be a finite number >= 0.001"),
    (["sample", *CKPT, "--temperature", "1e-40", "--top-k", 3], "--temperature must be a finite number >= 0.001"),
    (["sample", *CKPT, "--temperature", -1], "--temperature must be a finite number >= 0.001, got -1.0"),
    (["sample", *CKPT, "--top-k", 0], "--top-k must be an int in [1, 16], got 0"),
    (["sample", *CKPT, "--top-k", 17], "--top-k must be an int in [1, 16], got 17"),
    (["sample", *CKPT, "--eta", "nan"], "--eta must be a finite number in [0, 1], got nan"),
    (["sample", *CKPT, "--eta", -1], "--eta must be a finite number in [0, 1], got -1.0"),
    (["sample", *CKPT, "--eta", 2], "--eta must be a finite number in [0, 1], got 2.0"),
    (["sample", *CKPT, "--guidance", "nan"], "--guidance must be a finite number in [0, 100], got nan"),
    (["sample", *CKPT, "--guidance", "1e30"], "--guidance must be a finite number in [0, 100], got 1e+30"),
    (["sample", *CKPT, "--guidance", -1], "--guidance must be a finite number in [0, 100], got -1.0"),
    (["sample", *CKPT, "--steps", 0], "--steps must be an int >= 1, got 0"),
    (["sample", *CKPT, "--threads", 100000], "--threads must be an int in [1, "),
    (["eval", *CKPT, "--num-eval", 0], "--num-eval must be an int >= 1, got 0"),
    (["eval", *CKPT, "--image-size", -16], "--image-size must be an int >= 1, got -16"),
    (["eval", *CKPT, "--batch-size", 0], "--batch-size must be an int >= 1, got 0"),
    (["encode", *CKPT, "--data", "x", "--out", "y", "--crop", 0], "--crop must be an int >= 1, got 0"),
    (["decode", *CKPT, "--indices", "x", "--out", "y", "--batch-size", 0], "--batch-size must be an int >= 1"),
    (["eval-samples", "--data", "x.npy", "--threads", 0], "--threads must be an int in [1, "),
]


@pytest.mark.parametrize("argv,message", REFUSED, ids=[" ".join(map(str, a)) for a, _ in REFUSED])
def test_every_number_is_range_checked_before_any_work_naming_its_flag(capsys, no_work, argv, message):
    code, text = run(capsys, *argv)
    assert code == 2 and f"error: {message}" in text, text


def test_set_values_are_typed_by_their_definition(capsys, tmp_path, image_folder):
    """--set kmeans_init=False used to be the (truthy) string 'False': it switched k-means on."""
    typed = parse_model_args(
        "vqgan",
        [
            ("kmeans_init", "False"),
            ("rotation_trick", "YES"),
            ("channels", "32"),
            ("decay", "0.9"),
            ("ch_mult", "1,2,2"),
            ("pixel_loss", "l2"),
        ],
    )
    assert typed == {
        "kmeans_init": False,
        "rotation_trick": True,
        "channels": 32,
        "decay": 0.9,
        "ch_mult": [1, 2, 2],
        "pixel_loss": "l2",
    }
    assert type(typed["decay"]) is float and parse_model_args("vqgan", [("ch_mult", "[1, 2]")])["ch_mult"] == [1, 2]
    assert parse_model_args("prior", [("num_classes", "None"), ("codebook_init", "0")]) == {
        "num_classes": None,
        "codebook_init": False,
    }
    out = tmp_path / "run"
    code, text = run(
        capsys,
        "train",
        "--data",
        image_folder,
        "--out",
        out,
        "--steps",
        1,
        "--image-size",
        16,
        "--batch-size",
        2,
        "--num-eval",
        1,
        "--set",
        "channels=8",
        "--set",
        "res_channels=4",
        "--set",
        "kmeans_init=False",
        "--set",
        "rotation_trick=false",
        "--codebook-size",
        8,
        "--codebook-dim",
        2,
        "--threads",
        1,
        "--workers",
        0,
        "--no-progress",
        "--device",
        "cpu",
    )
    assert code == 0, text
    model_args = json.loads((out / "metrics.json").read_text())["config"]["model_args"]
    assert model_args["kmeans_init"] is False and model_args["rotation_trick"] is False


@pytest.mark.parametrize(
    "setting,message",
    [
        ("kmeans_init=maybe", "--set kmeans_init=maybe: expected true or false (yes/no, 1/0)"),
        ("kmeans_init=None", "--set kmeans_init=None: expected true or false (yes/no, 1/0)"),
        ("channels=abc", "--set channels=abc: expected an int"),
        ("channels=1.5", "--set channels=1.5: expected an int"),
        ("decay=nan", "--set decay=nan: expected a finite number"),
        ("channels=-8", "--set channels must be an int >= 1, got -8"),
        ("downsample=3", "--set downsample must be a power of two >= 2, got 3"),
        ("decay=2", "--set decay must be a finite number in [0, 1], got 2.0"),
        ("depth=3", "vqvae takes no argument ['depth']"),
    ],
)
def test_bad_set_values_name_the_key_and_what_was_expected(capsys, no_work, setting, message):
    code, text = run(capsys, "train", "--set", setting)
    assert code == 2 and f"error: {message}" in text, text


def test_python_settings_of_the_wrong_type_are_refused():
    with pytest.raises(SettingError, match=r'^model_args kmeans_init="False": expected true or false'):
        make_config("vqvae", model_args={"kmeans_init": "False"})
    with pytest.raises(SettingError, match=r"^steps must be an int, got '10'$"):
        make_config("vqvae", steps="10")


@pytest.mark.parametrize(
    "size,message",
    [
        (
            8,
            "--image-size 8 is below 11, the side the final evaluation needs (SSIM's window); the smallest size for "
            "this model is 12",
        ),
        (4, "--image-size 4 is below 11"),
        (18, "--image-size 18 is not a multiple of the model's downsampling factor 4 (try 16)"),
    ],
)
def test_a_run_that_could_not_finish_is_refused_before_training(capsys, no_work, size, message):
    """--image-size 4 or 8 trained every step, then failed at the final evaluation, and every
    --resume failed the same way."""
    code, text = run(capsys, "train", "--image-size", size)
    assert code == 2 and f"error: {message}" in text, text
    code, text = run(capsys, "train", "--model", "vqgan", "--preset", "demo", "--image-size", 14)
    assert code == 2 and "--image-size 14 is not a multiple of the model's downsampling factor 4 (try 12)" in text


def test_diffusion_samples_a_batch_of_one_on_1x1_latents(capsys, tmp_path, diffusion_run):
    """sample --num 1 on a model of width 8 over 1x1 latents crashed (as did the run's final
    evaluation of one item, which the fixture's --num-eval 1 makes)."""
    code, text = run(
        capsys,
        "sample",
        "--ckpt",
        diffusion_run,
        "--num",
        1,
        "--steps",
        3,
        "--eta",
        1,
        "--out",
        tmp_path / "one.png",
        "--npy",
        tmp_path / "one.npy",
        "--no-progress",
    )
    assert code == 0, text
    assert np.load(tmp_path / "one.npy").shape == (1, 16, 16, 3)


def test_sampling_that_diverges_is_an_error_not_black_images(capsys, tmp_path, diffusion_run):
    tensors, meta = checkpoint.load(diffusion_run / CHECKPOINT)
    name = next(k for k in tensors if k.startswith("model.model.denoiser.inp.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    broken = tmp_path / "broken.safetensors"
    checkpoint.save(broken, tensors, meta)
    out = tmp_path / "samples.png"
    code, text = run(capsys, "sample", "--ckpt", broken, "--num", 2, "--steps", 2, "--out", out, "--no-progress")
    assert code == 2 and "generated images that are not finite (NaN or inf)" in text, text
    assert not out.exists()


def test_sampling_options_that_do_not_fit_the_model_are_named(capsys, tmp_path, prior_run, diffusion_run):
    code, text = run(capsys, "sample", "--ckpt", prior_run, "--top-k", 9, "--out", tmp_path / "a.png")
    assert code == 2 and "error: --top-k must be an int in [1, 8], got 9" in text, text
    code, text = run(capsys, "sample", "--ckpt", diffusion_run, "--steps", 21, "--out", tmp_path / "b.png")
    assert code == 2 and "error: --steps must be an int in [1, 20], got 21" in text, text
    code, text = run(capsys, "sample", "--ckpt", diffusion_run, "--guidance", 2, "--out", tmp_path / "c.png")
    assert code == 2 and "error: --guidance applies to a model trained with classes" in text, text
    code, text = run(capsys, "sample", "--ckpt", diffusion_run, "--eta", "0.5", "--out", tmp_path)
    assert code == 2 and "--out" in text and "end the name in .png" in text, text


def test_eval_samples_writes_into_a_missing_folder_or_fails_before_the_work(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        sample_quality,
        "evaluate_samples",
        lambda images, progress: (
            calls.append(len(images))
            or {
                "samples": {
                    "confidence": 0.5,
                    "coverage": 0.5,
                    "frechet_distance": 1.0,
                    "histogram": [1] * 10,
                    "count": 3,
                },
                "real": {
                    "confidence": 0.9,
                    "coverage": 1.0,
                    "frechet_distance": 0.5,
                    "histogram": [1] * 10,
                    "count": 3,
                },
                "reference_count": 3,
            }
        ),
    )
    np.save(tmp_path / "digits.npy", np.zeros((3, 28, 28, 3), np.uint8))
    out = tmp_path / "not" / "yet" / "quality.json"
    code, text = run(capsys, "eval-samples", "--data", tmp_path / "digits.npy", "--out", out)
    assert code == 0 and json.loads(out.read_text())["reference_count"] == 3, text
    code, text = run(capsys, "eval-samples", "--data", tmp_path / "digits.npy", "--out", tmp_path / "not")
    assert code == 2 and "--out" in text and "is a folder" in text and calls == [3], text


def test_uint8_indices_in_range_are_codes_and_the_range_error_does_not_contradict_itself():
    """encode writes uint8 indices for K <= 256; the layer said 'must be in [-1, 256), got values in
    [0, 0]' (-1 wrapped to 255 in a uint8 comparison)."""
    layer = VectorQuantize(dim=4, codebook_size=256)
    indices = torch.tensor([[0, 255, 17]], dtype=torch.uint8)
    torch.testing.assert_close(layer.get_output_from_indices(indices), layer.get_output_from_indices(indices.long()))
    small = VectorQuantize(dim=4, codebook_size=8)
    with pytest.raises(ValueError, match=r"^indices must be in \[-1, codebook_size=8\), got values in \[0, 200\]$"):
        small.get_output_from_indices(torch.tensor([[0, 200]], dtype=torch.uint8))


def test_decode_takes_encodes_uint8_indices_and_names_a_file_out_of_range(
    capsys, tmp_path, image_folder, tokenizer_run
):
    codes = tmp_path / "codes"
    code, text = run(
        capsys, "encode", "--ckpt", tokenizer_run, "--data", image_folder, "--out", codes, "--crop", 16, "--no-progress"
    )
    assert code == 0 and np.load(codes / "indices.npy").dtype == np.uint8, text
    code, text = run(
        capsys, "decode", "--ckpt", tokenizer_run, "--indices", codes, "--out", tmp_path / "decoded", "--no-progress"
    )
    assert code == 0 and len(list((tmp_path / "decoded").iterdir())) == 6, text
    np.save(codes / "indices.npy", np.full_like(np.load(codes / "indices.npy"), 200))
    code, text = run(capsys, "decode", "--ckpt", tokenizer_run, "--indices", codes, "--out", tmp_path / "d2")
    assert code == 2 and "indices.npy holds codes in [200, 200]; this vqvae's codes are in [0, 8)" in text, text
    manifest = json.loads((codes / "manifest.json").read_text())
    del manifest["shape"]
    (codes / "manifest.json").write_text(json.dumps(manifest))
    code, text = run(capsys, "decode", "--ckpt", tokenizer_run, "--indices", codes, "--out", tmp_path / "d3")
    assert code == 2 and "manifest.json: missing or malformed shape (a list of ints)" in text, text


def test_threads_are_bounded_by_the_machine_and_a_new_count_applies_on_resume(
    capsys, tmp_path, image_folder, monkeypatch
):
    """--threads 1000 was accepted (a step took 150 s) and kept on every resume. A resume takes a
    new --threads; without one it keeps the recorded count when this machine has the CPUs, and
    otherwise says to pass one."""
    monkeypatch.setattr(device, "machine_cpus", lambda: 4)
    monkeypatch.setattr(cli, "machine_cpus", lambda: 4)
    out = tmp_path / "run"
    argv = [
        "--data",
        image_folder,
        "--out",
        out,
        "--image-size",
        16,
        "--batch-size",
        2,
        "--num-eval",
        1,
        "--set",
        "channels=8",
        "--set",
        "res_channels=4",
        "--codebook-size",
        8,
        "--codebook-dim",
        2,
        "--workers",
        0,
        "--no-progress",
        "--device",
        "cpu",
    ]
    code, text = run(capsys, "train", *argv, "--steps", 1, "--threads", 3)
    assert code == 0, text
    code, text = run(capsys, "train", "--out", out, "--resume", "--steps", 2, "--threads", 1, "--no-progress")
    assert code == 0, text
    assert json.loads((out / "metrics.json").read_text())["config"]["threads"] == 1  # the new count
    meta_threads = checkpoint.load(out / CHECKPOINT)[1]["config"]["threads"]
    assert meta_threads == 1
    code, text = run(capsys, "train", *argv, "--steps", 1, "--threads", 5)
    assert code == 2 and "error: --threads must be an int in [1, 4] (the CPUs of this machine), got 5" in text
    tensors, meta = checkpoint.load(out / CHECKPOINT)
    meta["config"]["threads"] = 3
    checkpoint.save(out / CHECKPOINT, tensors, meta)
    monkeypatch.setattr(device, "machine_cpus", lambda: 2)
    monkeypatch.setattr(cli, "machine_cpus", lambda: 2)
    code, text = run(capsys, "train", "--out", out, "--resume", "--steps", 3, "--no-progress")
    assert (
        code == 2 and "was trained with 3 CPU threads, more than the 2 of this machine: resume with --threads N" in text
    ), text
