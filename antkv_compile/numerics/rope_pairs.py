"""RoPE-pair sub-spaces: the key layout that lets a kernel decode pre-RoPE codes and rotate them in registers.

RoPE (Hugging Face ``rotate_half`` convention) rotates each *pair* of dims ``(j, j + D/2)`` by the angle
``position * inv_freq[j]``. A product quantizer whose every sub-space is made of whole pairs, with a coding map
that only permutes dims, decodes a token's pre-RoPE key sub-space by sub-space; the kernel then rotates each
decoded pair by the token's position and takes the dot with the (post-RoPE) query. No per-token dense map.

Layout (what :func:`pair_layout` recognises and :func:`pair_transform` builds): the key codebook's
``transform`` [H, D, D] is a permutation matrix (``x' = x @ transform``) such that coding dims
``s * sd + 2 i`` and ``s * sd + 2 i + 1`` are the real and imaginary parts of pair ``pairs[s * sd / 2 + i]``,
i.e. model dims ``j`` and ``j + D / 2``. ``pairs`` [H, D / 2] is a permutation of ``0 .. D/2 - 1`` per head.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pair_transform", "pair_layout", "is_pair_layout"]


def pair_transform(pairs: Tensor) -> tuple[Tensor, Tensor]:
    """(transform, inverse) [H, D, D] for a pair order ``pairs`` [H, D/2] (see the module docstring)."""
    if pairs.dim() != 2:
        raise ValueError(f"pairs must be [heads, D/2], got {tuple(pairs.shape)}")
    h, half = pairs.shape
    d = 2 * half
    for row in pairs.tolist():
        if sorted(row) != list(range(half)):
            raise ValueError(f"each row of pairs must be a permutation of 0..{half - 1}, got {row}")
    transform = torch.zeros(h, d, d)
    coding = torch.arange(half)
    for head in range(h):
        j = pairs[head].long()
        transform[head, j, 2 * coding] = 1.0
        transform[head, j + half, 2 * coding + 1] = 1.0
    return transform, transform.transpose(1, 2).contiguous()


def pair_layout(transform: Tensor, sub_dim: int) -> Tensor | None:
    """The pair order [H, D/2] if ``transform`` [H, D, D] is a pair-layout permutation whose sub-spaces of
    ``sub_dim`` coding dims hold whole pairs, else None."""
    if transform.dim() != 3 or transform.shape[1] != transform.shape[2] or sub_dim % 2:
        return None
    h, d, _ = transform.shape
    half = d // 2
    t = transform.detach().float().cpu()
    if not torch.equal(t, (t == 1).float()) or not torch.equal(t.sum(1), torch.ones(h, d)) \
            or not torch.equal(t.sum(2), torch.ones(h, d)):
        return None
    src = t.argmax(1)  # [H, D]: model dim feeding each coding dim
    re, im = src[:, 0::2], src[:, 1::2]
    if not (torch.all(re < half) and torch.equal(im, re + half)):
        return None
    return re.long()


def is_pair_layout(codebook, sub_dim: int | None = None) -> bool:
    """Whether a key :class:`~antkv_compile.numerics.vq.Codebook` is in the RoPE-pair layout."""
    return pair_layout(codebook.transform, sub_dim or codebook.sub_dim) is not None
