"""`fastvq train --quantizer ibq`: the VQ-VAE trains with fastvq.IBQ, its checkpoint loads back into
an IBQ (codebook `quantizer.embedding.weight`, SEED-Voken's name) that decodes what it encodes, and
the EMA-only settings are refused by name."""

import json

import pytest
import torch
from tiny_runs import TOKENIZER_ARGS, run, write_images

from fastvq.app.config import make_config
from fastvq.app.errors import SettingError
from fastvq.app.state import CHECKPOINT, load_model
from fastvq.models import make_quantizer
from fastvq.nn import IBQ


def test_two_step_training_run_with_ibq(capsys, tmp_path):
    folder, out = write_images(tmp_path / "photos"), tmp_path / "run"
    code, text = run(capsys, "train", "--data", folder, "--out", out, "--quantizer", "ibq", *TOKENIZER_ARGS)
    assert code == 0, text
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history["loss"]) == 2 and all(torch.isfinite(torch.tensor(history["loss"])))
    model, meta = load_model(out / CHECKPOINT, torch.device("cpu"))
    assert model.config["quantizer"] == "ibq" and isinstance(model.quantizer, IBQ)
    assert "quantizer.embedding.weight" in model.state_dict()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    indices = model.encode(images)
    reconstruction, forward_indices, _ = model.eval()(images)
    assert torch.equal(indices, forward_indices)
    torch.testing.assert_close(model.decode(indices), reconstruction, rtol=1e-5, atol=1e-5)


def test_ibq_refuses_the_ema_settings_by_name():
    with pytest.raises(SettingError, match="ibq has no kmeans_init, threshold_ema_dead_code"):
        make_config("vqvae", "demo", quantizer="ibq")
    with pytest.raises(ValueError, match="'ibq' does not support rotation_trick"):
        make_quantizer("ibq", 8, 16, rotation_trick=True)
    quantizer = make_quantizer("ibq", 8, 16, commitment_weight=0.3)
    assert isinstance(quantizer, IBQ) and quantizer.beta == 0.3 and quantizer.use_entropy_loss


def test_ibq_decodes_indices_to_its_codes():
    ibq = IBQ(5, 7)
    indices = torch.tensor([[0, 6, -1], [3, 3, 1]])
    codes = ibq.get_output_from_indices(indices)
    assert codes.shape == (2, 3, 5)
    assert torch.equal(codes[0, 1], ibq.embedding.weight[6].detach()) and torch.equal(codes[0, 2], torch.zeros(5))
