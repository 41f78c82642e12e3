"""`RandomProjectionQuantizer`: a drop-in for vector-quantize-pytorch 1.32.0's BEST-RQ target
quantizer (Chiu et al. 2022, arXiv:2202.01855): frozen random projections of layer-normalised
input, each quantized against its own random cosine codebook by a `fastvq.VectorQuantize` (fused
search and cross-entropy, never an N x K matrix). Same arguments, outputs and state_dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from .arguments import check_arguments, describe
from .vector_quantize import VectorQuantize


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ targets; arguments as vector-quantize-pytorch 1.32.0 (the rest, `backend` and
    `precision` included, go to the `VectorQuantize`).

    x (B, N, dim), any float dtype (the projection runs in fp32), is layer-normalised (norm=True, no
    affine parameters) and projected by `rand_projs` (num_codebooks, dim, codebook_dim), a
    Xavier-normal buffer that is never trained. The num_codebooks projections are quantized, each
    against its own codebook, by `vq`: a VectorQuantize with heads=num_codebooks, separate codebooks
    and the cosine metric, always run in eval mode (the codebooks stay random). forward(x) -> indices
    (B, N, num_codebooks) int64; forward(x, indices) -> the mean cross-entropy () float32 of the code
    logits against those target indices.

    As in 1.32.0, `vq` gets dim = num_codebooks * codebook_dim and keeps VectorQuantize's default
    codebook_dim (= its dim), so it projects each token with a learnable Linear (`vq.project_in`)
    to num_codebooks codes of num_codebooks * codebook_dim each: kept for checkpoint compatibility.
    """

    def __init__(self, *, dim, codebook_size, codebook_dim, num_codebooks=1, norm=True, **kwargs):
        super().__init__()
        check_arguments(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks)
        if codebook_dim is None:
            raise ValueError("codebook_dim must be an int >= 1, got None")
        check_arguments(codebook_dim=codebook_dim)
        self.dim, self.num_codebooks = dim, num_codebooks
        self.register_buffer("rand_projs", nn.init.xavier_normal_(torch.empty(num_codebooks, dim, codebook_dim)))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        self.vq = VectorQuantize(
            dim=codebook_dim * num_codebooks,
            heads=num_codebooks,
            codebook_size=codebook_size,
            use_cosine_sim=True,
            separate_codebook_per_head=True,
            **kwargs,
        )

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim) -> indices (B, N, num_codebooks) int64; with target indices of that shape,
        the mean cross-entropy () float32 of the code logits against them instead."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a floating-point tensor (B, N, dim={self.dim}), got {describe(x)}")
        projected = torch.einsum("bnd,hde->bnhe", self.norm(x.float()), self.rand_projs.float()).flatten(2)
        self.vq.eval()
        if indices is not None:
            _, cross_entropy = self.vq(projected, indices=indices)
            return cross_entropy
        _, codes, _ = self.vq(projected)
        return codes
