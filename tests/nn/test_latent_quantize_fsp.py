"""fastvq.LatentQuantize and fastvq.FSP against vector-quantize-pytorch 1.32.0 (the anchor), by the
protocol of scalar_checks (training steps within 1e-5, eval bit-identical), then what fastvq does
where 1.32.0 loses codes: indices of the values LatentQuantize chose once they have moved, and
exact indices for bf16 inputs (FSP)."""

import pytest
import torch
from scalar_checks import batches, compare_eval, compare_steps

from fastvq.nn import FSP, LatentQuantize

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

CONFIGS = {  # class, constructor arguments, input shape
    "lq": ("LatentQuantize", dict(levels=[5, 5, 8], dim=3), (2, 3, 13)),
    "lq-projection-image": ("LatentQuantize", dict(levels=[5, 5, 8], dim=7), (2, 7, 5, 3)),
    "lq-codebooks": ("LatentQuantize", dict(levels=[4, 4], dim=8, num_codebooks=2), (2, 8, 9)),
    "lq-fixed-values": ("LatentQuantize", dict(levels=[5, 5, 8], dim=3, optimize_values=False), (2, 3, 13)),
    "lq-one-level-int": ("LatentQuantize", dict(levels=4, codebook_dim=3, dim=3), (2, 3, 6)),
    "fsp": ("FSP", dict(levels=[8, 5, 5, 5]), (2, 13, 4)),
    "fsp-projection-rate": ("FSP", dict(levels=[8, 5, 5], dim=7, quantize_rate=0.5), (2, 13, 7)),
    "fsp-sigmoid-kurt-inverse": (
        "FSP",
        dict(levels=[8, 5, 5], act_name="sigmoid", vector_norm="kurt", need_inv_act=True),
        (2, 13, 3),
    ),
    "fsp-laplace": ("FSP", dict(levels=[6, 5], act_name="laplace", vector_norm="var_laplace"), (2, 13, 2)),
    "fsp-channel-first-image": ("FSP", dict(levels=[8, 5, 5], channel_first=True), (2, 3, 4, 5)),
}
OURS = {"LatentQuantize": LatentQuantize, "FSP": FSP}


def make_pair(cls, **kwargs):
    anchor = getattr(anchor_module, cls)(**kwargs)
    torch.manual_seed(1234)
    ours = OURS[cls](**kwargs)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    cls, kwargs, shape = CONFIGS[config]
    anchor, ours = make_pair(cls, **kwargs)
    assert ours.state_dict().keys() == anchor.state_dict().keys()
    compare_steps(anchor, ours, batches(shape))
    compare_eval(anchor, ours, batches(shape, steps=1)[0])
    ours.eval()
    indices = ours(batches(shape, steps=1)[0])[1]
    assert torch.equal(ours.indices_to_codes(indices), anchor.indices_to_codes(indices))


def test_latent_quantize_indices_are_the_nearest_values_for_any_levels():
    """levels [3, 6, 9] with values moved off their initial grid (as training moves them): every
    index is that of the values nearest to the input (a float64 search) and decodes to the output.
    1.32.0 indexes through the initial grid: its indices differ and do not decode to its output."""
    anchor = anchor_module.LatentQuantize(levels=[3, 6, 9], dim=3).eval()
    with torch.no_grad():
        for values in anchor.values_per_latent:
            values.add_(0.03 * torch.randn_like(values))
    lq = LatentQuantize(levels=[3, 6, 9], dim=3).eval()
    lq.load_state_dict(anchor.state_dict())
    z = torch.rand(4, 3, 400) - 0.5
    out, indices, loss = lq(z)
    values = [v.detach().double() for v in lq.values]
    nearest = torch.stack([(z[:, i, :, None].double() - v).abs().argmin(-1) for i, v in enumerate(values)], -1)
    expected = nearest[..., 0] + 3 * nearest[..., 1] + 18 * nearest[..., 2]
    assert torch.equal(indices.long(), expected) and float(loss) == 0.0
    assert torch.equal(lq.indices_to_codes(indices), out)
    assert torch.equal(lq.codes_to_indices(out.movedim(1, -1)), indices)
    anchor_out, anchor_indices, _ = anchor(z)
    assert torch.allclose(anchor_out, out, atol=1e-6)
    assert (anchor_indices != indices).float().mean() > 0.2
    assert not torch.allclose(anchor.indices_to_codes(anchor_indices), anchor_out, atol=1e-3)


def test_fsp_bf16_inputs_give_the_indices_of_their_fp32_values():
    """1.32.0 computes FSP in the input dtype: in bf16 its indices differ from its fp32 ones (merged codes)."""
    anchor, fsp = make_pair("FSP", levels=[8, 5, 5, 5])
    anchor.eval(), fsp.eval()
    x = torch.randn(2, 600, 4).bfloat16()
    out, indices = fsp(x)[:2]
    expected = fsp(x.float())[1]
    assert out.dtype == torch.bfloat16 and torch.equal(indices, expected)
    assert indices.unique().numel() > 500
    assert (anchor(x)[1] != expected).float().mean() > 0.2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="act_name must be one of"):
        FSP(levels=[8, 5], act_name="relu")
    with pytest.raises(ValueError, match="quantize_rate must be a number in"):
        FSP(levels=[8, 5], quantize_rate=2.0)
    with pytest.raises(ValueError, match="commitment_loss_weight must be a number"):
        LatentQuantize(levels=[5, 5], dim=2, commitment_loss_weight=-1.0)
    with pytest.raises(ValueError, match="codebook_dim >= 1"):
        LatentQuantize(levels=4, dim=3)
    with pytest.raises(ValueError, match="dim=3"):
        LatentQuantize(levels=[5, 5, 5], dim=3)(torch.randn(2, 4, 5))
