"""The models' constructors refuse bad arguments with a ValueError naming the argument, before
anything is built (a negative width crashed deep inside torch; a string 'False' switched an option
on; some out-of-range values were accepted and failed later or never)."""

import pytest
import torch

from fastvq.models import VQGAN, VQVAE, CodePrior, LatentDiffusion
from fastvq.models.checks import check_choice, check_int, check_number

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")

PRIOR = {"num_codes": 8, "grid": (2, 2), "dim": 16, "depth": 1, "heads": 2}
DIFFUSION = {"channels": 2, "width": 8}
VQVAE_SMALL = {"channels": 8, "res_channels": 4, "num_res_blocks": 1, "codebook_dim": 4, "codebook_size": 8}
VQGAN_SMALL = {
    "channels": 8,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "z_channels": 8,
    "norm_groups": 4,
    "codebook_dim": 4,
    "codebook_size": 8,
    "disc_channels": 8,
    "disc_layers": 1,
}

CASES = [
    (CodePrior, PRIOR, "num_codes", 0, r"num_codes must be an int >= 1, got 0"),
    (CodePrior, PRIOR, "dim", -16, r"dim must be an int >= 1, got -16"),
    (CodePrior, PRIOR, "heads", 0, r"heads must be an int >= 1, got 0"),
    (CodePrior, PRIOR, "depth", 0, r"depth must be an int in \[1, 1000\], got 0"),
    (CodePrior, PRIOR, "depth", 10**6, r"depth must be an int in \[1, 1000\], got 1000000"),
    (CodePrior, PRIOR, "depth", 2.0, r"depth must be an int in \[1, 1000\], got 2.0"),
    (CodePrior, PRIOR, "mlp_ratio", -1.0, r"mlp_ratio must be a finite number >= 0.0625, got -1.0"),
    (CodePrior, PRIOR, "mlp_ratio", NAN, r"mlp_ratio must be a finite number >= 0.0625, got nan"),
    (CodePrior, PRIOR, "dropout", 1.0, r"dropout must be a finite number in \[0, 1\), got 1.0"),
    (CodePrior, PRIOR, "num_classes", True, r"num_classes must be an int >= 0, got True"),
    (LatentDiffusion, DIFFUSION, "channels", 0, r"channels must be an int >= 1, got 0"),
    (LatentDiffusion, DIFFUSION, "width", 12, r"width must be a positive multiple of 8"),
    (LatentDiffusion, DIFFUSION, "num_classes", -1, r"num_classes must be an int >= 0, got -1"),
    (LatentDiffusion, DIFFUSION, "steps", 1, r"steps must be an int >= 2, got 1"),
    (LatentDiffusion, DIFFUSION, "schedule", ["linear"], r"schedule must be one of 'linear', 'cosine', got"),
    (LatentDiffusion, DIFFUSION, "label_dropout", -0.1, r"label_dropout must be a finite number in \[0, 1\)"),
    (VQVAE, VQVAE_SMALL, "channels", -8, r"channels must be an int >= 1, got -8"),
    (VQVAE, VQVAE_SMALL, "res_channels", 0, r"res_channels must be an int >= 1, got 0"),
    (VQVAE, VQVAE_SMALL, "num_res_blocks", -1, r"num_res_blocks must be an int in \[0, 64\], got -1"),
    (VQVAE, VQVAE_SMALL, "downsample", 6, r"downsample must be a power of two >= 2, got 6"),
    (VQVAE, VQVAE_SMALL, "downsample", 2**20, r"downsample must be an int in \[2, 256\]"),
    (VQVAE, VQVAE_SMALL, "codebook_size", 0, r"codebook_size must be an int >= 1, got 0"),
    (VQVAE, VQVAE_SMALL, "codebook_dim", "8", r"codebook_dim must be an int >= 1, got '8'"),
    (VQVAE, VQVAE_SMALL, "decay", 1.5, r"decay must be a finite number in \[0, 1\], got 1.5"),
    (VQVAE, VQVAE_SMALL, "commitment_weight", NAN, r"commitment_weight must be a finite number >= 0, got nan"),
    (VQVAE, VQVAE_SMALL, "kmeans_init", "False", r"kmeans_init must be True or False, got 'False'"),
    (VQVAE, VQVAE_SMALL, "rotation_trick", 0, r"rotation_trick must be True or False, got 0"),
    (VQVAE, VQVAE_SMALL, "threshold_ema_dead_code", -2, r"threshold_ema_dead_code must be a finite number >= 0"),
    (VQGAN, VQGAN_SMALL, "channels", -8, r"channels must be an int >= 1, got -8"),
    (VQGAN, VQGAN_SMALL, "ch_mult", "12", r"ch_mult must be a list of 1 to 8 ints >= 1, got '12'"),
    (VQGAN, VQGAN_SMALL, "ch_mult", [1] * 9, r"ch_mult must be a list of 1 to 8 ints >= 1"),
    (VQGAN, VQGAN_SMALL, "ch_mult", [1, 0], r"every ch_mult entry must be an int >= 1, got 0"),
    (VQGAN, VQGAN_SMALL, "num_res_blocks", 0, r"num_res_blocks must be an int in \[1, 64\], got 0"),
    (VQGAN, VQGAN_SMALL, "num_attn_levels", 3, r"num_attn_levels must be an int in \[0, 2\], got 3"),
    (VQGAN, VQGAN_SMALL, "dropout", NAN, r"dropout must be a finite number in \[0, 1\), got nan"),
    (VQGAN, VQGAN_SMALL, "disc_layers", 9, r"disc_layers must be an int in \[1, 8\], got 9"),
    (VQGAN, VQGAN_SMALL, "disc_start", -1, r"disc_start must be an int >= 0, got -1"),
    (VQGAN, VQGAN_SMALL, "pixel_loss", "l3", r"pixel_loss must be one of 'l1', 'l2', got 'l3'"),
    (VQGAN, VQGAN_SMALL, "disc_weight", float("inf"), r"disc_weight must be a finite number >= 0, got inf"),
]


