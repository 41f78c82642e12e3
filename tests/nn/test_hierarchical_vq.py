"""fastvq.HierarchicalVQ against vector-quantize-pytorch 1.32.0 (the anchor).

Protocol of test_layer_parity: SGD training steps on both from the same state, comparing the
reconstruction, every level's indices, the loss, input and parameter gradients and the state after
each step (1e-5); eval then bit-identical. k-means seeding and dead-code samples are random draws
that differ by design: the parity cases turn them off, or inject the same initial means into both.
"""

import pytest
import torch
from test_layer_parity import close, compare_state

import fastvq.nn.kmeans
from fastvq.nn.hierarchical_vq import HierarchicalVQ

anchor_module = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e '.[test]')"
)

DIM, CODES, BATCH = 8, 24, 2
NO_DRAWS = dict(kmeans_init=False, threshold_ema_dead_code=0)

CONFIGS = {  # constructor arguments, input shape
    "sequence": (dict(scales=(1, 3, 6)), (BATCH, DIM, 6)),
    "image": (dict(scales=(1, 2, 4, 7), accept_image_fmap=True), (BATCH, DIM, 7, 7)),
    "image-last-scale-coarser": (dict(scales=(1, (2, 3), 3), accept_image_fmap=True), (BATCH, DIM, 5, 6)),
    "video": (dict(scales=(1, (1, 2, 2), 3), accept_3d_fmap=True), (BATCH, DIM, 2, 3, 3)),
    "channel-last": (dict(scales=(1, 2, 5), channel_first=False), (BATCH, 5, DIM)),
    "codebook-per-scale": (
        dict(scales=(1, 3, 6), shared_codebook=False, codebook_size=(CODES, 16, 9)),
        (BATCH, DIM, 6),
    ),
    "phi-per-scale": (dict(scales=(1, 2, 4, 6), share_quant_resi=0), (BATCH, DIM, 6)),
    "phi-partial": (dict(scales=(1, 2, 4, 6), share_quant_resi=2, quant_resi=0.3), (BATCH, DIM, 6)),
    "no-phi": (dict(scales=(1, 3, 6), quant_resi=0.0), (BATCH, DIM, 6)),
    "rotation-trick-decay": (
        dict(scales=(1, 3, 6), rotation_trick=True, decay=0.5, commitment_weight=0.25),
        (BATCH, DIM, 6),
    ),
    "orthogonal-reg": (
        dict(
            scales=(1, 3, 6),
            orthogonal_reg_weight=0.5,
            orthogonal_reg_max_codes=10,
            orthogonal_reg_active_codes_only=True,
        ),
        (BATCH, DIM, 6),
    ),
}


def make_pair(backend="torch", **kwargs):
    kwargs = {**NO_DRAWS, **kwargs}
    kwargs.setdefault("codebook_size", CODES)
    anchor = anchor_module.HierarchicalVQ(dim=DIM, **kwargs)
    ours = HierarchicalVQ(dim=DIM, backend=backend, **kwargs)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


