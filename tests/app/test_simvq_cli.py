"""`fastvq train --quantizer simvq`: the VQ-VAE trains with fastvq.SimVQ, its checkpoint loads back
into a SimVQ that decodes what it encodes, and the EMA-only settings are refused by name."""

import json

import pytest
import torch
from tiny_runs import TOKENIZER_ARGS, run, write_images

from fastvq.app.config import make_config
from fastvq.app.errors import SettingError
from fastvq.app.state import CHECKPOINT, load_model
from fastvq.models import make_quantizer
from fastvq.nn import SimVQ


def test_two_step_training_run_with_simvq(capsys, tmp_path):
    folder, out = write_images(tmp_path / "photos"), tmp_path / "run"
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--quantizer", "simvq", *TOKENIZER_ARGS)
    assert code == 0, text
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history["loss"]) == 2 and all(torch.isfinite(torch.tensor(history["loss"])))
    model, meta = load_model(out / CHECKPOINT, torch.device("cpu"))
    assert model.config["quantizer"] == "simvq" and isinstance(model.quantizer, SimVQ)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    indices = model.encode(images)
    reconstruction, forward_indices, _ = model.eval()(images)
    assert torch.equal(indices, forward_indices)
    torch.testing.assert_close(model.decode(indices), reconstruction, rtol=1e-5, atol=1e-5)


def test_simvq_refuses_the_ema_settings_by_name():
    with pytest.raises(SettingError, match="simvq has no kmeans_init, threshold_ema_dead_code"):
        make_config("vqvae", "demo", quantizer="simvq")
    with pytest.raises(ValueError, match="'simvq' does not support kmeans_init"):
        make_quantizer("simvq", 8, 16, kmeans_init=True)
    quantizer = make_quantizer("simvq", 8, 16, rotation_trick=True, commitment_weight=0.3)
    assert quantizer.rotation_trick and quantizer.input_to_quantize_commit_loss_weight == 0.3
