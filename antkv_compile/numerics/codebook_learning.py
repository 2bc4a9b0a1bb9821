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

Pre-RoPE keys use **RoPE-pair sub-spaces** instead of the dense map (``LearningOptions.pairs``): the map is
a permutation that puts whole RoPE pairs ``(j, j + D/2)`` into each sub-space
(:mod:`antkv_compile.numerics.rope_pairs`), so a kernel decodes by gathering centroids and rotating each
pair by the token's position. Learning then only chooses *which pairs share a sub-space*
(:func:`group_pairs`), and k-means codes each sub-space in the plain Euclidean metric.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import VQPreset
from .kmeans import assign, weighted_kmeans
from .rope_pairs import pair_transform
from .vq import Codebook

PAIR_GROUPINGS = ("adjacent", "balanced", "correlation", "search")
# pre-RoPE keys' grouping, chosen on the dev split at 1 bit (benchmarks/results/dev_tuning_round6.json: balanced
# 1.161x, search 1.173x, correlation 1.172x; dev_tuning_round6_small.json, a smaller budget: search 1.079x,
# balanced 1.092x, correlation 1.091x; adjacent worst in both): within noise of search, simpler and no search cost
DEFAULT_PAIR_GROUPING = "balanced"


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
    # RoPE-pair sub-spaces (pre-RoPE keys): how pairs are grouped (one of PAIR_GROUPINGS, see group_pairs);
    # None = the dense metric / principal-axes map above. With pairs set, metric and rotate are not used.
    pairs: str | None = None

    def __post_init__(self) -> None:
        if self.pairs is not None and self.pairs not in PAIR_GROUPINGS:
            raise ValueError(f"pairs must be one of {PAIR_GROUPINGS} or None, got {self.pairs!r}")


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


def gaussian_cost(cov: Tensor, groups: Tensor) -> Tensor:
    """High-rate distortion of product-quantizing Gaussian data of covariance cov [D, D] with sub-spaces made
    of the pair groups [..., S, P]: sum over sub-spaces of det(cov restricted to the sub-space) ** (1 / dims).
    Lower when each sub-space's pairs are correlated (VQ exploits it) and when energy is balanced."""
    half = cov.shape[-1] // 2
    dims = torch.cat([groups, groups + half], -1)  # [..., S, 2P]
    sub = cov[dims[..., :, None], dims[..., None, :]]  # [..., S, 2P, 2P]
    return (torch.linalg.slogdet(sub)[1] / dims.shape[-1]).exp().sum(-1)


def group_pairs(cov: Tensor, sub_dim: int, how: str, max_swaps: int = 200) -> Tensor:
    """Pair order [D/2] (sub-space s holds pairs order[s*P:(s+1)*P], P = sub_dim / 2) for one head's
    (weighted, centered) pre-RoPE key covariance cov [D, D].

    adjacent:    neighbouring frequencies share a sub-space (pairs s*P .. s*P + P - 1).
    balanced:    pairs dealt by energy, each to the sub-space with the least log-energy so far (as
                 :func:`_balanced_permutation` deals principal axes).
    correlation: each sub-space seeded by the most energetic free pair, then filled greedily with the free
                 pairs most correlated with its members (sum of squared cross-correlations).
    search:      the best of the three by :func:`gaussian_cost`, improved by pair swaps between sub-spaces
                 while the cost falls.
    """
    cov = cov.double().cpu()
    d = cov.shape[0]
    half, p = d // 2, sub_dim // 2
    s = half // p
    energy = cov.diagonal()[:half] + cov.diagonal()[half:]
    if how == "adjacent":
        return torch.arange(half)
    if how == "balanced":
        return _balanced_permutation(energy, p)
    if how == "correlation":
        std = cov.diagonal().clamp_min(1e-20).sqrt()
        r2 = (cov / std[:, None] / std[None, :]) ** 2
        dep = r2[:half, :half] + r2[:half, half:] + r2[half:, :half] + r2[half:, half:]  # [half, half]
        free = set(range(half))
        order: list[int] = []
        for seed in torch.argsort(energy, descending=True).tolist():
            if seed not in free:
                continue
            group = [seed]
            free.discard(seed)
            while len(group) < p:
                best = max(free, key=lambda j: float(dep[j, group].sum()))
                group.append(best)
                free.discard(best)
            order += group
        return torch.tensor(order)
    if how != "search":
        raise ValueError(f"unknown pair grouping {how!r}; one of {PAIR_GROUPINGS}")
    ridge = 1e-6 * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype)
    cov = cov + ridge
    starts = torch.stack([group_pairs(cov, sub_dim, h) for h in PAIR_GROUPINGS[:3]]).view(3, s, p)
    groups = starts[gaussian_cost(cov, starts).argmin()].clone()
    if s == 1:
        return groups.flatten()
    # every swap of slot (a, i) with slot (b, j), a < b
    slots = [(a, i) for a in range(s) for i in range(p)]
    swaps = torch.tensor([(a, i, b, j) for a, i in slots for b, j in slots if a < b])
    for _ in range(max_swaps):
        cand = groups.expand(len(swaps), s, p).clone()
        rows = torch.arange(len(swaps))
        cand[rows, swaps[:, 0], swaps[:, 1]] = groups[swaps[:, 2], swaps[:, 3]]
        cand[rows, swaps[:, 2], swaps[:, 3]] = groups[swaps[:, 0], swaps[:, 1]]
        costs = gaussian_cost(cov, cand)
        best = int(costs.argmin())
        if costs[best] >= gaussian_cost(cov, groups) * (1 - 1e-9):
            break
        groups = cand[best]
    return groups.flatten()


def pair_coding_transform(x: Tensor, w: Tensor, sub_dim: int, how: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head (mean [H, D], transform, inverse [H, D, D]) in the RoPE-pair layout for data x [H, N, D]."""
    xd, wd = x.double(), w.double()
    wn = wd / wd.sum(-1, keepdim=True)
    mean = (wn[..., None] * xd).sum(1)
    xc = xd - mean[:, None]
    cov = torch.einsum("hn,hnd,hne->hde", wn, xc, xc)
    pairs = torch.stack([group_pairs(cov[i], sub_dim, how) for i in range(x.shape[0])])
    transform, inverse = pair_transform(pairs)
    return mean.float(), transform.to(x.device), inverse.to(x.device)


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
    if options.pairs is not None:
        mean, transform, inverse = pair_coding_transform(x, w, preset.sub_dim, options.pairs)
    else:
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
