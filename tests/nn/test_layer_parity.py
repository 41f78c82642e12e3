"""fastvq.VectorQuantize against vector-quantize-pytorch 1.32.0 (the anchor), step by step.

Each case builds the anchor, copies its state into fastvq, then runs a few training steps on both
(forward, backward, an SGD step on every parameter, the EMA update) and compares quantized,
indices, loss, input and parameter gradients after every step and every state_dict entry at the
end; eval mode must then match exactly. Tolerance (fp32): 1e-5 absolute + 1e-5 relative to the
largest magnitude in the tensor compared; the only
differences are float summation orders (scatter-add vs one-hot matmul, the rotation trick's dot
products). Random draws (k-means seeding, dead-code samples) differ by design: k-means gets the
same initial means injected into both, dead-code replacement is checked on invariants.
"""

import pytest
import torch
from conftest import backend_cases

import fastvq.nn.kmeans
from fastvq.nn.vector_quantize import VectorQuantize

AnchorVQ = pytest.importorskip(
    "vector_quantize_pytorch",
    reason="vector-quantize-pytorch==1.32.0 is not installed (pip install -e "
    "'.[test]'; the GPU check installs it from the wheels it carries)",
).VectorQuantize

ATOL = RTOL = 1e-5
DIM, CODES, BATCH, SEQ = 8, 24, 2, 12

CONFIGS = {
    "l2": {},
    "cosine": dict(use_cosine_sim=True),
    "heads-shared-projection": dict(heads=2, codebook_dim=3),
    "heads-separate": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
    "heads-separate-cosine-projection": dict(
        heads=3, codebook_dim=2, separate_codebook_per_head=True, use_cosine_sim=True
    ),
    "projection-layernorm": dict(codebook_dim=5, layernorm_after_project_in=True),
    "straight-through-estimator": dict(rotation_trick=False),
    "decay-0.5": dict(decay=0.5),
    "decay-0.99-eps": dict(decay=0.99, eps=1e-3, commitment_weight=0.25),
    "learnable-codebook": dict(learnable_codebook=True, ema_update=False),
    "learnable-codebook-heads": dict(
        learnable_codebook=True,
        ema_update=False,
        heads=2,
        codebook_dim=4,
        separate_codebook_per_head=True,
        rotation_trick=False,
    ),
    "orthogonal-reg": dict(orthogonal_reg_weight=0.5),
    "orthogonal-reg-active-max": dict(
        orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=10
    ),
    "no-commitment": dict(commitment_weight=0.0),
    "manual-ema": dict(manual_ema_update=True),
    "frozen": dict(freeze_codebook=True),
}

LAYOUTS = {  # constructor arguments, input shape
    "tokens": ({}, (BATCH, SEQ, DIM)),
    "one-token": ({}, (BATCH, DIM)),
    "channel-first": (dict(channel_last=False), (BATCH, DIM, SEQ)),
    "image": (dict(accept_image_fmap=True), (BATCH, DIM, 3, 4)),
    "video": (dict(accept_3d_fmap=True), (BATCH, DIM, 2, 2, 3)),
}


def close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.dtype in (torch.int64, torch.bool):
        mismatch = (actual != expected).nonzero()
        assert mismatch.numel() == 0, f"{what}: {mismatch.shape[0]} mismatches, first at {mismatch[0].tolist()}"
        return
    actual, expected = actual.double(), expected.double()
    finite = expected[expected.isfinite()]
    err = (actual - expected).abs()
    # a NaN or inf only where the other has the same; an error is NaN there, and NaN > tol is False
    bad = ~(
        (err <= ATOL + RTOL * (finite.abs().max() if finite.numel() else 0))
        | (actual == expected)
        | (actual.isnan() & expected.isnan())
    )
    assert not bad.any(), (
        f"{what}: max error {err[bad].max().item():.3g}, first mismatch at "
        f"{bad.nonzero()[0].tolist()}: {actual[bad][0].item()} vs {expected[bad][0].item()}"
    )


def make_pair(backend="torch", device="cpu", **kwargs):
    """(anchor, fastvq) with identical state; fastvq built with a different RNG state on purpose."""
    anchor = AnchorVQ(dim=DIM, codebook_size=CODES, **kwargs).to(device)
    torch.manual_seed(12345)
    ours = VectorQuantize(dim=DIM, codebook_size=CODES, backend=backend, **kwargs).to(device)
    ours.load_state_dict(anchor.state_dict())
    return anchor, ours


