"""The Codebook's sampling, k-means initialisation, EMA step and dead-code replacement, checked
case by case where the parity tests against vector-quantize-pytorch 1.32.0 cannot see a
difference (the places mutation testing found blind: docs/mutation.md)."""

import pytest
import torch

from fastvq.nn import Codebook, distributed
from fastvq.nn.kmeans import kmeans, sample_rows
from fastvq.nn.vector_quantize import VectorQuantize

DIM, CODES = 4, 16


def rows_of(x, heads=1):
    """x (B, N, heads * d) -> its token rows (heads, B * N, d)."""
    return x.reshape(-1, heads, x.shape[-1] // heads).transpose(0, 1)


def is_row_of(codes, rows):
    """codes (M, d), rows (N, d) -> (M,) bool: each code equals one of the rows."""
    return torch.cdist(codes, rows).min(1).values < 1e-6


# ---------------------------------------------------------------------------------------------
# sample_rows
# ---------------------------------------------------------------------------------------------


def test_sample_rows_with_fewer_rows_than_draws_puts_the_valid_rows_first():
    x = torch.randn(2, 3, DIM)
    valid = torch.tensor([[True, False, True], [True, True, True]])
    samples, found = sample_rows(x, valid, 5)
    assert samples.shape == (2, 5, DIM) and found.tolist() == [2, 3]
    for h in range(2):
        drawn = samples[h, : found[h]]
        assert is_row_of(drawn, x[h][valid[h]]).all()
        assert torch.cdist(drawn, drawn).add(torch.eye(len(drawn))).min() > 0  # without replacement


def test_sample_rows_under_sync_merges_every_ranks_candidates_by_key(monkeypatch):
    """A second rank (faked by the gather) offers two rows with keys above any of this rank's
    (uniform in [0, 1)): they are drawn first, then this rank's valid rows; without sync nothing is
    gathered."""
    x = torch.randn(1, 3, DIM)
    valid = torch.tensor([[True, True, False]])
    other_rows = torch.randn(1, 5, DIM)
    other_keys = torch.tensor([[1.5, 1.25, -1.0, -1.0, -1.0]])
    gathered = []

    def gather(t):
        gathered.append(t.shape)
        return torch.cat([t, torch.cat([other_keys.unsqueeze(-1), other_rows], -1)], 1)

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_rows", gather)
    samples, found = sample_rows(x, valid, 5, sync=True)
    assert gathered == [(1, 5, DIM + 1)] and found.tolist() == [4]
    torch.testing.assert_close(samples[0, :2], other_rows[0, :2], rtol=0, atol=0)
    assert is_row_of(samples[0, 2:4], x[0, :2]).all() and not torch.equal(samples[0, 2], samples[0, 3])

    samples, found = sample_rows(x, valid, 5)  # sync is off by default
    assert len(gathered) == 1 and found.tolist() == [2]


# ---------------------------------------------------------------------------------------------
# k-means initialisation
# ---------------------------------------------------------------------------------------------


def test_kmeans_on_fewer_rows_than_clusters_gives_each_row_its_own_mean():
    """Every mean is a valid row (the initial draws repeat cyclically; ties go to the lowest index),
    every valid row is a mean with count 1, the other means count 0."""
    x = torch.randn(2, 6, DIM)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, 5] = valid[1, :2] = False
    means, counts = kmeans(x, valid, CODES, 2)
    assert means.shape == (2, CODES, DIM) and counts.shape == (2, CODES)
    for h in range(2):
        rows = x[h][valid[h]]
        assert is_row_of(means[h], rows).all() and is_row_of(rows, means[h]).all()
        assert sorted(counts[h].tolist()) == [0.0] * (CODES - len(rows)) + [1.0] * len(rows)


