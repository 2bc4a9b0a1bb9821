"""Reference attention over the parts of the AnTKV store, in plain PyTorch.

Every function returns a *partial* result ``(out, lse)``: the softmax-weighted output over the keys
it saw and the log-sum-exp of their logits. Partials over disjoint key sets merge exactly with
:func:`merge_partials` (the FlashAttention / flash-decoding identity). Shapes:

    q    [B, Hq, Tq, D]        queries (query head h reads KV head h // G, G = Hq / Hkv)
    k, v [B, Hkv, Tk, D]
    out  [B, Hq, Tq, D] float32, lse [B, Hq, Tq] float32 (-inf where no key was visible)
    mask broadcastable to [B, Hkv, Tq, Tk], True = visible

These are the references the Triton kernels are tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .vq import Codebook


def group_queries(q: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G, T, D]."""
    b, hq, t, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads cannot share {num_kv_heads} KV heads evenly")
    return q.reshape(b, num_kv_heads, hq // num_kv_heads, t, d)


def ungroup(x: Tensor) -> Tensor:
    """[B, Hkv, G, ...] -> [B, Hq, ...]."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def causal_mask(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """q_pos [Tq] or [B, Tq], k_pos [..., Tk] -> bool mask [.., Tq, Tk] with k_pos <= q_pos."""
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)


def grouped_mask(mask: Tensor) -> Tensor:
    """A mask broadcastable to [B, Hkv, Tq, Tk] -> one broadcastable to [B, Hkv, G, Tq, Tk]."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.unsqueeze(2)


def _softmax_partial(logits: Tensor, values_fn, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """logits [B, Hkv, G, Tq, Tk] (float32) -> (out via values_fn(p), lse)."""
    if mask is not None:
        logits = logits.masked_fill(~grouped_mask(mask), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(logits - safe.unsqueeze(-1))
    return values_fn(p), lse


def exact_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Full-precision attention partial over k, v."""
    hkv = k.shape[1]
    qg = group_queries(q, hkv).float()
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k.float()) * scale
    out, lse = _softmax_partial(logits, lambda p: torch.einsum("bhgts,bhsd->bhgtd", p, v.float()), mask)
    return ungroup(out), ungroup(lse)


def merge_partials(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge attention partials over disjoint key sets by log-sum-exp."""
    if not parts:
        raise ValueError("nothing to merge")
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, T]
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lses - safe)  # exp(-inf) = 0 for empty partials
    out = sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts))
    return out, lse


def key_lookup_tables(qg: Tensor, codebook: Codebook, scale: float) -> tuple[Tensor, Tensor]:
    """Per-query lookup tables for the key codes.

    qg [B, Hkv, G, Tq, D] (grouped queries) -> (lut [B, Hkv, G, Tq, stages*S, M], bias [B, Hkv, G, Tq])
    such that the logit of a token with codes c is ``bias + sum_j lut[..., j, c_j]`` (already scaled).
    """
    qc = codebook.query_to_coding_space(qg)  # [B, Hkv, G, Tq, D]
    b, h, g, t, _ = qc.shape
    s, sd = codebook.num_subspaces, codebook.sub_dim
    cents = codebook._per_head(codebook.centroids.transpose(0, 1), h).float()  # [H, stages, S, M, sd]
    lut = torch.einsum("bhgtsd,hpsmd->bhgtpsm", qc.reshape(b, h, g, t, s, sd), cents)
    lut = lut.reshape(b, h, g, t, codebook.stages * s, codebook.num_centroids) * scale
    bias = codebook.query_dot_mean(qg) * scale
    return lut, bias


def lut_logits(lut: Tensor, bias: Tensor, codes: Tensor) -> Tensor:
    """Sum per-query table entries over the code columns.

    lut [B, Hkv, G, Tq, C, M], bias [B, Hkv, G, Tq], codes [B, Hkv, N, C] -> logits [B, Hkv, G, Tq, N]
    """
    b, h, g, t, c, m = lut.shape
    n = codes.shape[2]
    flat = lut.reshape(b, h, g * t, c * m)
    idx = codes.long() + torch.arange(c, device=codes.device) * m  # [B, Hkv, N, C]
    picked = torch.gather(flat, 3, idx.reshape(b, h, 1, n * c).expand(b, h, g * t, n * c))
    return picked.reshape(b, h, g, t, n, c).sum(-1) + bias.unsqueeze(-1)


def vq_values(p: Tensor, codes_v: Tensor, codebook: Codebook, mode: str = "histogram") -> Tensor:
    """Softmax weights p [B, Hkv, G, Tq, N] times the coded values -> [B, Hkv, G, Tq, D] (float32).

    "histogram": per (sub-space, stage) accumulate the probability mass that falls on each
    centroid, then multiply the [M] mass vector by the [M, sub_dim] codebook; "gather": gather
    each token's centroids and weight them. Both stay in coding space and apply the inverse
    transform once per query (it commutes with the weighted sum).
    """
    b, h, g, t, n = p.shape
    s, sd, m, st = codebook.num_subspaces, codebook.sub_dim, codebook.num_centroids, codebook.stages
    cents = codebook._per_head(codebook.centroids.transpose(0, 1), h).float()  # [H, stages, S, M, sd]
    if mode == "histogram":
        idx = codes_v.long().reshape(b, h, 1, 1, n, st * s).expand(b, h, g, t, n, st * s)
        hist = torch.zeros(b, h, g, t, st * s, m, dtype=torch.float32, device=p.device)
        hist.scatter_add_(5, idx.transpose(4, 5), p.unsqueeze(4).expand(b, h, g, t, st * s, n))
        acc = torch.einsum("bhgtpsm,hpsmd->bhgtsd", hist.reshape(b, h, g, t, st, s, m), cents)
    elif mode == "gather":
        deq = codebook.decode_coding_space(codes_v)  # [B, H, N, D] coding space
        acc = torch.einsum("bhgtn,bhnd->bhgtd", p, deq)
    else:
        raise ValueError(f"unknown value mode {mode!r}")
    acc = acc.reshape(b, h, g, t, s * sd)
    inv = codebook._per_head(codebook.inverse, h)
    mean = codebook._per_head(codebook.mean, h)
    mass = p.sum(-1, keepdim=True)
    return torch.einsum("bhgtd,hde->bhgte", acc, inv) + mass * mean[None, :, None, None, :]


def lut_attention(
    q: Tensor,
    codes_k: Tensor,
    codes_v: Tensor,
    codebook_k: Codebook,
    codebook_v: Codebook,
    scale: float,
    mask: Tensor | None = None,
    value_mode: str = "histogram",
) -> tuple[Tensor, Tensor]:
    """Attention partial over VQ-coded tokens, computed on the codes through lookup tables.

    codes_k [B, Hkv, N, Ck], codes_v [B, Hkv, N, Cv]; mask broadcastable to [B, Hkv, Tq, N].
    """
    hkv = codes_k.shape[1]
    qg = group_queries(q, hkv)
    lut, bias = key_lookup_tables(qg, codebook_k, scale)
    logits = lut_logits(lut, bias, codes_k)
    out, lse = _softmax_partial(logits, lambda p: vq_values(p, codes_v, codebook_v, value_mode), mask)
    return ungroup(out), ungroup(lse)


def dequantized_attention(
    q: Tensor, codes_k: Tensor, codes_v: Tensor, codebook_k: Codebook, codebook_v: Codebook, scale: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The oracle: decode every token, then attend exactly. :func:`lut_attention` must equal it."""
    return exact_attention(q, codebook_k.decode(codes_k), codebook_v.decode(codes_v), scale, mask)
