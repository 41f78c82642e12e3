"""`fastvq train --quantizer lfq`: a 2-step run trains (with LFQ's entropy loss), evaluates, saves and
loads a VQ-VAE whose quantizer is fastvq.LFQ over log2(--codebook-size) sign bits."""

import json
import math

import pytest
import torch
from tiny_runs import TOKENIZER_ARGS, run, write_images

from fastvq.app.state import CHECKPOINT, load_model
from fastvq.models.quantizers import LFQQuantizer, make_quantizer


def test_a_two_step_run_with_lfq_trains_and_loads(capsys, tmp_path):
    folder = write_images(tmp_path / "images")
    out = tmp_path / "lfq"
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--quantizer", "lfq", *TOKENIZER_ARGS)
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantizer"] == "lfq" and metrics["history"]["step"] == [1.0, 2.0]
    assert all(math.isfinite(loss) and loss != 0 for loss in metrics["history"]["vq_loss"])
    assert 0 < metrics["eval"]["codebook_usage"] <= 1
    model, _ = load_model(out / CHECKPOINT, torch.device("cpu"))
    assert model.config["quantizer"] == "lfq" and isinstance(model.quantizer, LFQQuantizer)
    assert model.quantizer.lfq.codebook_size == 8
    tokens = torch.randn(2, 5, model.quantizer.lfq.dim)
    model.eval()
    quantized, indices, _ = model.quantizer(tokens)
    assert torch.equal(model.quantizer.get_output_from_indices(indices), quantized)


@pytest.mark.parametrize("size", [12, 1, 16.0])
def test_sizes_that_are_not_powers_of_two_are_refused_by_name(size):
    with pytest.raises(ValueError, match="quantizer 'lfq' needs a codebook_size that is a power of 2"):
        make_quantizer("lfq", 4, size)