def lloyd_float64(x, valid, means, num_iters, metric):
    """Dense float64 Lloyd iterations from the given initial means (the oracle)."""
    x, means = x.double(), means.double()
    counts = None
    for _ in range(num_iters):
        if metric == "cosine":
            scores = -torch.einsum("hnd,hkd->hnk", x, torch.nn.functional.normalize(means, dim=-1))
        else:
            scores = torch.cdist(x, means)
        one_hot = torch.nn.functional.one_hot(scores.argmin(-1), means.shape[1]).double() * valid.unsqueeze(-1)
        counts, sums = one_hot.sum(1), torch.einsum("hnk,hnd->hkd", one_hot, x)
        new = sums / counts.clamp_min(1.0).unsqueeze(-1)
        if metric == "cosine":
            new = torch.nn.functional.normalize(new, dim=-1)
        means = torch.where((counts == 0).unsqueeze(-1), means, new)
    return means, counts


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_matches_dense_float64_lloyd_from_the_same_draws(metric):
    """Rows of several norms (so that cosine and l2 assignments differ), a masked row per head."""
    x = torch.randn(2, 40, DIM) * torch.rand(2, 40, 1).mul(4).add(0.2)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[:, 3] = False
    torch.manual_seed(5)
    means, counts = kmeans(x, valid, 6, 3, metric=metric)
    torch.manual_seed(5)
    samples, found = sample_rows(x, valid, 6)
    expected_means, expected_counts = lloyd_float64(x, valid, samples, 3, metric)
    torch.testing.assert_close(means, expected_means.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, expected_counts.float()) and counts.sum().item() == 2 * 39


def test_kmeans_passes_its_precision_and_backend_to_the_search():
    x, valid = torch.randn(1, 8, DIM), torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="precision"):
        kmeans(x, valid, 2, 1, precision="fp8")
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, valid, 2, 1, backend="abacus")


def test_kmeans_under_sync_draws_and_sums_over_the_ranks(monkeypatch):
    """A second rank (faked) with the same statistics and no rows to offer: the means are the
    unsynced run's, the counts twice its counts, one gather and one all_reduce per iteration."""
    x, valid = torch.randn(1, 30, DIM), torch.ones(1, 30, dtype=torch.bool)
    torch.manual_seed(2)
    single_means, single_counts = kmeans(x, valid, 5, 2)
    calls = {"gather": 0, "reduce": 0}

    def gather(t):
        calls["gather"] += 1
        return torch.cat([t, torch.full_like(t, -1.0)], 1)

    def reduce(*tensors):
        calls["reduce"] += 1
        for t in tensors:
            t.mul_(2)

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_gather_rows", gather)
    monkeypatch.setattr(distributed, "all_reduce_sum_", reduce)
    torch.manual_seed(2)
    means, counts = kmeans(x, valid, 5, 2, sync=True)
    assert calls == {"gather": 1, "reduce": 2}
    torch.testing.assert_close(means, single_means, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts, 2 * single_counts)


@pytest.fixture
def kmeans_calls(monkeypatch):
    """The (num_clusters, num_iters) and keywords of every k-means the Codebook runs, under
    torch.distributed faked as one rank whose all_reduce changes nothing."""
    import fastvq.nn.codebook as codebook_module

    calls = []

    def recorded(*args, **kwargs):
        calls.append((args[2:], kwargs))
        return kmeans(*args, **{**kwargs, "sync": False})

    monkeypatch.setattr(codebook_module, "kmeans", recorded)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_sum_", lambda *tensors: None)
    return calls


@pytest.mark.parametrize(
    "options,expected",
    [
        (dict(sync_codebook=False), dict(metric="l2", sync=False)),
        (dict(sync_codebook=False, use_cosine_sim=True), dict(metric="cosine", sync=False)),
        ({}, dict(metric="l2", sync=True)),  # sync_codebook and sync_kmeans are on by default
        (dict(sync_codebook=True, sync_kmeans=False), dict(metric="l2", sync=False)),
    ],
    ids=["l2", "cosine", "synced", "sync-kmeans-off"],
)
def test_kmeans_init_searches_with_the_layers_metric_precision_backend_and_sync(kmeans_calls, options, expected):
    """Under torch.distributed k-means spans the ranks unless sync_codebook or sync_kmeans is off."""
    layer = VectorQuantize(
        dim=DIM, codebook_size=CODES, kmeans_init=True, kmeans_iters=3, precision="ieee", backend="torch", **options
    )
    layer(torch.randn(2, 20, DIM))
    layer(torch.randn(2, 20, DIM))  # initialised: no second k-means
    assert kmeans_calls == [((CODES, 3), dict(expected, precision="ieee", backend="torch"))]


