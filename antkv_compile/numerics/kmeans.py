"""Weighted k-means (Lloyd), batched over many independent groups of points.

Token-aware centroids: each calibration token carries a sensitivity weight, and the objective is
sum_j w_j ||x_j - c(x_j)||^2. Groups are (KV head x sub-space) problems solved together.
"""
from __future__ import annotations

import torch
from torch import Tensor

_CHUNK = 2048


def assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid. x [G, N, d], centroids [G, M, d] -> [G, N] long."""
    out = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    c2 = (centroids * centroids).sum(-1)[:, None, :]
    ct = centroids.transpose(1, 2)
    for s in range(0, x.shape[1], _CHUNK):
        xs = x[:, s:s + _CHUNK]
        out[:, s:s + _CHUNK] = torch.baddbmm(c2, xs, ct, alpha=-2.0).argmin(-1)
    return out


def weighted_kmeans(
    x: Tensor,
    weights: Tensor | None,
    num_centroids: int,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """x [G, N, d], weights [G, N] (>= 0, None = uniform) -> centroids [G, M, d] (float32)."""
    x = x.float()
    g, n, d = x.shape
    w = torch.ones(g, n, device=x.device) if weights is None else weights.float().clamp_min(0)
    w = w + 1e-12 * w.mean(-1, keepdim=True).clamp_min(1e-30)  # every point can seed
    m = num_centroids
    if n < m:
        raise ValueError(f"k-means needs at least {m} points per group, got {n}: calibrate on more text")
    seeds = torch.multinomial(w.cpu().double(), m, replacement=False, generator=generator).to(x.device)
    cents = torch.gather(x, 1, seeds[..., None].expand(g, m, d)).clone()
    for _ in range(iters):
        idx = assign(x, cents)
        mass = torch.zeros(g, m, device=x.device).scatter_add_(1, idx, w)
        sums = torch.zeros(g, m, d, device=x.device).scatter_add_(1, idx[..., None].expand(g, n, d), x * w[..., None])
        empty = mass <= 0
        cents = torch.where(empty[..., None], cents, sums / mass.clamp_min(1e-30)[..., None])
        if empty.any():
            # re-seed empty clusters at the points with the largest weighted error
            err = w * ((x - torch.gather(cents, 1, idx[..., None].expand(g, n, d))) ** 2).sum(-1)
            worst = err.topk(m, dim=1).indices
            cents = torch.where(empty[..., None], torch.gather(x, 1, worst[..., None].expand(g, m, d)), cents)
    return cents


def quantization_error(x: Tensor, weights: Tensor | None, centroids: Tensor) -> Tensor:
    """Weighted mean squared error per group [G]."""
    idx = assign(x.float(), centroids)
    err = ((x.float() - torch.gather(centroids, 1, idx[..., None].expand(*idx.shape, x.shape[-1]))) ** 2).sum(-1)
    w = torch.ones_like(err) if weights is None else weights.float()
    return (w * err).sum(-1) / w.sum(-1)
