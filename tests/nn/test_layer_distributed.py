"""Codebook sync under torch.distributed: 2 CPU processes with gloo, each on half of every batch.

Deterministic updates (EMA with masks and a non-finite token) must give every rank the codebook
of a single process trained on the whole batches, with one all_reduce per step, also when one
rank gets no token at all; with sync_affine_param, the affine batch statistics too (two more
all_reduces per step). With k-means init and dead-code replacement (random draws) every rank
must hold the same codebook.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvq.nn.vector_quantize import VectorQuantize

WORLD, STEPS, DIM, CODES = 2, 3, 8, 16
SCENARIOS = {
    "ema": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True, decay=0.7),
    "kmeans-dead-codes": dict(
        kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.0, decay=0.5, use_cosine_sim=True
    ),
    "affine-sync": dict(
        heads=2, codebook_dim=4, separate_codebook_per_head=True, affine_param=True, sync_affine_param=True
    ),
}


def batches():
    """STEPS full batches (x (4, 6, DIM), mask (4, 6)) with one non-finite token per batch."""
    generator = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        x = torch.randn(4, 6, DIM, generator=generator)
        x[3, 1, 2] = float("nan")
        mask = torch.rand(4, 6, generator=generator) > 0.2
        out.append((x, mask))
    return out


def train(kwargs, data, rank=0, world=1, empty_rank=None):
    """Train on this rank's share of each batch: half of it, or with `empty_rank` all of it on the
    other rank and no token at all on that one."""
    torch.manual_seed(1)  # same initial codebook everywhere
    layer = VectorQuantize(dim=DIM, codebook_size=CODES, backend="torch", **kwargs).train()
    torch.manual_seed(100 + rank)  # ranks draw different random numbers
    for x, mask in data:
        if empty_rank is None:
            layer(x.chunk(world)[rank], mask=mask.chunk(world)[rank])
        else:
            share = slice(0, 0) if rank == empty_rank else slice(None)
            layer(x[share], mask=mask[share])
    return layer


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    calls = {"all_reduce": 0, "all_gather": 0}
    for name in calls:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        results = {}
        for scenario, kwargs in SCENARIOS.items():
            calls.update(all_reduce=0, all_gather=0)
            layer = train(kwargs, batches(), rank, WORLD)
            results[scenario] = dict(
                state=layer.state_dict(), calls=dict(calls), nonfinite=int(layer.codebook_health()["nonfinite_tokens"])
            )
        calls.update(all_reduce=0, all_gather=0)
        layer = train(SCENARIOS["ema"], batches(), rank, WORLD, empty_rank=1)  # a rank with no token
        results["empty-rank"] = dict(state=layer.state_dict(), calls=dict(calls))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_share_one_codebook(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = train(SCENARIOS["ema"], batches())
    for r, result in enumerate(ranks):
        ema = result["ema"]
        assert ema["calls"] == {"all_reduce": STEPS, "all_gather": 0}, f"rank {r}: {ema['calls']}"
        assert ema["nonfinite"] == STEPS  # both ranks count the token of rank 1
        for key, expected in single.state_dict().items():
            torch.testing.assert_close(
                ema["state"][key], expected, rtol=1e-5, atol=1e-6, msg=lambda m, key=key, r=r: f"rank {r} {key}: {m}"
            )

        empty = result["empty-rank"]
        assert empty["calls"] == {"all_reduce": STEPS, "all_gather": 0}, f"rank {r}: {empty['calls']}"
        for key, expected in single.state_dict().items():
            torch.testing.assert_close(empty["state"][key], expected, rtol=1e-5, atol=1e-6)

    single = train(SCENARIOS["affine-sync"], batches())
    for r, result in enumerate(ranks):
        affine = result["affine-sync"]
        assert affine["calls"] == {"all_reduce": 3 * STEPS, "all_gather": 0}, f"rank {r}: {affine['calls']}"
        assert affine["state"].keys() == single.state_dict().keys()
        for key, expected in single.state_dict().items():
            torch.testing.assert_close(affine["state"][key], expected, rtol=1e-5, atol=1e-6)

    reference = ranks[0]["kmeans-dead-codes"]["state"]
    assert bool(reference["_codebook.initted"]) and torch.isfinite(reference["_codebook.embed"]).all()
    for key, value in ranks[1]["kmeans-dead-codes"]["state"].items():
        assert torch.equal(value, reference[key]), f"ranks hold different {key}"
