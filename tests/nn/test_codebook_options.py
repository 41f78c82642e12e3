"""VectorQuantize's codebook options against vector-quantize-pytorch 1.32.0 (the anchor):
affine_param (and its decays), in_place_codebook_optimizer (automatic and manual steps, and
ResidualVQ's shared codebook), sync_update_v and vq_bridge.

Each case runs the parity pattern of test_layer_parity: a few training steps on both with outputs,
indices, losses, input and parameter gradients and the whole state compared after every step
(1e-5), then eval. Eval is bit-identical except with affine_param, whose batch statistics take
an EMA step in eval too, summed in another order than torch.mean / torch.var (1e-5 there).
"""

import copy
import functools

import pytest
import torch
from test_layer_parity import batches, close, compare_eval, compare_state, compare_steps
from torch import nn
from vq_checks import LargestTensor

from fastvq.nn.arguments import ARGUMENTS
from fastvq.nn.residual_vq import ResidualVQ
from fastvq.nn.vector_quantize import VectorQuantize

anchor_package = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed"
)

DIM, CODES, BATCH, SEQ = 6, 20, 2, 7  # D not a power of two, odd sequence
SGD = functools.partial(torch.optim.SGD, lr=0.5)
ADAM = functools.partial(torch.optim.Adam, lr=0.05)


def bridge(dim=DIM // 2):
    """A small VQBridge stand-in: an MLP on each code, shared by every codebook."""
    return nn.Sequential(nn.Linear(dim, 8), nn.SiLU(), nn.Linear(8, dim))


CONFIGS = {
    "affine": dict(affine_param=True),
    "affine-decays": dict(affine_param=True, affine_param_batch_decay=0.5, affine_param_codebook_decay=0.3),
    "affine-heads-separate": dict(affine_param=True, heads=2, separate_codebook_per_head=True),
    "affine-heads-shared-projection": dict(affine_param=True, heads=2, codebook_dim=2),
    "affine-learnable": dict(affine_param=True, learnable_codebook=True, ema_update=False),
    "in-place-sgd": dict(learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=SGD),
    "in-place-adam-heads": dict(
        learnable_codebook=True,
        ema_update=False,
        heads=2,
        separate_codebook_per_head=True,
        in_place_codebook_optimizer=ADAM,
    ),
    "in-place-ema-orthogonal": dict(orthogonal_reg_weight=0.5, in_place_codebook_optimizer=SGD),
    "in-place-cosine-orthogonal": dict(use_cosine_sim=True, orthogonal_reg_weight=0.5, in_place_codebook_optimizer=SGD),
    "in-place-manual": dict(
        learnable_codebook=True,
        ema_update=False,
        in_place_codebook_optimizer=SGD,
        manual_in_place_optimizer_update=True,
    ),
    "in-place-affine": dict(
        affine_param=True, learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=SGD
    ),
    "sync-update": dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "sync-update-straight-through-heads": dict(
        learnable_codebook=True, ema_update=False, sync_update_v=1.0, rotation_trick=False, heads=2
    ),
    "vq-bridge": dict(vq_bridge=True, codebook_dim=DIM // 2, heads=2),
    "vq-bridge-separate-in-place": dict(
        vq_bridge=True, codebook_dim=DIM // 2, heads=2, separate_codebook_per_head=True, in_place_codebook_optimizer=SGD
    ),
    "vq-bridge-affine-sync-update": dict(
        vq_bridge=True, codebook_dim=DIM // 2, heads=2, affine_param=True, sync_update_v=0.25
    ),
}


def make_pair(**kwargs):
    """(anchor, fastvq) with identical state; vq_bridge=True gives each its own `bridge()`."""
    bridged = bool(kwargs.get("vq_bridge"))
    if bridged:
        kwargs["vq_bridge"] = bridge(kwargs.get("codebook_dim") or DIM)
    anchor = anchor_package.VectorQuantize(dim=DIM, codebook_size=CODES, **kwargs)
    if bridged:
        kwargs["vq_bridge"] = bridge(kwargs.get("codebook_dim") or DIM)
    torch.manual_seed(12345)
    ours = VectorQuantize(dim=DIM, codebook_size=CODES, backend="torch", **kwargs)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


def compare_eval_close(anchor, ours, x, **forward_kwargs):
    """Eval on identical state, outputs within 1e-5 (indices equal), and the state after it."""
    ours.load_state_dict(anchor.state_dict())
    anchor.eval()
    ours.eval()
    with torch.no_grad():
        expected, actual = anchor(x, **forward_kwargs), ours(x, **forward_kwargs)
    for what, e, a in zip(("quantized", "indices", "loss"), expected, actual):
        close(a, e, f"eval {what}")
    compare_state(anchor, ours, "after eval")


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    anchor, ours = make_pair(**CONFIGS[config])
    inputs = batches((BATCH, SEQ, DIM), steps=3)
    compare_steps(anchor, ours, inputs)
    if "affine_param" in CONFIGS[config]:
        compare_eval_close(anchor, ours, inputs[0])
    else:
        compare_eval(anchor, ours, inputs[0])


@pytest.mark.parametrize("config", ["affine", "in-place-sgd", "vq-bridge"])
def test_padding_mask_matches_anchor(config):
    """Masked tokens stay out of the affine batch statistics and the in-place loss (one head:
    1.32.0's masked commitment loss compares with the input before project_in, so no heads and
    no projection)."""
    anchor, ours = make_pair(**dict(CONFIGS[config], heads=1, codebook_dim=None))
    lens = torch.tensor([SEQ, 3])
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), steps=2), lens=lens)


