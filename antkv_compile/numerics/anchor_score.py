"""The Anchor Score: how much a token's quantization would change the attention output.

First-order forward error analysis of attention (A = softmax(s), s_ij = scale * q_i·k_j,
o_i = sum_j A_ij v_j): perturbing token j's key by dk_j and value by dv_j changes row i by

    do_i ≈ A_ij * [ scale * (q_i·dk_j) * (v_j - o_i) + dv_j ]                       (1)

(the softmax Jacobian gives the key term, the value term is exact). A token's Anchor Score is the
output error its quantization would cause, summed over the rows that read it and over the query
heads that share its KV head:

    AnS_j = sum_{g,i} || A_ij [ scale (q_i·dk_j)(v_j - o_i) + dv_j ] ||_2               ("ans")

with dk_j, dv_j the token's *actual* quantization residuals. Every term is a GEMM-shaped product
(||a(v - o) + dv||^2 expands into q·dk, v·o, o·dv and norms), which is what lets the prefill
kernel compute it blockwise beside FlashAttention. Cheaper variants, for comparison:

    "sensitivity": sum A_ij (scale ||q_i|| ||v_j - o_i|| E||dk|| + E||dv||)   (no per-token residual)
    "attention":   sum A_ij                                                  (accumulated attention)
    "random":      i.i.d. uniform scores

Row sampling (``row_stride`` R > 1) estimates the sum for long prefills at a fraction of its cost: a pair
(head g, query row i, key j) counts with weight 1 inside a band of exact rows (i - j < ``band``), with
weight R on every R-th row beyond it ((i + g) % R == 0, so with R = G each row is read by exactly one of the
G heads of its KV head), and not at all otherwise. Query i and key j are aligned (key j is the token that
arrived with query j), as in prefill and in the window flush.

``weights_for_calibration`` gives the per-token factors of (1) that weight k-means offline.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .attention import group_queries, grouped_mask

_QUERY_BLOCK = 256


def attention_probs(qg: Tensor, k: Tensor, lse: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """A_ij = exp(scale q_i·k_j - lse_i) for grouped queries qg [B, Hkv, G, Tq, D] -> [B, Hkv, G, Tq, Tk].

    ``lse`` [B, Hkv, G, Tq] is the log-normalizer of the *whole* attention row (over every key the
    query saw), so A sums to less than one over a subset of the keys.
    """
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k) * scale
    p = torch.exp(logits - lse.unsqueeze(-1))
    if mask is not None:
        p = p.masked_fill(~grouped_mask(mask), 0.0)
    return p


def value_output_distance2(o: Tensor, v: Tensor) -> Tensor:
    """||v_j - o_i||^2 for grouped outputs o [B, H, G, t, D] and values v [B, H, Tk, D] -> [B, H, G, t, Tk].

    Expanded as |v_j|^2 - 2 v_j·o_i + |o_i|^2 so that it is one matmul (the prefill kernel's form)."""
    vo = torch.einsum("bhgtd,bhsd->bhgts", o, v)
    return ((v * v).sum(-1)[:, :, None, None, :] - 2 * vo + (o * o).sum(-1)[..., None]).clamp_min(0)


def row_sample_weights(g: int, tq: int, tk: int, row_stride: int, band: int, device=None, rows: slice | None = None
                       ) -> Tensor:
    """Weight of each (head g, query row i, key j) pair in a row-sampled score -> [G, Tq, Tk] float32 (only the
    query rows ``rows`` when given)."""
    if row_stride < 1 or band < 1:
        raise ValueError(f"row_stride and band must be >= 1, got {row_stride}, {band}")
    rows = rows or slice(0, tq)
    i = torch.arange(rows.start, rows.stop, device=device)[None, :, None]
    j = torch.arange(tk, device=device)[None, None, :]
    h = torch.arange(g, device=device)[:, None, None]
    sampled = ((i + h) % row_stride == 0).float() * row_stride
    return torch.where(i - j < band, torch.ones((), device=device), sampled)


def anchor_scores(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    *,
    kind: str = "ans",
    k_hat: Tensor | None = None,
    v_hat: Tensor | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    row_stride: int = 1,
    band: int = 256,
) -> Tensor:
    """Score each key token [B, Hkv, Tk] over the queries that read it.

    q [B, Hq, Tq, D], k/v/k_hat/v_hat [B, Hkv, Tk, D], out [B, Hq, Tq, D] and lse [B, Hq, Tq] are
    the *final* attention output and log-normalizer of each query row; mask [.., Tq, Tk] marks
    which (query, key) pairs were visible (causality). ``row_stride`` > 1 samples the query rows beyond
    ``band`` (see the module docstring).
    """
    b, hkv, tk, d = k.shape
    if kind == "random":
        return torch.rand(b, hkv, tk, generator=generator).to(k.device)
    if kind == "none":
        return torch.zeros(b, hkv, tk, device=k.device)
    qg = group_queries(q, hkv).float()
    og = group_queries(out, hkv).float()
    lg = lse.reshape(b, hkv, -1, lse.shape[-1]).float()
    kf, vf = k.float(), v.float()
    if kind in ("ans", "sensitivity"):
        if k_hat is None or v_hat is None:
            raise ValueError(f"score kind {kind!r} needs the quantized k_hat and v_hat")
        dk, dv = k_hat.float() - kf, v_hat.float() - vf
    scores = torch.zeros(b, hkv, tk, dtype=torch.float32, device=k.device)
    tq = qg.shape[3]
    for start in range(0, tq, _QUERY_BLOCK):
        sl = slice(start, min(tq, start + _QUERY_BLOCK))
        m = None if mask is None else mask[..., sl, :]
        a = attention_probs(qg[:, :, :, sl], kf, lg[:, :, :, sl], scale, m)  # [B, H, G, t, Tk]
        if row_stride != 1:  # per query block: the whole [G, Tq, Tk] would be ~200 MB for a 4K-token chunk
            a = a * row_sample_weights(qg.shape[2], tq, tk, row_stride, band, k.device, rows=sl)
        if kind == "attention":
            scores += a.sum((2, 3))
            continue
        o = og[:, :, :, sl]
        dist2 = value_output_distance2(o, vf)
        if kind == "sensitivity":
            qn = qg[:, :, :, sl].norm(dim=-1)[..., None]  # [B, H, G, t, 1]
            ek = dk.norm(dim=-1).mean(-1)[:, :, None, None, None]
            ev = dv.norm(dim=-1).mean(-1)[:, :, None, None, None]
            scores += (a * (scale * qn * dist2.sqrt() * ek + ev)).sum((2, 3))
            continue
        # "ans": || a_ij (v_j - o_i) + dv_j ||, a_ij = scale q_i·dk_j
        coef = scale * torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, sl], dk)
        cross = (vf * dv).sum(-1)[:, :, None, None, :] - torch.einsum("bhgtd,bhsd->bhgts", o, dv)
        dv2 = (dv * dv).sum(-1)[:, :, None, None, :]
        norm2 = (coef * coef * dist2 + 2 * coef * cross + dv2).clamp_min(0)
        scores += (a * norm2.sqrt()).sum((2, 3))
    return scores


