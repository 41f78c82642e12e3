"""Checkpoints and files: packing round trips, corrupt, foreign or altered checkpoints, stale
temporaries and failed writes, fastvq.load of a run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TINY, folder, run, train_tiny  # noqa: F401 (folder: a fixture)

import fastvq
from fastvq.app import checkpoint
from fastvq.app.data import (
    load_images,
)
from fastvq.app.files import write_atomic
from fastvq.app.state import CHECKPOINT, load_model

REPO = Path(__file__).resolve().parents[2]


VQT = "vector-quantize-pytorch"


pytestmark = pytest.mark.usefixtures("one_thread")


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
    for path, message in (
        (truncated, "corrupt or not a safetensors file"),
        (flipped, "do not match their checksum"),
        (foreign, "not a fastvq checkpoint"),
        (tmp_path / "missing.safetensors", "no such file"),
    ):
        code, text = run(capsys, "eval", "--ckpt", path, "--data", folder)
        assert code == 2 and message in text, text
    code, text = run(capsys, "eval", "--ckpt", out / CHECKPOINT, "--data", folder, "--quantizer", "taming")
    assert code == 2 and "does not fit a vqvae with quantizer 'taming'" in text


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