def train_step(module, x, lr=0.01, seed=0, **forward_kwargs):
    """Forward + backward + SGD on a copy of x; returns outputs, x.grad and parameter grads."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    quantized, indices, loss = module(x, **forward_kwargs)
    target = torch.linspace(-1, 1, quantized.numel(), device=quantized.device).view_as(quantized)
    ((quantized - target).pow(2).sum() + loss.sum()).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
    return quantized.detach(), indices, loss.detach(), x.grad, grads


def compare_steps(anchor, ours, inputs, **forward_kwargs):
    """Train both on each input; after each step compare outputs, gradients and the whole state,
    then give fastvq the anchor's state so that rounding differences do not compound (the
    rotation trick is ill-conditioned where x and its code point in opposite directions)."""
    anchor.train()
    ours.train()
    for step, x in enumerate(inputs):
        a = train_step(anchor, x, seed=step, **forward_kwargs)
        b = train_step(ours, x, seed=step, **forward_kwargs)
        for what, ea, eb in zip(("quantized", "indices", "loss", "input grad"), a[:4], b[:4]):
            close(eb, ea, f"step {step} {what}")
        assert a[4].keys() == b[4].keys(), f"step {step}: gradients for {sorted(a[4])} vs {sorted(b[4])}"
        for name in a[4]:
            close(b[4][name], a[4][name], f"step {step} grad of {name}")
        compare_state(anchor, ours, f"after step {step}")
        ours.load_state_dict(anchor.state_dict())


def compare_state(anchor, ours, when=""):
    expected, actual = anchor.state_dict(), ours.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        close(actual[key], expected[key], f"state {key} {when}")


def compare_eval(anchor, ours, x, **forward_kwargs):
    """Eval mode on identical state: every output bit-identical."""
    ours.load_state_dict(anchor.state_dict())
    anchor.eval()
    ours.eval()
    with torch.no_grad():
        expected, actual = anchor(x, **forward_kwargs), ours(x, **forward_kwargs)
    for what, e, a in zip(("quantized", "indices", "loss"), expected, actual):
        assert a.shape == e.shape and a.dtype == e.dtype, f"eval {what}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        assert torch.equal(a, e), f"eval {what} differs"


def batches(shape, steps=3, device="cpu"):
    return [torch.randn(shape, device=device) * 1.5 for _ in range(steps)]


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_match_anchor(config):
    anchor, ours = make_pair(**CONFIGS[config])
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM)))
    compare_eval(anchor, ours, torch.randn(BATCH, SEQ, DIM))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", [1, 2])
def test_input_layouts_match_anchor(layout, heads):
    kwargs, shape = LAYOUTS[layout]
    anchor, ours = make_pair(heads=heads, codebook_dim=DIM // heads, separate_codebook_per_head=heads > 1, **kwargs)
    compare_steps(anchor, ours, batches(shape))
    compare_eval(anchor, ours, torch.randn(shape))


@pytest.mark.parametrize("kind", ["mask", "lens"])
def test_padding_matches_anchor(kind):
    """Masked tokens: zeros (or the input) out, index -1, left out of the EMA and the loss. (The
    anchor's masked loss is only right without projection, heads or cosine; those are tested
    against the definition in test_layer.py.)"""
    lens = torch.tensor([SEQ, 5])
    padding = dict(lens=lens) if kind == "lens" else dict(mask=torch.arange(SEQ) < lens[:, None])
    for zeros in (True, False):
        anchor, ours = make_pair(return_zeros_for_masked_padding=zeros)
        compare_steps(anchor, ours, batches((BATCH, SEQ, DIM)), **padding)
        compare_eval(anchor, ours, torch.randn(BATCH, SEQ, DIM), **padding)


@pytest.mark.parametrize("config", ["l2", "cosine", "heads-separate"])
def test_kmeans_init_matches_anchor_given_the_same_seeds(config, monkeypatch):
    """Same initial means injected into both (their random seeding differs): same k-means result,
    EMA state and outputs, in training (first step) and in eval."""
    kwargs = dict(CONFIGS[config], kmeans_init=True, kmeans_iters=4)
    heads = kwargs.get("heads", 1) if kwargs.get("separate_codebook_per_head") else 1
    x = batches((BATCH, SEQ, DIM), steps=1)[0]
    start = torch.randn(heads, CODES, kwargs.get("codebook_dim", DIM))
    if kwargs.get("use_cosine_sim"):
        start = torch.nn.functional.normalize(start, dim=-1)
    monkeypatch.setattr(
        fastvq.nn.kmeans, "sample_rows", lambda rows, valid, num, sync=False: (start.clone(), torch.full((heads,), num))
    )
    for train in (True, False):
        anchor, ours = make_pair(**kwargs)
        anchor._codebook.sample_fn = lambda samples, num: start.clone()
        if train:
            compare_steps(anchor, ours, [x, torch.randn_like(x)])
        else:
            anchor.eval()
            ours.eval()
            with torch.no_grad():
                for e, a in zip(anchor(x), ours(x)):
                    close(a, e, "eval output after k-means init")
            compare_state(anchor, ours)
        assert bool(ours._codebook.initted)


def test_dead_code_replacement_invariants():
    """Both packages replace the same codes (cluster_size below the threshold after the EMA step),
    reset their cluster_size to the threshold and embed_avg to code * threshold, draw each new
    code from the batch (distinct tokens), and leave every other code as the EMA made it."""
    threshold = 1.5
    kwargs = dict(decay=0.5, threshold_ema_dead_code=threshold)
    anchor, ours = make_pair(**kwargs)
    _, twin = make_pair(decay=0.5)  # same EMA without replacement: the state before replacing
    for step in range(3):
        twin.load_state_dict(anchor.state_dict())
        ours.load_state_dict(anchor.state_dict())
        x = torch.randn(BATCH, SEQ, DIM) + 0.3 * step
        for m in (anchor, ours, twin):
            m.train()
            train_step(m, x, seed=step)
        dead = twin._codebook.cluster_size < threshold
        assert dead.any() and not dead.all(), "the batch must make some codes dead and keep others"
        tokens = x.reshape(-1, DIM)
        for module in (anchor, ours):
            cb = module._codebook
            close(cb.cluster_size[~dead], twin._codebook.cluster_size[~dead], "kept cluster_size")
            close(cb.embed[~dead], twin._codebook.embed[~dead], "kept embed")
            close(cb.embed_avg[~dead], twin._codebook.embed_avg[~dead], "kept embed_avg")
            assert (cb.cluster_size[dead] == threshold).all()
            new = cb.embed[dead]
            close(cb.embed_avg[dead], new * threshold, "replaced embed_avg")
            distance = torch.cdist(new, tokens)  # test-side check only
            assert (distance.min(dim=1).values < 1e-5).all(), "a replaced code is not a batch token"
            assert distance.argmin(dim=1).unique().numel() == new.shape[0], "a batch token was drawn twice"


@pytest.mark.parametrize(
    "options",
    [
        dict(ema_update=False, threshold_ema_dead_code=0.2),  # statistics tracked; no code dies in 3 steps
        dict(manual_ema_update=True),
    ],
)
def test_ema_options_match_anchor(options):
    anchor, ours = make_pair(decay=0.6, **options)
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM)))


def test_ema_update_weight_and_accumulation_match_anchor():
    anchor, ours = make_pair(decay=0.7)
    weight = torch.rand(CODES)
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), 2), ema_update_weight=weight)
    compare_steps(
        anchor, ours, batches((BATCH, SEQ, DIM), 2), ema_update_weight=lambda sums, counts: (counts > 0).float() * 0.5
    )
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), 2), accum_ema_update=True)
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), 1))  # applies the accumulated statistics
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), 2), ema_update=False, freeze_codebook=False)
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), 2), freeze_codebook=True)


@pytest.mark.parametrize("heads", [1, 2])
def test_update_indices_matches_anchor(heads):
    anchor, ours = make_pair(heads=heads, codebook_dim=5, separate_codebook_per_head=heads > 1)
    x = torch.randn(BATCH, SEQ, DIM)
    indices = torch.randint(0, CODES, (BATCH, SEQ, heads) if heads > 1 else (BATCH, SEQ))
    mask = torch.rand(BATCH, SEQ) > 0.3
    for module in (anchor, ours):
        module.train()
        module.update_ema_indices(x, indices)
        module.update_indices(x, indices, mask=mask)
    compare_state(anchor, ours)


def test_codebook_helpers_match_anchor():
    anchor, ours = make_pair(codebook_dim=5)
    indices = torch.randint(0, CODES, (BATCH, SEQ))
    close(ours.get_codes_from_indices(indices), anchor.get_codes_from_indices(indices), "codes")
    close(ours.get_output_from_indices(indices), anchor.get_output_from_indices(indices), "output")
    codes = torch.randn(CODES, 5)
    anchor.codebook = codes
    ours.codebook = codes
    close(ours.codebook, anchor.codebook, "codebook after setter")


def test_state_dicts_load_both_ways():
    for kwargs in (
        dict(heads=2, codebook_dim=3, layernorm_after_project_in=True),
        dict(heads=2, separate_codebook_per_head=True, learnable_codebook=True, ema_update=False),
        dict(kmeans_init=True, use_cosine_sim=True),
    ):
        anchor = AnchorVQ(dim=DIM, codebook_size=CODES, **kwargs)
        ours = VectorQuantize(dim=DIM, codebook_size=CODES, **kwargs)
        assert {k: v.shape for k, v in anchor.state_dict().items()} == {
            k: v.shape for k, v in ours.state_dict().items()
        }
        anchor.load_state_dict(ours.state_dict())
        compare_state(anchor, ours)
        ours.load_state_dict(AnchorVQ(dim=DIM, codebook_size=CODES, **kwargs).state_dict())


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize(
    "config", ["l2", "heads-shared-projection", "heads-separate-cosine-projection", "learnable-codebook"]
)
def test_backends_match_anchor(device, backend, config):
    """The same parity on each device and backend (Triton on CPU runs under TRITON_INTERPRET=1:
    tiny shapes)."""
    anchor, ours = make_pair(backend=backend, device=device, **CONFIGS[config])
    mask = torch.arange(6, device=device) < torch.tensor([6, 4], device=device)[:, None]
    padding = {} if "heads" in config else dict(mask=mask)
    compare_steps(anchor, ours, batches((BATCH, 6, DIM), 2, device), **padding)
    compare_eval(anchor, ours, torch.randn(BATCH, 6, DIM, device=device))


@pytest.mark.parametrize("layout", ["tokens", "one-token", "image", "channel-first"])
def test_topk_matches_anchor(layout):
    """topk=k: the k nearest codes (nearest first), per-candidate quantized, indices and loss, in
    training (no EMA) and eval."""
    kwargs, shape = LAYOUTS[layout]
    anchor, ours = make_pair(codebook_dim=4, **kwargs)
    compare_steps(anchor, ours, batches(shape, 2), topk=3)
    compare_eval(anchor, ours, torch.randn(shape), topk=3)
    if layout == "tokens":
        mask = torch.rand(BATCH, SEQ) > 0.3
        compare_steps(anchor, ours, batches(shape, 1), topk=2, mask=mask)
        compare_eval(anchor, ours, torch.randn(shape), topk=2, mask=mask)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cold_gumbel_topk_matches_anchor(metric):
    """stochastic_sample_codes with topk in training (Gumbel top-k): at temperature 1e-6 the noise
    cannot reorder the logits, so both layers pick the deterministic top-k; everything matches."""
    anchor, ours = make_pair(codebook_dim=4, stochastic_sample_codes=True, sample_codebook_temp=1e-6, **CONFIGS[metric])
    compare_steps(anchor, ours, batches((BATCH, SEQ, DIM), 2), topk=3)


@pytest.mark.parametrize("config", ["l2", "cosine", "heads-separate", "heads-shared-projection", "learnable-codebook"])
def test_cross_entropy_from_indices_matches_anchor(config):
    """forward(x, indices=targets) -> cross-entropy of the code logits against the targets (-1
    ignored): same value in eval and training (logits of the codebook before the EMA step); same
    gradients where no EMA step changes the codebook in place under the anchor's backward."""
    anchor, ours = make_pair(**CONFIGS[config])
    heads = CONFIGS[config].get("heads", 1)
    targets = torch.randint(0, CODES, (BATCH, SEQ, heads) if heads > 1 else (BATCH, SEQ))
    targets[0, :3] = -1
    for train, ema_update in ((False, None), (True, False), (True, None)):
        ours.load_state_dict(anchor.state_dict())
        anchor.train(train)
        ours.train(train)
        x = torch.randn(BATCH, SEQ, DIM)
        results = []
        for module in (anchor, ours):
            xg = x.clone().requires_grad_()
            quantized, loss = module(xg, indices=targets, ema_update=ema_update)
            loss.backward()
            results.append((loss.detach(), xg.grad))
        close(results[1][0], results[0][0], f"cross-entropy (training={train})")
        if not train or ema_update is False or CONFIGS[config].get("learnable_codebook"):
            close(results[1][1], results[0][1], f"cross-entropy input grad (training={train})")
        compare_state(anchor, ours, f"(training={train})")


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("config", ["l2", "cosine"])
def test_backends_logits_paths_match_anchor(device, backend, config):
    """top-k and cross-entropy from indices on each backend (tiny shapes for the interpreter)."""
    anchor, ours = make_pair(backend=backend, device=device, **CONFIGS[config])
    compare_eval(anchor, ours, torch.randn(BATCH, 5, DIM, device=device), topk=3)
    targets = torch.randint(-1, CODES, (BATCH, 5), device=device)
    x = torch.randn(BATCH, 5, DIM, device=device)
    grads = []
    for module in (anchor, ours):
        xg = x.clone().requires_grad_()
        _, loss = module.eval()(xg, indices=targets)
        loss.backward()
        grads.append((loss.detach(), xg.grad))
    close(grads[1][0], grads[0][0], "cross-entropy")
    close(grads[1][1], grads[0][1], "cross-entropy input grad")
