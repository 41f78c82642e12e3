"""Checkpoints are data: a file whose checksum was recomputed after tampering (the checksum is no
signature) is checked before use. Its metadata must fit a schema and describe the tensors the
file holds before anything is allocated, so a few kilobytes cannot exhaust memory; whatever is
wrong, `fastvq.load`, `fastvq sample` and `fastvq train --resume` raise the one documented
`CheckpointError` naming the file (issue 24 items 2 and 6)."""

import copy
import json
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PEAK_RSS_SOURCE
from tiny_runs import diffusion_run, image_folder, prior_run, run, tokenizer_run  # noqa: F401 (fixtures)

import fastvq
from fastvq.app import checkpoint
from fastvq.app.config import make_config
from fastvq.app.errors import CheckpointError
from fastvq.app.state import CHECKPOINT, restore_training_state, save_training_state
from fastvq.models import VQVAE

pytestmark = pytest.mark.usefixtures("one_thread")

SMALLEST = {"channels": 2, "res_channels": 1, "num_res_blocks": 0, "codebook_dim": 1, "codebook_size": 2}


def tiny_checkpoint(path, **model_args):
    """A real training checkpoint of the smallest VQ-VAE, with its metadata's model arguments
    replaced by ``model_args`` (checksum recomputed): about 5 KB."""
    config = make_config("vqvae", image_size=16, model_args=SMALLEST)
    save_training_state(path, VQVAE(**SMALLEST), [], 0, {}, config)
    tensors, meta = checkpoint.load(path)
    meta["model_config"].update(model_args)
    meta["config"]["model_args"].update(model_args)
    checkpoint.save(path, tensors, meta)
    return path


def tampered(source, path, edit):
    """A copy of checkpoint ``source`` with ``edit(meta)`` applied and its checksum recomputed."""
    tensors, meta = checkpoint.load(source)
    edit(meta)
    checkpoint.save(path, tensors, meta)
    return path


def test_a_few_kilobytes_cannot_ask_for_a_huge_codebook(tmp_path):
    """The model was built from the metadata before any tensor was compared: this 8.7 KB file
    grew the peak memory by 276 MiB (linear in the asked size; 2^40 codes died in the allocator).
    Now the model is built on the meta device and compared with the header first: 2 MiB."""
    path = tiny_checkpoint(tmp_path / "huge.safetensors", codebook_size=2**22, codebook_dim=8)
    assert path.stat().st_size < 16_000
    script = PEAK_RSS_SOURCE + (
        "import sys, fastvq, torch\n"
        "import fastvq.app.cli\n"  # every module loading imports, before the measurement
        "from fastvq.app.errors import CheckpointError\n"
        "torch.zeros(1); before = peak_rss()\n"
        "try:\n    fastvq.load(sys.argv[1])\nexcept CheckpointError as err:\n    print(err)\n"
        "print((peak_rss() - before) // 2**20)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    message, grown_mib = done.stdout.strip().rsplit("\n", 1)
    assert int(grown_mib) < 32, f"loading grew the peak memory by {grown_mib} MiB"
    assert message.startswith(f"checkpoint {path} does not fit a vqvae with quantizer 'fastvq': ")
    assert "in the file, float32 (8, 2, 1, 1) in the model" in message  # the first of the shapes that differ


@pytest.mark.parametrize("codebook_size", [2**40, 2**62, 0, -3])
def test_an_impossible_codebook_is_a_clear_error_everywhere(capsys, tmp_path, codebook_size):
    path = tiny_checkpoint(tmp_path / "bad.safetensors", codebook_size=codebook_size)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} "):
        fastvq.load(path)
    for argv in (["eval", "--ckpt", path, "--data", "builtin"], ["sample", "--ckpt", path]):
        code, text = run(capsys, *argv, "--no-progress")
        assert code == 2 and f"error: checkpoint {path} " in text, text


def test_tensors_must_fit_the_model_of_the_metadata(tmp_path, tokenizer_run):
    tensors, meta = checkpoint.load(tokenizer_run / CHECKPOINT)
    name = "model.quantizer._codebook.embed"
    for label, edit in (
        ("extra", lambda t: t.update({"model.extra": torch.zeros(3)})),
        ("missing", lambda t: t.pop(name)),
        ("shape", lambda t: t.update({name: t[name][:, :4]})),
        ("dtype", lambda t: t.update({name: t[name].double()})),
    ):
        changed = dict(tensors)
        edit(changed)
        path = tmp_path / f"{label}.safetensors"
        checkpoint.save(path, changed, meta)
        with pytest.raises(CheckpointError, match=rf"^checkpoint {path} does not fit a vqvae with quantizer"):
            fastvq.load(path)


def _deep(levels):
    value = 0
    for _ in range(levels):
        value = [value]
    return value


