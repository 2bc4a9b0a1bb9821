"""Random codebooks and inputs shared by the numerics tests."""
from __future__ import annotations

import torch

from antkv_compile.config import get_preset
from antkv_compile.numerics.vq import Codebook, random_codebook


def codebook_with_transform(bits: str, heads: int, head_dim: int, seed: int = 0, shared: bool = False) -> Codebook:
    """A random codebook with a non-trivial, well-conditioned coding-space map and mean."""
    g = torch.Generator().manual_seed(seed)
    h = 1 if shared else heads
    base = random_codebook(get_preset(bits), h, head_dim, generator=g)
    a = torch.randn(h, head_dim, head_dim, generator=g) / head_dim**0.5 + 2 * torch.eye(head_dim)
    return Codebook(base.centroids, a, torch.linalg.inv(a), torch.randn(h, head_dim, generator=g))


def randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
