"""fastvq.VectorQuantize behaviour beyond anchor parity: argument and input errors, 16-bit inputs,
non-finite tokens, codebook health, the fixed anchor bugs, sampling invariants, no N x K tensors."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
import vector_quantize_pytorch
from conftest import backend_cases
from vq_checks import LargestTensor

import fastvq
from fastvq.nn.kmeans import sample_rows
from fastvq.nn.vector_quantize import VectorQuantize

DIM, CODES = 8, 32


def vq(**kwargs):
    kwargs = dict(dict(dim=DIM, codebook_size=CODES), **kwargs)
    return VectorQuantize(**kwargs)


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=1e-5), key


# ---------------------------------------------------------------------------------------------
# arguments and inputs
# ---------------------------------------------------------------------------------------------


def _shared_classes():
    classes = [name for name, value in vars(vector_quantize_pytorch).items() if isinstance(value, type)]
    return sorted(name for name in classes if hasattr(fastvq, name))


def test_every_class_of_the_anchor_has_a_twin():
    """Every class vector-quantize-pytorch 1.32.0 exports is exported by fastvq under its name."""
    classes = [name for name, value in vars(vector_quantize_pytorch).items() if isinstance(value, type)]
    assert len(classes) >= 18 and classes == [name for name in classes if hasattr(fastvq, name)]


@pytest.mark.parametrize("name", _shared_classes())
def test_every_argument_of_the_anchor_class_exists(name):
    """Every constructor argument of vector-quantize-pytorch 1.32.0's class is one of fastvq's twin (by
    name, or taken by its **kwargs and passed on), so no 1.32.0 argument is refused by name."""
    anchor = inspect.signature(getattr(vector_quantize_pytorch, name).__init__).parameters
    ours = inspect.signature(getattr(fastvq, name).__init__).parameters
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
    missing = [arg for arg, p in anchor.items() if arg != "self" and p.kind is not p.VAR_KEYWORD and arg not in ours]
    assert not missing or passes_on, f"fastvq.{name} lacks {missing}"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=0), "dim"),
        (dict(codebook_size=1.5), "codebook_size"),
        (dict(heads=0), "heads"),
        (dict(codebook_dim=-1), "codebook_dim"),
        (dict(decay=1.5), "decay"),
        (dict(eps=-1.0), "eps"),
        (dict(kmeans_init=True, kmeans_iters=0), "kmeans_iters"),
        (dict(threshold_ema_dead_code=-1), "threshold_ema_dead_code"),
        (dict(straight_through=True), "rotation_trick"),
        (dict(use_cosine_sim=True, learnable_codebook=True, ema_update=False), "learnable_codebook"),
        (dict(learnable_codebook=True), "ema_update"),
        (
            dict(straight_through=True, rotation_trick=False, learnable_codebook=True, ema_update=False),
            "learnable_codebook",
        ),
        (dict(accept_image_fmap=True, accept_3d_fmap=True), "accept_3d_fmap"),
        (
            dict(
                orthogonal_reg_weight=1.0,
                orthogonal_reg_active_codes_only=True,
                heads=2,
                separate_codebook_per_head=True,
            ),
            "orthogonal_reg_active_codes_only",
        ),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vq(**kwargs)


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({}, (2, 5, DIM + 1), r"\(B, N, dim=8\)"),
        ({}, (2, 3, 5, DIM), r"\(B, N, dim=8\)"),
        ({}, (2, DIM + 1), r"\(B, dim=8\)"),
        (dict(channel_last=False), (2, 5, DIM), r"\(B, dim=8, N\)"),
        (dict(accept_image_fmap=True), (2, DIM, 4), r"\(B, dim, H, W\) with dim=8"),
        (dict(accept_3d_fmap=True), (2, DIM + 1, 2, 2, 2), r"\(B, dim, D, H, W\) with dim=8"),
    ],
)
def test_bad_input_shapes_name_the_expected_shape(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        vq(**kwargs)(torch.randn(shape))


def test_bad_inputs_raise():
    layer = vq()
    x = torch.randn(2, 5, DIM)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(2, 5, DIM, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(B, N\) = \(2, 5\)"):
        layer(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        layer(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"lens must be an integer tensor of shape \(2,\)"):
        layer(x, lens=torch.tensor([5]))
    with pytest.raises(ValueError, match="at most one of mask and lens"):
        layer(x, mask=torch.ones(2, 5, dtype=torch.bool), lens=torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="mask and lens need sequence input"):
        vq(accept_image_fmap=True)(torch.randn(2, DIM, 2, 2), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"codebook must be a tensor of shape \(32, 8\)"):
        layer.codebook = torch.randn(CODES, DIM + 1)
    with pytest.raises(ValueError, match="last dimension of heads=2"):
        vq(heads=2).get_codes_from_indices(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices must be in \[-1, codebook_size=32\)"):
        layer.get_codes_from_indices(torch.tensor([[CODES]]))
    with pytest.raises(ValueError, match="ema_update_weight must be"):
        layer.train()(x, ema_update_weight=torch.ones(CODES + 1))


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [{}, dict(codebook_dim=4, heads=2)], ids=["plain", "projection"])
def test_16_bit_inputs_compute_in_fp32(dtype, kwargs):
    """A 16-bit input gives the fp32 run's indices and EMA state on the same values, quantized in
    the input dtype and a float32 loss (also with fp32 projections, where the anchor raises)."""
    layer = vq(**kwargs).train()
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 10, DIM).to(dtype)
    quantized, indices, loss = layer(x.requires_grad_())
    expected_q, expected_i, expected_loss = twin(x.detach().float().requires_grad_())
    assert quantized.dtype == dtype and loss.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, expected_i)
    torch.testing.assert_close(quantized, expected_q.to(dtype))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert_state_close(state(layer), state(twin))
    (quantized.float().sum() + loss).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_casting_the_module_keeps_the_ema_state_in_fp32():
    layer = vq(codebook_dim=4).to(torch.bfloat16).train()
    assert layer.project_in.weight.dtype == torch.bfloat16
    assert all(buf.dtype in (torch.float32, torch.bool, torch.int64) for buf in layer._codebook.buffers())
    quantized, _, loss = layer(torch.randn(2, 5, DIM, dtype=torch.bfloat16))
    assert quantized.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert layer._codebook.embed_avg.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# non-finite tokens
# ---------------------------------------------------------------------------------------------


def test_nonfinite_tokens_never_reach_the_statistics():
    """Tokens with NaN/inf get index -1, pass through, and leave the codebook as if masked out;
    the counter counts them (a device tensor, not a Python number)."""
    layer = vq(heads=2, separate_codebook_per_head=True, codebook_dim=4, threshold_ema_dead_code=1.0, decay=0.5).train()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 6, DIM)
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[0, 1] = bad[1, 4] = bad[1, 5] = True
    x[0, 1, 0] = float("nan")
    x[1, 4, 5] = float("inf")
    x[1, 5] = float("-inf")
    torch.manual_seed(0)
    quantized, indices, _ = layer(x)
    torch.manual_seed(0)
    twin(torch.where(bad.unsqueeze(-1), 0.0, x), mask=~bad)
    # one head non-finite: the whole token is left out, -1 in every head, passed through
    assert (indices[0, 1] == -1).all() and (indices[1, 4] == -1).all() and (indices[1, 5] == -1).all()
    assert (indices >= 0).sum() == 2 * (12 - 3) and torch.equal(quantized[1, 4, :4], x[1, 4, :4])
    assert torch.isnan(quantized[0, 1, 0]) and torch.isinf(quantized[1, 5]).all()
    counter = layer.codebook_health()["nonfinite_tokens"]
    assert isinstance(counter, torch.Tensor) and counter.dtype == torch.int64 and int(counter) == 3
    assert "_codebook.num_nonfinite_tokens" not in layer.state_dict()
    for key, value in state(layer).items():
        assert torch.isfinite(value.float()).all(), key
    assert_state_close(state(layer), state(twin))


def test_nonfinite_tokens_never_seed_kmeans_or_dead_codes():
    layer = vq(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=100.0).train()
    x = torch.randn(4, 40, DIM)
    x[:, ::2] = float("nan")  # half the tokens
    for _ in range(3):
        layer(x)
        assert torch.isfinite(layer.codebook).all()
        assert int(layer.codebook_health()["replaced_codes"]) > 0


# ---------------------------------------------------------------------------------------------
# health
# ---------------------------------------------------------------------------------------------


def test_codebook_health_is_device_tensors_matching_the_batch():
    layer = vq(threshold_ema_dead_code=0.9).train()
    health = layer.codebook_health()
    assert torch.isnan(health["usage"]) and torch.isnan(health["perplexity"])
    x = torch.randn(2, 50, DIM)
    with torch.no_grad():
        _, indices, _ = layer(x)
    health = layer.codebook_health()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in health.values())
    counts = torch.bincount(indices.flatten(), minlength=CODES).float()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    torch.testing.assert_close(health["usage"], (counts > 0).float().mean())
    torch.testing.assert_close(health["perplexity"], entropy.exp())
    # decay 0.8: cluster_size = 0.8 + 0.2 * count is below 0.9 exactly for unused codes
    assert int(health["dead_codes"]) == int((counts == 0).sum()) == int(health["replaced_codes"])


# ---------------------------------------------------------------------------------------------
# the anchor's bugs, fixed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [dict(codebook_dim=4, heads=2), dict(heads=2, separate_codebook_per_head=True, use_cosine_sim=True)]
)
def test_masked_loss_uses_the_projected_input(kwargs):
    """With a mask, loss, gradients and EMA state equal those of the unpadded sequences (the anchor
    compares codes with the unprojected input and fails with projections)."""
    layer = vq(**kwargs).train()
    trimmed = copy.deepcopy(layer)
    x = torch.randn(1, 9, DIM)
    padded = torch.cat([x, torch.randn(1, 4, DIM)], dim=1).requires_grad_()
    quantized, indices, loss = layer(padded, lens=torch.tensor([9]))
    expected_q, expected_i, expected_loss = trimmed(x.clone().requires_grad_())
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(quantized[:, :9], expected_q)
    assert torch.equal(indices[:, :9], expected_i) and (indices[:, 9:] == -1).all()
    assert (quantized[:, 9:] == 0).all()
    loss.backward()
    assert (padded.grad[:, 9:] == 0).all()
    assert_state_close(state(layer), state(trimmed))


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(heads=2), (2, 5, DIM)),
        (dict(heads=2, codebook_dim=3), (2, 5, DIM)),
        (dict(heads=2, separate_codebook_per_head=True, codebook_dim=3, channel_last=False), (2, DIM, 5)),
        (dict(codebook_dim=3, accept_image_fmap=True), (2, DIM, 3, 2)),
        (dict(codebook_dim=3), (2, DIM)),
    ],
)
def test_get_output_from_indices_equals_forward(kwargs, shape):
    """Decoding indices gives exactly the eval output, also for shared multi-head codebooks and
    projected feature maps (where the anchor returns a wrong shape)."""
    layer = vq(**kwargs).eval()
    x = torch.randn(shape)
    quantized, indices, _ = layer(x)
    torch.testing.assert_close(layer.get_output_from_indices(indices), quantized, rtol=0, atol=0)
    if not layer.has_projections:
        torch.testing.assert_close(layer.get_codes_from_indices(indices), quantized, rtol=0, atol=0)


def test_index_minus_one_decodes_to_zeros_and_is_skipped_by_update_indices():
    layer = vq(codebook_dim=4).train()
    indices = torch.tensor([[3, -1, 5]])
    assert (layer.get_codes_from_indices(indices)[0, 1] == 0).all()
    assert (layer.get_output_from_indices(indices)[0, 1] == 0).all()
    before = layer._codebook.cluster_size.clone()
    layer.update_indices(torch.randn(1, 3, DIM), indices)
    counts = torch.zeros(CODES)
    counts[[3, 5]] = 1
    torch.testing.assert_close(layer._codebook.cluster_size[0], before[0].lerp(counts, 0.2))


def test_lens_follow_the_sequence_axis_when_channel_first():
    layer = vq(channel_last=False).eval()
    x = torch.randn(2, DIM, 6)
    quantized, indices, _ = layer(x, lens=torch.tensor([6, 2]))
    assert (indices[1, 2:] == -1).all() and (indices[0] >= 0).all()
    assert (quantized[1, :, 2:] == 0).all()


# ---------------------------------------------------------------------------------------------
# sampling, k-means, dead codes, EMA options
# ---------------------------------------------------------------------------------------------


def test_sample_rows_draws_distinct_valid_rows():
    x = torch.arange(2 * 30 * 3, dtype=torch.float32).view(2, 30, 3)
    valid = torch.rand(2, 30) > 0.5
    valid[1, :] = False
    valid[1, :4] = True
    samples, found = sample_rows(x, valid, 10)
    assert found.tolist() == [min(10, int(valid[0].sum())), 4]
    for h in range(2):
        rows = samples[h, : found[h]]
        position = (rows[:, 0] - x[h, 0, 0]) / 3  # rows are x[h, i] = base + 3 i + (0, 1, 2)
        assert valid[h, position.long()].all()
        assert position.unique().numel() == rows.shape[0]


def test_kmeans_init_runs_once_on_the_first_batch_in_eval_too():
    layer = vq(kmeans_init=True, kmeans_iters=3).eval()
    assert not bool(layer._codebook.initted)
    x = torch.randn(2, 64, DIM)
    with pytest.warns(RuntimeWarning, match="duplicates"):
        vq(kmeans_init=True, codebook_size=200).eval()(x)
    layer(x)
    assert bool(layer._codebook.initted)
    first = layer.codebook.clone()
    layer(torch.randn(2, 64, DIM))
    assert torch.equal(layer.codebook, first)
    # a loaded state that is not initialised makes it run again
    layer.load_state_dict(vq(kmeans_init=True).state_dict())
    layer(x)
    assert bool(layer._codebook.initted) and not torch.equal(layer.codebook, torch.zeros_like(first))


def test_kmeans_init_waits_for_a_batch_with_valid_tokens():
    layer = vq(kmeans_init=True).train()
    with pytest.warns(RuntimeWarning, match="uninitialised"):
        layer(torch.randn(1, 4, DIM), mask=torch.zeros(1, 4, dtype=torch.bool))
    assert not bool(layer._codebook.initted)
    layer(torch.randn(1, 40, DIM))
    assert bool(layer._codebook.initted)


def test_expire_codes_helper_replaces_dead_codes_with_given_vectors():
    layer = vq(threshold_ema_dead_code=2.0, heads=2, codebook_dim=4, separate_codebook_per_head=True).train()
    layer._codebook.cluster_size[:, :5] = 0.0
    x = torch.randn(1, 20, 8)
    layer.expire_codes_(x)
    rows = x.view(20, 2, 4)
    for h in range(2):
        new = layer.codebook[h, :5]
        assert (torch.cdist(new, rows[:, h]).min(1).values < 1e-6).all()
        assert (layer._codebook.cluster_size[h, :5] == 2.0).all()


def test_fewer_usable_tokens_than_dead_codes_replaces_the_first_dead_codes():
    layer = vq(threshold_ema_dead_code=2.0).train()
    layer._codebook.cluster_size.fill_(5.0)
    layer._codebook.cluster_size[0, 10:20] = 0.0
    layer._codebook.expire_codes_(torch.randn(1, 4, DIM))
    assert (layer._codebook.cluster_size[0, 10:14] == 2.0).all()
    assert (layer._codebook.cluster_size[0, 14:20] == 0.0).all()
    assert int(layer.codebook_health()["replaced_codes"]) == 4


def test_training_step_builds_no_n_by_k_tensor(monkeypatch):
    """Every tensor the layer creates in forward, backward and the EMA step (k-means init and dead
    codes included) stays below N * K / 2 elements; cdist and one_hot are never called."""
    n_tokens, n_codes = 2048, 1024

    def forbidden(*args, **kwargs):
        raise AssertionError("a dense N x K helper was called")

    monkeypatch.setattr(torch, "cdist", forbidden)
    monkeypatch.setattr(F, "one_hot", forbidden)

    layer = vq(
        dim=16,
        codebook_size=n_codes,
        codebook_dim=8,
        kmeans_init=True,
        kmeans_iters=2,
        threshold_ema_dead_code=2.0,
        orthogonal_reg_weight=0.1,
    ).train()
    x = torch.randn(2, n_tokens // 2, 16, requires_grad=True)
    with LargestTensor() as record:
        for _ in range(2):
            quantized, _, loss = layer(x)
            (quantized.sum() + loss).backward()
    assert 0 < record.largest < n_tokens * n_codes // 2, record.largest


def test_accumulated_statistics_equal_one_step_on_the_union():
    layer = vq(decay=0.5).train()
    twin = copy.deepcopy(layer)
    a, b = torch.randn(2, 10, DIM), torch.randn(2, 10, DIM)
    layer(a, accum_ema_update=True)
    layer(b)
    twin(torch.cat([a, b]))
    assert_state_close(state(layer), state(twin))


# ---------------------------------------------------------------------------------------------
# stochastic sampling, straight-through, top-k, cross-entropy
# ---------------------------------------------------------------------------------------------


def test_stochastic_sampling_draws_codes_in_training_only():
    layer = vq(stochastic_sample_codes=True, sample_codebook_temp=1.0)
    x = torch.randn(4, 64, DIM)
    nearest = layer.eval()(x)[1]
    assert torch.equal(layer.train()(x, freeze_codebook=True, sample_codebook_temp=0.0)[1], nearest)
    assert torch.equal(layer(x, freeze_codebook=True, sample_codebook_temp=1e-6)[1], nearest)
    torch.manual_seed(3)
    drawn = layer(x, freeze_codebook=True, sample_codebook_temp=100.0)[1]
    torch.manual_seed(3)
    assert torch.equal(layer(x, freeze_codebook=True, sample_codebook_temp=100.0)[1], drawn)  # seeded
    assert (drawn != nearest).float().mean() > 0.5 and drawn.min() >= 0
    deterministic = copy.deepcopy(layer)
    deterministic.stochastic_sample_codes = False
    assert torch.equal(deterministic(x, freeze_codebook=True, sample_codebook_temp=100.0)[1], nearest)


def test_sampled_codes_drive_the_ema_update():
    layer = vq(stochastic_sample_codes=True, sample_codebook_temp=5.0).train()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 40, DIM)
    _, indices, _ = layer(x)
    twin.update_indices(x, indices)
    assert_state_close(state(layer), state(twin))


def test_topk_and_cross_entropy_argument_errors():
    layer = vq()
    x = torch.randn(2, 5, DIM)
    with pytest.raises(ValueError, match="topk must be <= 16"):
        layer(x, topk=17)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        layer(x, topk=0)
    with pytest.raises(ValueError, match="topk needs heads=1"):
        vq(heads=2)(x, topk=2)
    with pytest.raises(ValueError, match=r"indices must be an integer tensor shaped as the returned indices"):
        layer(x, indices=torch.zeros(2, 4, dtype=torch.int64))
    assert vq(codebook_size=12)(x, topk=64)[1].shape == (2, 5, 12)  # k is capped at K first


@pytest.mark.parametrize("device,backend", backend_cases())
def test_gumbel_topk_in_training(device, backend):
    """stochastic_sample_codes + topk in training draws k distinct codes per token (Gumbel top-k)
    with top-k's shapes, leaves the codebook alone, and at temperature 1e-6 is the deterministic
    top-k."""
    layer = vq(stochastic_sample_codes=True, sample_codebook_temp=3.0, backend=backend).to(device).train()
    before = state(layer)
    x = torch.randn(2, 7, DIM, device=device)
    quantized, indices, loss = layer(x, topk=4)
    assert quantized.shape == (2, 7, 4, DIM) and indices.shape == loss.shape == (2, 7, 4)
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all()
    assert_state_close(state(layer), before, atol=0)
    deterministic = layer(x, topk=4, sample_codebook_temp=0.0)
    assert (indices != deterministic[1]).any(), "temperature 3 must move some draws"
    cold = layer(x, topk=4, sample_codebook_temp=1e-6)
    for got, want in zip(cold, deterministic):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_sampling_is_the_same_draw_on_every_backend(device, backend):
    """Gumbel noise is keyed by (seed, token, code), so a seeded draw does not depend on the backend."""
    layer = vq(stochastic_sample_codes=True, sample_codebook_temp=2.0, backend="torch").to(device).train()
    x = torch.randn(2, 6, DIM, device=device)
    torch.manual_seed(5)
    expected = layer(x, freeze_codebook=True)[1]
    layer._codebook.backend = backend
    torch.manual_seed(5)
    assert torch.equal(layer(x, freeze_codebook=True)[1], expected)


# ---------------------------------------------------------------------------------------------
# adversarial findings (issue 16)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_nonfinite_token_never_reaches_a_sampled_codebook(device, backend, value):
    """Sampling in training: the bad token gets -1, is counted, and the codebook stays finite."""
    layer = (
        vq(dim=8, codebook_size=16, stochastic_sample_codes=True, sample_codebook_temp=0.5, backend=backend)
        .to(device)
        .train()
    )
    x = torch.randn(1, 4, 8, device=device)
    x[0, 1, 2] = value
    _, indices, _ = layer(x)
    assert indices[0, 1] == -1 and (indices[0, [0, 2, 3]] >= 0).all()
    assert torch.isfinite(layer.codebook).all()
    assert layer.codebook_health()["nonfinite_tokens"] == 1


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("separate", [False, True])
def test_a_token_bad_in_one_head_gets_no_code_in_any(device, backend, separate):
    layer = (
        vq(dim=8, codebook_size=16, heads=2, codebook_dim=4, separate_codebook_per_head=separate, backend=backend)
        .to(device)
        .eval()
    )
    x = torch.randn(2, 5, 8, device=device)
    x[1, 3, 6] = float("nan")  # the second head's half of token (1, 3)
    quantized, indices, _ = layer(x)
    assert indices.shape == (2, 5, 2)
    assert (indices[1, 3] == -1).all() and (indices >= 0).sum() == 2 * 10 - 2
    assert torch.equal(quantized[1, 3, :4], x[1, 3, :4])  # passed through unchanged


@pytest.mark.parametrize("device,backend", backend_cases())
def test_16_bit_cosine_input_picks_the_fp32_code(device, backend):
    """The l2 normalisation of a cosine codebook runs in fp32: |x| = 30000 * sqrt(8) overflows fp16."""
    layer = vq(dim=8, codebook_size=16, use_cosine_sim=True, backend=backend).to(device).eval()
    x = torch.full((1, 1, 8), 30000.0, device=device)
    x[0, 0, ::2] = -1000.0
    want = layer(x)[1]
    assert torch.equal(layer(x.half())[1], want)
    assert torch.equal(layer(x.bfloat16())[1], want)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_update_indices_checks_the_range(device, backend):
    layer = vq(dim=8, codebook_size=16, backend=backend).to(device).train()
    x = torch.randn(1, 4, 8, device=device)
    before = state(layer)
    for bad in (16, -7):
        with pytest.raises(ValueError, match=r"indices must be in \[-1, codebook_size=16\)"):
            layer.update_indices(x, torch.tensor([[0, bad, 1, 2]], device=device))
    assert_state_close(state(layer), before, atol=0)
    layer.update_indices(x, torch.tensor([[0, -1, 15, 2]], device=device))
    assert layer._codebook.cluster_size[0, 15] > 0.8 * before["_codebook.cluster_size"][0, 15]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 4, 8)])
@pytest.mark.parametrize("heads", [1, 2])
def test_zero_tokens_give_empty_outputs(device, backend, shape, heads):
    """As vector-quantize-pytorch 1.32.0: empty quantized and indices, in training and eval."""
    layer = vq(
        dim=8,
        codebook_size=16,
        heads=heads,
        codebook_dim=8 // heads,
        separate_codebook_per_head=heads > 1,
        backend=backend,
    ).to(device)
    for training, masked in ((True, False), (False, False), (True, True)):
        x = torch.randn(*shape, device=device)
        mask = torch.ones(shape[:2], dtype=torch.bool, device=device) if masked else None
        quantized, indices, loss = layer.train(training)(x, mask=mask)
        assert quantized.shape == shape
        assert indices.shape == shape[:2] + ((heads,) if heads > 1 else ())
        assert loss.dim() == 0
    assert torch.isfinite(layer.codebook).all()


@pytest.mark.parametrize(
    "kwargs",
    [dict(learnable_codebook=True, ema_update=False), dict(ema_update=False), dict(freeze_codebook=True)],
    ids=["learnable", "no-ema", "frozen"],
)
def test_nonfinite_tokens_are_counted_without_an_ema_update(kwargs):
    layer = vq(dim=8, codebook_size=16, **kwargs).train()
    x = torch.randn(1, 6, 8)
    x[0, 2, 0] = float("nan")
    layer(x)
    layer(x)
    assert layer.codebook_health()["nonfinite_tokens"] == 2


@pytest.mark.parametrize(
    "name,value",
    [
        ("decay", "0.9"),
        ("decay", 1.5),
        ("eps", float("inf")),
        ("commitment_weight", float("inf")),
        ("eps", -1.0),
        ("backend", "trition"),
        ("precision", "fp8"),
    ],
)
def test_bad_numbers_and_names_raise_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        vq(**{name: value})


def test_kmeans_runs_exactly_its_iterations(monkeypatch):
    """Lloyd's iterations counted against a plain loop, on far more tokens than means (so one more
    or one fewer iteration changes the result)."""
    import fastvq.nn.kmeans as kmeans_module

    x = torch.randn(1, 400, 4)
    start = x[:, :16].clone()
    monkeypatch.setattr(
        kmeans_module, "sample_rows", lambda rows, valid, num, sync=False: (start.clone(), torch.full((1,), num))
    )
    results = []
    for iters in (1, 2, 5):
        means, counts = kmeans_module.kmeans(x, torch.ones(1, 400, dtype=torch.bool), 16, iters)
        want = start[0].clone()
        for _ in range(iters):
            assign = torch.cdist(x[0], want).argmin(1)
            hits = torch.bincount(assign, minlength=16).float()
            new = torch.zeros(16, 4).index_add_(0, assign, x[0]) / hits.clamp_min(1).unsqueeze(1)
            want = torch.where((hits == 0).unsqueeze(1), want, new)
        torch.testing.assert_close(means[0], want, rtol=1e-5, atol=1e-5)
        results.append(means)
    assert not torch.allclose(results[0], results[1]) and not torch.allclose(results[1], results[2])


def test_topk_eval_loss_is_weighted_per_candidate():
    x = torch.randn(2, 5, DIM)
    state_dict = vq().state_dict()
    losses = []
    for weight in (1.0, 0.3):
        layer = vq(commitment_weight=weight).eval()
        layer.load_state_dict(state_dict)
        quantized, indices, loss = layer(x, topk=3)
        assert loss.shape == (2, 5, 3)
        losses.append(loss)
    codes = layer.codebook[indices]
    torch.testing.assert_close(losses[0], (codes - x.unsqueeze(2)).pow(2).mean(-1))
    torch.testing.assert_close(losses[1], 0.3 * losses[0])