CRAFTED = [  # what the issue saw raise KeyError, TypeError, RuntimeError or RecursionError, and more
    ("no kind", lambda m: m.pop("kind"), "its metadata lacks ['kind']"),
    ("kind list", lambda m: m.update(kind=["vqvae"]), "kind is not a string"),
    ("unknown kind", lambda m: m.update(kind="gan"), "unknown kind 'gan'"),
    ("config list", lambda m: m.update(config=[1]), "config is not a mapping"),
    ("unknown setting", lambda m: m["config"].update(colour=1), "unknown settings ['colour']"),
    ("steps string", lambda m: m["config"].update(steps="10"), "steps must be an int, got '10'"),
    ("negative lr", lambda m: m["config"].update(lr=-1), "lr must be a finite number > 0"),
    ("channels", lambda m: m["model_config"].update(channels=-8), "channels must be an int >= 1, got -8"),
    ("channels string", lambda m: m["model_config"].update(channels="8"), 'channels="8": expected an int'),
    ("unknown argument", lambda m: m["model_config"].update(depth=2), "vqvae takes no argument ['depth']"),
    ("quantizer", lambda m: m["model_config"].update(quantizer="mine"), "quantizer 'mine' is not one of"),
    ("another model", lambda m: m["config"]["model_args"].update(channels=16), "describe another model"),
    ("step", lambda m: m.update(step=-1), "step -1 outside"),
    ("deep", lambda m: m.update(optimizers=_deep(500)), "nested deeper than 64 levels"),
    ("deep config", lambda m: m["config"].update(model_args={"channels": _deep(20)}), "expected an int"),
    (
        "no tensor",
        lambda m: m["optimizers"][0]["dict"][0][1].update(dict=[["0", {"tensor": "nope"}]]),
        "malformed optimizer state",
    ),
    ("skeleton", lambda m: m["optimizers"].__setitem__(0, {"dict": 5}), "malformed optimizer state"),
    ("optimizers", lambda m: m.update(optimizers=[]), "holds 0 optimizer states"),
    (
        "lr string",
        lambda m: m["optimizers"][0]["dict"][1][1]["list"][0]["dict"][0][1].update(value="x"),
        'optimizer setting lr = "x"',
    ),
    ("scaler", lambda m: m.update(scaler=[1]), "scaler is not none or a mapping"),
]