def test_a_synced_codebook_syncs_its_kmeans_unless_told_not_to(kmeans_calls):
    for sync_kmeans in (None, False):
        options = {} if sync_kmeans is None else dict(sync_kmeans=sync_kmeans)
        Codebook(DIM, CODES, kmeans_init=True, sync_codebook=True, **options).init_embed_(torch.randn(1, 20, DIM))
    assert [kwargs["sync"] for _, kwargs in kmeans_calls] == [True, False]


# ---------------------------------------------------------------------------------------------
# dead codes
# ---------------------------------------------------------------------------------------------


def with_cluster_sizes(layer, sizes):
    """layer with its cluster_size (H, K) set to sizes through the state_dict."""
    state = layer.state_dict()
    state["_codebook.cluster_size"] = sizes
    layer.load_state_dict(state)
    return layer


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
def test_dead_codes_are_replaced_by_distinct_unmasked_tokens_with_matching_statistics(cosine):
    threshold = 2.5
    layer = VectorQuantize(
        dim=2 * DIM,
        codebook_size=CODES,
        codebook_dim=DIM,
        heads=2,
        separate_codebook_per_head=True,
        use_cosine_sim=cosine,
        threshold_ema_dead_code=threshold,
    )
    sizes = torch.full((2, CODES), 4.0)
    sizes[0, [1, 5, 6]] = 1.0
    sizes[1, 9] = 2.0
    layer = with_cluster_sizes(layer, sizes)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, mask = torch.randn(2, 7, 2 * DIM), torch.rand(2, 7) > 0.3
    layer.eval().expire_codes_(x, mask)  # eval: nothing replaced
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    layer.train().expire_codes_(x, mask)

    state = layer.state_dict()
    dead = sizes < threshold
    tokens = rows_of(x[mask], heads=2)
    if cosine:
        tokens = torch.nn.functional.normalize(tokens, dim=-1)
    for h in range(2):
        new = state["_codebook.embed"][h, dead[h]]
        assert is_row_of(new, tokens[h]).all()
        assert torch.cdist(new, new).add(torch.eye(len(new))).min() > 0  # distinct draws
    torch.testing.assert_close(state["_codebook.cluster_size"], torch.where(dead, threshold, sizes))
    torch.testing.assert_close(
        state["_codebook.embed_avg"][dead], state["_codebook.embed"][dead] * threshold, rtol=1e-6, atol=1e-6
    )
    for key in ("_codebook.embed", "_codebook.embed_avg"):
        assert torch.equal(state[key][~dead], before[key][~dead]), key
    health = layer.codebook_health()
    assert int(health["dead_codes"]) == 4 and int(health["replaced_codes"]) == 4


# ---------------------------------------------------------------------------------------------
# EMA step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_an_ema_weight_tensor_of_another_dtype_acts_as_its_fp32_values(dtype):
    layer = VectorQuantize(dim=DIM, codebook_size=CODES, decay=0.6).train()
    twin = VectorQuantize(dim=DIM, codebook_size=CODES, decay=0.6).train()
    twin.load_state_dict(layer.state_dict())
    weight, x = torch.linspace(0.0, 1.0, CODES), torch.randn(2, 12, DIM)
    layer(x, ema_update_weight=weight.to(dtype))
    twin(x, ema_update_weight=weight.to(dtype).float())
    for key, value in twin.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
        assert layer.state_dict()[key].dtype == value.dtype, key
