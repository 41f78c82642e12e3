"""`fastvq train --quantizer fsq`: a 2-step run trains, evaluates, saves and loads a VQ-VAE whose
quantizer is fastvq.FSQ with levels chosen for --codebook-size; the level choice itself."""

import json

import pytest
import torch
from tiny_runs import TOKENIZER_ARGS, run, write_images

from fastvq.app.state import CHECKPOINT, load_model
from fastvq.models.quantizers import FSQQuantizer, fsq_levels


def test_a_two_step_run_with_fsq_trains_and_loads(capsys, tmp_path):
    folder = write_images(tmp_path / "images")
    out = tmp_path / "fsq"
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--quantizer", "fsq", *TOKENIZER_ARGS)
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantizer"] == "fsq" and metrics["history"]["step"] == [1.0, 2.0]
    assert metrics["history"]["vq_loss"] == [0.0, 0.0] and 0 < metrics["eval"]["codebook_usage"] <= 1
    model, _ = load_model(out / CHECKPOINT, torch.device("cpu"))
    assert model.config["quantizer"] == "fsq" and isinstance(model.quantizer, FSQQuantizer)
    assert model.quantizer.fsq.codebook_size == 8


@pytest.mark.parametrize(
    "size,levels",
    [(8, [8]), (512, [8, 8, 8]), (1000, [8, 5, 5, 5]), (1024, [8, 8, 4, 4]), (4096, [8, 8, 8, 8]), (15, [5, 3])],
)
def test_levels_multiply_to_the_codebook_size(size, levels):
    assert fsq_levels(size) == levels


@pytest.mark.parametrize("size", [2, 11, 1, 16.0])
def test_sizes_without_levels_are_refused_by_name(size):
    with pytest.raises(ValueError, match="quantizer 'fsq' needs a codebook_size"):
        fsq_levels(size)