@pytest.mark.parametrize("label,edit,message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_tampered_metadata_is_a_checkpoint_error_in_load_and_resume(
    capsys, tmp_path, tokenizer_run, label, edit, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(tokenizer_run, run_dir)
    path = tampered(tokenizer_run / CHECKPOINT, run_dir / CHECKPOINT, edit)
    code, text = run(capsys, "train", "--out", run_dir, "--resume", "--steps", 3, "--no-progress")
    assert code == 2 and f"error: checkpoint {path} " in text and message in text, text
    load_only = label in ("no tensor", "skeleton", "optimizers", "lr string")  # what only a resume reads
    if not load_only:
        with pytest.raises(CheckpointError, match=rf"^checkpoint {path} "):
            fastvq.load(run_dir)


def test_restoring_a_state_of_other_shapes_is_refused_before_loading_anything(tmp_path, tokenizer_run):
    model = fastvq.load(tokenizer_run).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = torch.optim.Adam(model.parameters())
    tensors, meta = checkpoint.load(tokenizer_run / CHECKPOINT)
    for label, edit, message in (
        ("rng", lambda t: t.update({"rng.torch": t["rng.torch"][:10]}), "has no usable rng.torch"),
        ("history", lambda t: t.update({"history.loss": t["history.loss"][:1]}), "history.loss of shape (1,)"),
        ("moment", lambda t: t.update({"optim0.state.0.exp_avg": torch.zeros(3)}), "for parameter 0"),
    ):
        changed = dict(tensors)
        edit(changed)
        path = tmp_path / f"{label}.safetensors"
        checkpoint.save(path, changed, meta)
        with pytest.raises(CheckpointError, match=rf"^checkpoint {path} .*{re.escape(message)}"):
            restore_training_state(path, model, [adam])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not adam.state


def test_an_optimizer_state_that_is_not_a_state_and_param_groups_mapping_is_named(tmp_path, tokenizer_run):
    model = fastvq.load(tokenizer_run).train()
    tensors, meta = checkpoint.load(tokenizer_run / CHECKPOINT)
    meta["optimizers"][0] = {"dict": [["state", {"dict": []}]]}  # no param_groups
    path = tmp_path / "no-groups.safetensors"
    checkpoint.save(path, tensors, meta)
    with pytest.raises(CheckpointError) as refused:
        restore_training_state(path, model, [torch.optim.Adam(model.parameters())])
    assert str(refused.value) == (
        f"checkpoint {path} has a malformed optimizer state (not a state and param_groups mapping)"
    )


def mutations(meta, rng, count):
    """``count`` copies of ``meta``, each with one node of its JSON tree deleted or replaced by a
    hostile value (wrong types, huge and non-finite numbers, deep nesting, dangling skeletons); the
    node is drawn from a section other than the (large) optimizer states 4 times in 5."""
    hostile = [
        None,
        True,
        False,
        0,
        -1,
        1,
        7,
        2**40,
        2**63,
        -(2**63),
        1.5,
        1e308,
        float("nan"),
        float("inf"),
        "",
        "x",
        "vqgan",
        [],
        {},
        [1, 2],
        {"a": 1},
        {"tensor": "model.nope"},
        {"dict": [[1, {"value": 2}]]},
        {"list": 3},
        _deep(80),
        [[1]] * 3,
    ]
    copies = []
    for _ in range(count):
        mutated = copy.deepcopy(meta)
        parents = []
        stack = [mutated]
        while stack:
            node = stack.pop()
            keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
            for key in keys:
                parents.append((node, key))
                stack.append(node[key])
        section = rng.choice([k for k in mutated if k != "optimizers"] + ["optimizers"] * (rng.random() < 0.2))
        node, key = rng.choice([(n, k) for n, k in parents if _within(mutated, section, n, k)])
        if rng.random() < 0.2:
            del node[key]
        else:
            node[key] = copy.deepcopy(rng.choice(hostile))
        copies.append(mutated)
    return copies


def _within(meta, section, node, key):
    """Whether node[key] lies in meta[section] (or is it)."""
    if node is meta:
        return key == section
    stack = [meta[section]]
    while stack:
        item = stack.pop()
        if item is node:
            return True
        stack.extend(item.values() if isinstance(item, dict) else item if isinstance(item, list) else [])
    return False


@pytest.mark.parametrize("kind", ["tokenizer", "prior", "diffusion"])
def test_fuzzed_metadata_loads_or_raises_the_checkpoint_error(tmp_path, request, kind):
    """200 random one-node mutations of a real checkpoint's metadata per kind (checksum
    recomputed): `fastvq.load` gives a model or raises CheckpointError, nothing else."""
    source = request.getfixturevalue(f"{kind}_run") / CHECKPOINT
    tensors, meta = checkpoint.load(source)
    outcomes = {"loaded": 0, "refused": 0}
    for i, mutated in enumerate(mutations(meta, random.Random(kind), 200)):
        path = tmp_path / f"{i}.safetensors"
        checkpoint.save(path, tensors, mutated)
        try:
            fastvq.load(path)
            outcomes["loaded"] += 1
        except CheckpointError as err:
            assert str(err).startswith(f"checkpoint {path} "), err
            outcomes["refused"] += 1
        except Exception as err:  # the test's point: no other error escapes
            raise AssertionError(f"mutation {i} ({json.dumps(mutated)[:300]}...) raised {err!r}") from err
        path.unlink()
    assert outcomes["refused"] > 80 and outcomes["loaded"] > 0, outcomes


@pytest.mark.parametrize("kind", ["prior", "diffusion"])
def test_fuzzed_metadata_through_sample_and_resume(capsys, tmp_path, request, kind):
    """The command line on 8 mutations per kind: `sample` and `train --resume` exit 0, or 2 with
    a one-line error (the checkpoint error for most); no traceback."""
    source = request.getfixturevalue(f"{kind}_run")
    tensors, meta = checkpoint.load(source / CHECKPOINT)
    refused = {True: 0, False: 0}
    options = ["--steps", 2] if kind == "diffusion" else []
    for i, mutated in enumerate(mutations(meta, random.Random(f"cli-{kind}"), 8)):
        run_dir = tmp_path / str(i)
        shutil.copytree(source, run_dir)
        checkpoint.save(run_dir / CHECKPOINT, tensors, mutated)
        for argv in (
            ["sample", "--ckpt", run_dir, "--num", 2, *options, "--out", run_dir / "s.png"],
            ["train", "--out", run_dir, "--resume", "--steps", 2],
        ):
            try:
                code, text = run(capsys, *argv, "--no-progress")
            except Exception as err:
                raise AssertionError(
                    f"{argv[0]} on mutation {i} ({json.dumps(mutated)[:300]}...) raised {err!r}"
                ) from err
            # 2: the checkpoint error, or (a setting that is valid data but unusable here, as a
            # device or a tokenizer path) a one-line error naming it
            assert code == 0 or (code == 2 and text.count("error:") == 1 and "Traceback" not in text), (i, text)
            refused["checkpoint" in text and code == 2] += 1
        shutil.rmtree(run_dir)
    assert refused[True] >= 4, refused