@pytest.mark.parametrize(
    "cls,base,name,value,message", CASES, ids=[f"{c.__name__}-{n}={v!r}" for c, _, n, v, _ in CASES]
)
def test_a_bad_argument_is_named_before_anything_is_built(cls, base, name, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        with torch.device("meta"):  # nothing real is allocated, whatever the arguments ask for
            cls(**{**base, name: value})


@pytest.mark.parametrize(
    "cls,base", [(CodePrior, PRIOR), (LatentDiffusion, DIFFUSION), (VQVAE, VQVAE_SMALL), (VQGAN, VQGAN_SMALL)]
)
def test_good_arguments_build_and_their_config_is_kept(cls, base):
    model = cls(**base)
    assert sum(p.numel() for p in model.parameters()) > 0
    if hasattr(model, "config"):
        assert all(model.config[k] == (list(v) if isinstance(v, tuple) else v) for k, v in base.items())


def test_check_helpers_say_the_range_and_refuse_bools_and_non_finite_numbers():
    with pytest.raises(ValueError, match=r"^k must be an int in \[1, 3\], got True$"):
        check_int("k", True, 1, 3)
    with pytest.raises(ValueError, match=r"^x must be a finite number in \[0, 1\), got 1$"):
        check_number("x", 1, 0.0, 1.0, below_maximum=True)
    with pytest.raises(ValueError, match=r"^x must be a finite number, got inf$"):
        check_number("x", float("inf"))
    with pytest.raises(ValueError, match=r"^mode must be one of 1, 2, got True$"):
        check_choice("mode", True, (1, 2))  # True == 1, but it is not the int 1
    check_int("k", 3, 1, 3)
    check_number("x", 0, 0.0, 1.0, below_maximum=True)
    check_choice("mode", 2, (1, 2))
