"""Learning a :class:`Codebook` from calibration vectors and their sensitivity weights.

Two ingredients beyond plain k-means:

* **A metric-aware coding space.** Keys matter only through q·k, so the error that counts is
  E_q[(q·dk)^2] = dk^T Σ_q dk with Σ_q the covariance of the queries that read them; values
  matter through the output projection, dv^T W_o^T W_o dv. Mapping x -> (x - mean) L with
  L L^T = Σ turns that into plain squared distance, so k-means minimizes the right error. The
  space is then rotated to the principal axes of the (weighted) data and the axes are dealt to
  sub-spaces so that each sub-space gets a similar share of the variance (OPQ's parametric
  allocation): product quantization wastes bits when one sub-space holds most of the energy.
* **Token-aware weights.** Each token's squared error is weighted by its first-order sensitivity
  (see :func:`antkv_compile.numerics.anchor_score.weights_for_calibration`).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import VQPreset
from .kmeans import assign, weighted_kmeans
from .vq import Codebook


@dataclasses.dataclass(frozen=True)
class LearningOptions:
    weighted: bool = True  # token-aware (sensitivity-weighted) k-means
    metric: bool = True  # use the attention metric (query covariance / W_o Gram) for the coding space
    rotate: bool = True  # principal axes + balanced allocation to sub-spaces
    shared: bool = False  # one codebook for all KV heads of a layer
    iters: int = 20
    weight_clip: float = 0.999  # clip weights at this quantile (one sink token must not own a codebook)
    weight_power: float = 1.0  # weights ** power (< 1 flattens the sensitivity weighting)
    metric_center: bool = False  # drop the mean query from the key metric (softmax ignores shared shifts)
    regularization: float = 1e-3  # relative ridge added to the metric


def _sqrt_psd(m: Tensor, ridge: float) -> Tensor:
    """L with L L^T = m + ridge * mean(diag) * I, for each [D, D] in a batch."""
    m = m.double()
    d = m.shape[-1]
    m = m + ridge * m.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(d, dtype=m.dtype, device=m.device)
    evals, evecs = torch.linalg.eigh(m)
    return evecs * evals.clamp_min(0).sqrt()[..., None, :]


def _balanced_permutation(variances: Tensor, sub_dim: int) -> Tensor:
    """Deal axes (sorted by variance) to sub-spaces, each to the one with the least log-variance so far."""
    d = variances.shape[0]
    s = d // sub_dim
    order = torch.argsort(variances, descending=True).tolist()
    logv = variances.clamp_min(1e-20).log().tolist()
    buckets: list[list[int]] = [[] for _ in range(s)]
    load = [0.0] * s
    for axis in order:
        open_ = [i for i in range(s) if len(buckets[i]) < sub_dim]
        best = min(open_, key=lambda i: load[i])
        buckets[best].append(axis)
        load[best] += logv[axis]
    return torch.tensor([a for b in buckets for a in b])


def coding_transform(
    x: Tensor, w: Tensor, metric: Tensor | None, sub_dim: int, options: LearningOptions
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head (mean [H, D], transform [H, D, D], inverse [H, D, D]) for data x [H, N, D]."""
    h, n, d = x.shape
    if not (options.metric or options.rotate):
        eye = torch.eye(d, device=x.device).expand(h, d, d).clone()
        return torch.zeros(h, d, device=x.device), eye, eye.clone()
    xd, wd = x.double(), w.double()
    wn = wd / wd.sum(-1, keepdim=True)
    mean = (wn[..., None] * xd).sum(1)
    if options.metric and metric is not None:
        lmat = _sqrt_psd(metric, options.regularization)
    else:
        lmat = torch.eye(d, dtype=torch.float64, device=x.device).expand(h, d, d)
    transform = lmat.clone()
    if options.rotate:
        xc = torch.einsum("hnd,hde->hne", xd - mean[:, None], lmat)
        cov = torch.einsum("hn,hnd,hne->hde", wn, xc, xc)
        evals, evecs = torch.linalg.eigh(cov)
        perms = torch.stack([_balanced_permutation(evals[i].cpu(), sub_dim) for i in range(h)]).to(x.device)
        rot = torch.gather(evecs, 2, perms[:, None, :].expand(h, d, d))
        transform = lmat @ rot
    inverse = torch.linalg.inv(transform)
    return mean.float(), transform.float(), inverse.float()


def clip_weights(w: Tensor, quantile: float) -> Tensor:
    if quantile >= 1.0:
        return w
    sample = w.flatten(1)
    if sample.shape[1] > 100_000:
        sample = sample[:, torch.randperm(sample.shape[1])[:100_000]]
    cap = torch.quantile(sample.float(), quantile, dim=1)
    return torch.minimum(w, cap.view(-1, *([1] * (w.dim() - 1))))


def learn_codebook(
    x: Tensor,
    weights: Tensor | None,
    preset: VQPreset,
    *,
    metric: Tensor | None = None,
    options: LearningOptions = LearningOptions(),
    generator: torch.Generator | None = None,
) -> Codebook:
    """Fit a codebook to x [H, N, D] (one KV head per row) with weights [H, N] and metric [H, D, D]."""
    x = x.float()
    h, n, d = x.shape
    if weights is None or not options.weighted:
        w = torch.ones(h, n, device=x.device)
    else:
        w = clip_weights(weights.float(), options.weight_clip) ** options.weight_power
    if options.shared:
        x = x.reshape(1, h * n, d)
        w = w.reshape(1, h * n)
        metric = None if metric is None else metric.mean(0, keepdim=True)
    metric = None if metric is None else metric.to(x.device)
    mean, transform, inverse = coding_transform(x, w, metric, preset.sub_dim, options)
    xc = torch.einsum("hnd,hde->hne", x - mean[:, None], transform)
    s = preset.num_subspaces(d)
    hh = xc.shape[0]
    resid = xc.reshape(hh, -1, s, preset.sub_dim).permute(0, 2, 1, 3).reshape(hh * s, -1, preset.sub_dim)
    ws = w.repeat_interleave(s, dim=0)
    stages = []
    for _ in range(preset.stages):
        cents = weighted_kmeans(resid, ws, preset.num_centroids, iters=options.iters, generator=generator)
        stages.append(cents.reshape(hh, s, preset.num_centroids, preset.sub_dim))
        idx = assign(resid, cents)
        resid = resid - torch.gather(cents, 1, idx[..., None].expand(*idx.shape, preset.sub_dim))
    return Codebook(torch.stack(stages), transform, inverse, mean)