@pytest.mark.parametrize("config", ["affine", "in-place-manual", "vq-bridge-affine-sync-update"])
def test_loss_breakdown_matches_anchor(config):
    anchor, ours = make_pair(**CONFIGS[config])
    x = torch.randn(BATCH, SEQ, DIM)
    expected, actual = anchor(x, return_loss_breakdown=True)[3], ours(x, return_loss_breakdown=True)[3]
    assert expected._fields == actual._fields
    for name, e, a in zip(expected._fields, expected, actual):
        close(a.detach(), e.detach(), f"loss breakdown {name}")
    if "in_place_codebook_optimizer" in CONFIGS[config]:
        assert actual.inplace_optimize > 0


def test_manual_in_place_steps_wait_for_update_in_place_optimizer():
    anchor, ours = make_pair(**CONFIGS["in-place-manual"])
    before = ours.codebook.detach().clone()
    x = torch.randn(BATCH, SEQ, DIM)
    for model in (anchor, ours):
        model(x)
    close(ours.codebook, before, "codebook before the manual step")
    assert ours.token_quantizer.embed.grad is not None
    for model in (anchor, ours):
        model.update_in_place_optimizer()
    assert not torch.equal(ours.codebook, before)
    assert ours.token_quantizer.embed.grad is None
    close(ours.codebook, anchor.codebook, "codebook after the manual step")


@pytest.mark.parametrize("in_place", [False, True])
def test_topk_and_cross_entropy_see_the_transformed_codes(in_place):
    """With a bridge and affine statistics, top-k (eval) and the cross-entropy from target codes
    (training, after the in-place step) are scored against the transformed codes, as 1.32.0."""
    kwargs = dict(CONFIGS["vq-bridge-affine-sync-update"], heads=1)
    kwargs["in_place_codebook_optimizer"] = SGD if in_place else None
    kwargs["vq_bridge"] = True
    anchor, ours = make_pair(**kwargs)
    x = torch.randn(BATCH, SEQ, DIM)
    targets = torch.randint(0, CODES, (BATCH, SEQ))
    close(ours(x, indices=targets)[1], anchor(x, indices=targets)[1], "cross-entropy")
    compare_state(anchor, ours, "after the cross-entropy forward")
    anchor.eval(), ours.eval()
    with torch.no_grad():
        for what, e, a in zip(("quantized", "indices", "loss"), anchor(x, topk=3), ours(x, topk=3)):
            close(a, e, f"top-k {what}")


