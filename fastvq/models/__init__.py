"""Reference VQ tokenizers wired to a swappable quantizer: ``VQVAE`` (van den Oord et al. 2017)
and ``VQGAN`` (Esser et al. 2021). Pass ``quantizer='fastvq' | 'vector-quantize-pytorch' |
'taming' | 'fsq' | 'simvq' | 'lfq'`` or a module; see ``fastvq.models.quantizers`` for the calling convention.
``CodePrior`` is an autoregressive prior over their codes, ``LatentDiffusion`` a diffusion model over their latents."""

from fastvq.models.base import VQModel
from fastvq.models.diffusion import LatentDiffusion
from fastvq.models.losses import PatchDiscriminator
from fastvq.models.lpips import LPIPS
from fastvq.models.prior import CodePrior
from fastvq.models.quantizers import QUANTIZERS, TamingQuantizer, make_quantizer
from fastvq.models.vqgan import VQGAN
from fastvq.models.vqvae import VQVAE

__all__ = [
    "CodePrior",
    "LPIPS",
    "LatentDiffusion",
    "QUANTIZERS",
    "PatchDiscriminator",
    "TamingQuantizer",
    "VQGAN",
    "VQModel",
    "VQVAE",
    "make_quantizer",
]