def first_order_output_change(
    q: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """Predicted change of every output row [B, Hq, Tq, D] under (dk, dv), by equation (1)."""
    from .attention import exact_attention, ungroup

    out, lse = exact_attention(q, k, v, scale, mask)
    hkv = k.shape[1]
    qg, og = group_queries(q, hkv).float(), group_queries(out, hkv)
    a = attention_probs(qg, k.float(), group_queries(lse.unsqueeze(-1), hkv).squeeze(-1), scale, mask)
    coef = a * scale * torch.einsum("bhgtd,bhsd->bhgts", qg, dk.float())
    # sum_j coef_ij (v_j - o_i) + A_ij dv_j
    delta = (
        torch.einsum("bhgts,bhsd->bhgtd", coef, v.float())
        - coef.sum(-1, keepdim=True) * og
        + torch.einsum("bhgts,bhsd->bhgtd", a, dv.float())
    )
    return ungroup(delta)


def weights_for_calibration(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token sensitivity factors of equation (1) without the residual, for weighted k-means.

    Returns (w_key, w_value) [B, Hkv, Tk]: w_key_j = sum A_ij scale ||q_i|| ||v_j - o_i|| bounds the
    output error per unit of key error, w_value_j = sum A_ij per unit of value error.
    """
    b, hkv, tk, d = k.shape
    qg, og = group_queries(q, hkv).float(), group_queries(out, hkv).float()
    lg = lse.reshape(b, hkv, -1, lse.shape[-1]).float()
    kf, vf = k.float(), v.float()
    wk = torch.zeros(b, hkv, tk, device=k.device)
    wv = torch.zeros_like(wk)
    for start in range(0, qg.shape[3], _QUERY_BLOCK):
        sl = slice(start, min(qg.shape[3], start + _QUERY_BLOCK))
        m = None if mask is None else mask[..., sl, :]
        a = attention_probs(qg[:, :, :, sl], kf, lg[:, :, :, sl], scale, m)
        o = og[:, :, :, sl]
        dist2 = value_output_distance2(o, vf)
        qn = qg[:, :, :, sl].norm(dim=-1)[..., None]
        wk += (a * scale * qn * dist2.sqrt()).sum((2, 3))
        wv += a.sum((2, 3))
    return wk, wv