def test_state_dicts_load_both_ways():
    """Same keys and shapes; a trained fastvq state loads into 1.32.0 and back, and (unlike 1.32.0)
    a fresh affine codebook loads a state that has batch statistics."""
    anchor, ours = make_pair(**CONFIGS["vq-bridge-affine-sync-update"])
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), steps=1))
    assert {k: v.shape for k, v in anchor.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    trained = copy.deepcopy(ours.state_dict())
    anchor.load_state_dict(trained)
    compare_state(anchor, ours)
    fresh = VectorQuantize(
        dim=DIM, codebook_size=CODES, vq_bridge=bridge(), codebook_dim=DIM // 2, heads=2, affine_param=True
    )
    fresh.load_state_dict(anchor.state_dict())
    compare_state(anchor, fresh)


def test_residual_vq_shared_codebook_steps_its_optimizer_once_per_forward():
    """1.32.0 accumulates every stage's in-place gradient and steps the shared layer's optimizer
    once, after all stages (only with EMA updates, so the codes are learnable through the
    orthogonal loss). That step changes the codes the orthogonal loss saved for its backward, so
    neither package can back-propagate the forward's loss: compared here forward by forward."""
    kwargs = dict(num_quantizers=3, codebook_size=CODES, shared_codebook=True, orthogonal_reg_weight=0.5)
    kwargs["in_place_codebook_optimizer"] = SGD
    anchor = anchor_package.ResidualVQ(dim=DIM, **kwargs)
    ours = ResidualVQ(dim=DIM, backend="torch", **kwargs)
    ours.load_state_dict(anchor.state_dict())
    for step, x in enumerate(batches((BATCH, SEQ, DIM), steps=3)):
        before = ours.layers[0].codebook.detach().clone()
        expected, actual = anchor(x), ours(x)
        for what, e, a in zip(("quantized", "indices", "losses"), expected, actual):
            close(a.detach(), e.detach(), f"step {step} {what}")
        compare_state(anchor, ours, f"after step {step}")
        assert not torch.equal(ours.layers[0].codebook, before)
        ours.load_state_dict(anchor.state_dict())
    compare_eval(anchor, ours, torch.randn(BATCH, SEQ, DIM))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(vq_bridge="bridge"), "vq_bridge"),
        (dict(vq_bridge=nn.Identity(), learnable_codebook=False), "vq_bridge needs learnable_codebook"),
        (dict(vq_bridge=nn.Identity(), ema_update=True), "ema_update and learnable_codebook"),
        (dict(sync_update_v=1.5, learnable_codebook=True, ema_update=False), "sync_update_v"),
        (dict(sync_update_v=0.5), "sync_update_v > 0 needs learnable_codebook"),
        (dict(affine_param=True, use_cosine_sim=True), "affine_param and use_cosine_sim"),
        (dict(affine_param=True, affine_param_batch_decay=-0.1), "affine_param_batch_decay"),
        (dict(affine_param=True, affine_param_codebook_decay=2), "affine_param_codebook_decay"),
        (dict(in_place_codebook_optimizer="sgd"), "in_place_codebook_optimizer"),
        (dict(in_place_codebook_optimizer=SGD), "in_place_codebook_optimizer needs learnable codes"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        VectorQuantize(dim=DIM, codebook_size=CODES, **kwargs)
    if name in ARGUMENTS:
        assert f"({name}: {ARGUMENTS[name].meaning})" in str(info.value)


def test_topk_in_training_with_an_in_place_optimizer_is_refused():
    vq = VectorQuantize(dim=DIM, codebook_size=CODES, **CONFIGS["in-place-sgd"])
    with pytest.raises(ValueError, match="topk cannot be used in training with in_place_codebook_optimizer"):
        vq(torch.randn(BATCH, SEQ, DIM), topk=2)


def test_affine_statistics_leave_out_nonfinite_and_masked_tokens():
    """A NaN token counts as a masked one; a batch with no usable token leaves them unchanged."""
    x = torch.randn(BATCH, SEQ, DIM)
    with_nan, masked = (VectorQuantize(dim=DIM, codebook_size=CODES, affine_param=True) for _ in range(2))
    masked.load_state_dict(with_nan.state_dict())
    bad = x.clone()
    bad[0, 2, 1] = float("nan")
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[0, 2] = False
    with_nan(bad)
    masked(x, mask=keep)
    compare_state(masked, with_nan)
    assert torch.isfinite(with_nan.token_quantizer.batch_mean).all()
    before = copy.deepcopy(masked.state_dict())
    masked(x, mask=torch.zeros(BATCH, SEQ, dtype=torch.bool))
    for key in ("_codebook.batch_mean", "_codebook.batch_variance"):
        assert torch.equal(masked.state_dict()[key], before[key]), key


def test_affine_update_indices_before_any_forward_is_refused():
    vq = VectorQuantize(dim=DIM, codebook_size=CODES, affine_param=True)
    with pytest.raises(RuntimeError, match="run a forward before update_indices"):
        vq.update_indices(torch.randn(BATCH, SEQ, DIM), torch.zeros(BATCH, SEQ, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_train_as_their_fp32_values(dtype):
    """16-bit tokens give the codes, losses and codebook state of their fp32 values (all the
    codebook math is fp32), output in the input dtype."""
    kwargs = dict(CONFIGS["vq-bridge-affine-sync-update"], heads=1, codebook_dim=None)
    kwargs["vq_bridge"], kwargs["in_place_codebook_optimizer"] = True, SGD
    _, half = make_pair(**kwargs)
    full = copy.deepcopy(half)
    x = torch.randn(BATCH, SEQ, DIM).to(dtype)
    out_half, out_full = half(x), full(x.float())
    assert out_half[0].dtype == dtype
    close(out_half[0], out_full[0].to(dtype), "quantized")
    close(out_half[1], out_full[1], "indices")
    close(out_half[2], out_full[2], "loss")
    compare_state(full, half, "after a 16-bit step")


def test_transformed_codes_are_searched_without_an_n_by_k_tensor():
    """With vq_bridge, affine_param, sync_update_v and the in-place optimizer (two searches per
    step), no tensor of a training step (forward and backward) comes near N x K elements."""
    n_tokens, n_codes = 2048, 512
    layer = VectorQuantize(
        dim=16,
        codebook_size=n_codes,
        codebook_dim=8,
        vq_bridge=bridge(8),
        affine_param=True,
        sync_update_v=0.5,
        in_place_codebook_optimizer=SGD,
    ).train()
    x = torch.randn(2, n_tokens // 2, 16, requires_grad=True)
    with LargestTensor() as record:
        for _ in range(2):
            quantized, _, loss = layer(x)
            (quantized.sum() + loss).backward()
    assert 0 < record.largest < n_tokens * n_codes // 8, record.largest


def test_update_indices_maps_the_tokens_back_as_1_32_0():
    """update_indices after a forward: the EMA learns from the tokens under the inverse affine map."""
    anchor, ours = make_pair(**CONFIGS["affine-heads-separate"])
    x = torch.randn(BATCH, SEQ, DIM)
    indices = torch.randint(0, CODES, (BATCH, SEQ, 2))
    mask = torch.rand(BATCH, SEQ) > 0.3
    for module in (anchor, ours):
        module.train()
        module(x)
        module.update_indices(x, indices, mask=mask)
    compare_state(anchor, ours)


def test_residual_vq_stages_step_their_own_optimizers():
    kwargs = dict(num_quantizers=2, codebook_size=CODES, learnable_codebook=True, ema_update=False)
    kwargs.update(in_place_codebook_optimizer=SGD, affine_param=True, sync_update_v=0.5)
    anchor = anchor_package.ResidualVQ(dim=DIM, **kwargs)
    ours = ResidualVQ(dim=DIM, backend="torch", **kwargs)
    ours.load_state_dict(anchor.state_dict())
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), steps=2))