def train_step(module, x, seed, lr=0.01, **forward_kwargs):
    """Forward + backward + SGD on a copy of x -> (outputs, x.grad, parameter grads)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, **forward_kwargs)
    target = torch.linspace(-1, 1, out[0].numel()).view_as(out[0])
    ((out[0] - target).pow(2).sum() + out[2]).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in out), x.grad, grads


def compare_outputs(actual, expected, what):
    close(actual[0], expected[0], f"{what} reconstruction")
    assert len(actual[1]) == len(expected[1])
    for level, (a, e) in enumerate(zip(actual[1], expected[1])):
        close(a, e, f"{what} indices of level {level}")
    close(actual[2], expected[2], f"{what} loss")
    assert actual[3:] == expected[3:], f"{what}: cutoff {actual[3:]} != {expected[3:]}"


def compare_steps(anchor, ours, inputs, **forward_kwargs):
    anchor.train(), ours.train()
    for step, x in enumerate(inputs):
        a, b = train_step(anchor, x, step, **forward_kwargs), train_step(ours, x, step, **forward_kwargs)
        compare_outputs(b[0], a[0], f"step {step}")
        close(b[1], a[1], f"step {step} input grad")
        assert a[2].keys() == b[2].keys(), f"step {step}: gradients for {sorted(a[2])} vs {sorted(b[2])}"
        for name in a[2]:
            close(b[2][name], a[2][name], f"step {step} grad of {name}")
        compare_state(anchor, ours, f"after step {step}")
        ours.load_state_dict(anchor.state_dict())


def compare_eval(anchor, ours, x, **forward_kwargs):
    """Eval on identical state: every output bit-identical, and decoding the indices gives the reconstruction."""
    ours.load_state_dict(anchor.state_dict())
    anchor.eval(), ours.eval()
    with torch.no_grad():
        expected, actual = anchor(x, **forward_kwargs), ours(x, **forward_kwargs)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[2], expected[2]), "eval output differs"
        assert all(torch.equal(a, e) for a, e in zip(actual[1], expected[1])), "eval indices differ"
        decoded = ours.get_output_from_indices(actual[1], full_shape=ours.level_shapes[-1])
        close(decoded, anchor.get_output_from_indices(expected[1]), "get_output_from_indices")
    return actual


def batches(shape, steps=3):
    return [torch.randn(shape) * 1.5 for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_and_eval_match_anchor(config):
    kwargs, shape = CONFIGS[config]
    anchor, ours = make_pair(**kwargs)
    compare_steps(anchor, ours, batches(shape))
    quantized, indices, _ = compare_eval(anchor, ours, torch.randn(shape))
    if tuple(shape[2:] if ours.channel_first else shape[1:-1]) == ours.level_shapes[-1]:
        assert torch.equal(ours.get_output_from_indices(indices), quantized), "decoding differs from the forward"
    assert [tuple(i.shape[1:]) for i in indices] == list(ours.level_shapes)


def test_masks_and_lens_match_anchor():
    anchor, ours = make_pair(scales=(1, 2, 4, 7), accept_image_fmap=True)
    mask = torch.rand(BATCH, 7, 7) > 0.4
    mask[1, :4] = False  # a coarse cell with no position
    compare_steps(anchor, ours, batches((BATCH, DIM, 7, 7)), mask=mask)
    _, indices, _ = compare_eval(anchor, ours, torch.randn(BATCH, DIM, 7, 7), mask=mask)
    assert (indices[-1] == -1).equal(~mask)
    anchor, ours = make_pair(scales=(1, 3, 6))
    lens = torch.tensor([6, 4])
    compare_steps(anchor, ours, batches((BATCH, DIM, 6)), lens=lens)
    compare_eval(anchor, ours, torch.randn(BATCH, DIM, 6), lens=lens)


def test_nested_dropout_and_sampling_temperature_match_anchor():
    """Nested dropout draws its cutoff from the global RNG in both (seeded per step)."""
    anchor, ours = make_pair(scales=(1, 2, 4, 6), nested_dropout=1.0, nested_dropout_min_levels=2)
    compare_steps(anchor, ours, batches((BATCH, DIM, 6)), return_cutoff=True)
    ours.train()
    cutoffs = {ours(torch.randn(BATCH, DIM, 6), return_cutoff=True)[3] for _ in range(20)}
    assert cutoffs == {1, 2}, "cutoff must keep 2 to 3 of the 4 levels"
    anchor, ours = make_pair(scales=(1, 3, 6), nested_dropout=0.5)
    compare_steps(anchor, ours, batches((BATCH, DIM, 6), 4), return_cutoff=True, sample_codebook_temp=0.0)


def test_kmeans_init_matches_anchor_given_the_same_seeds(monkeypatch):
    """The default k-means init (on the first, coarsest level's tokens), the same initial means injected
    into both."""
    start = torch.randn(1, CODES, DIM)
    monkeypatch.setattr(
        fastvq.nn.kmeans, "sample_rows", lambda rows, valid, num, sync=False: (start.clone(), torch.full((1,), num))
    )
    anchor, ours = make_pair(scales=(1, 3, 6), kmeans_init=True, kmeans_iters=3)
    anchor.vq._codebook.sample_fn = lambda samples, num: start.clone()
    compare_steps(anchor, ours, batches((BATCH, DIM, 6), 2))
    assert bool(ours.vq.token_quantizer.initted)


def test_default_arguments_run_and_match_the_anchors_state_dict_keys():
    for kwargs in (
        dict(scales=(1, 2, 4, 7), accept_image_fmap=True),
        dict(scales=(1, 2, 4), share_quant_resi=0),
        dict(scales=(1, 2, 4), shared_codebook=False, share_quant_resi=2),
    ):
        anchor = anchor_module.HierarchicalVQ(dim=DIM, codebook_size=CODES, **kwargs)
        ours = HierarchicalVQ(dim=DIM, codebook_size=CODES, **kwargs)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in anchor.state_dict().items()
        }
    x = torch.randn(BATCH, DIM, 7, 7)
    hq = HierarchicalVQ(dim=DIM, codebook_size=CODES, scales=(1, 2, 4, 7), accept_image_fmap=True, backend="torch")
    quantized, indices, loss = hq(x)  # k-means on 2 coarsest tokens, dead-code replacement: as 1.32.0, finite
    assert quantized.shape == x.shape and torch.isfinite(loss) and len(indices) == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scales=(2, 1)), "scales must be non-decreasing"),
        (dict(scales=()), "scales must be a non-empty sequence"),
        (dict(scales=((1, 2),)), r"scales must be ints > 0 or tuples of 1"),
        (dict(scales=(1, 2), codebook_size=(4, 5, 6), shared_codebook=False), "codebook_size must be an int or one"),
        (dict(scales=(1, 2), codebook_size=(4, 5)), "shared_codebook needs one codebook_size"),
        (dict(scales=(1, 2), accept_image_fmap=True, accept_3d_fmap=True), "cannot both be on"),
        (dict(scales=(1, 2), nested_dropout=1.5), r"nested_dropout must be a number in \[0, 1\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalVQ(dim=DIM, **{"codebook_size": CODES, **kwargs})


def test_bad_inputs_raise_clear_errors():
    hq = HierarchicalVQ(dim=DIM, codebook_size=CODES, scales=(1, 2), accept_image_fmap=True, **NO_DRAWS)
    x = torch.randn(BATCH, DIM, 2, 2)
    with pytest.raises(ValueError, match="takes no indices"):
        hq(x, indices=torch.zeros(BATCH, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor \(B, dim, \*spatial\) with dim=8"):
        hq(torch.randn(BATCH, DIM, 4))
    with pytest.raises(ValueError, match="lens needs sequences"):
        hq(x, lens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 2, 2\)"):
        hq(x, mask=torch.ones(BATCH, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"indices must be a tuple of one tensor per level \(2\)"):
        hq.get_output_from_indices([torch.zeros(BATCH, 1, 1, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"indices\[1\] must be an integer tensor \(B, 2, 2\)"):
        hq.get_output_from_indices([torch.zeros(BATCH, 1, 1, dtype=torch.long), torch.zeros(BATCH, 3, 3).long()])
