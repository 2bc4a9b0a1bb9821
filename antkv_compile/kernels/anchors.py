"""Anchor selection and the window flush, over fixed-capacity store buffers (CUDA-graph safe).

Reference: :meth:`antkv_compile.numerics.store.AnTKVLayerStore._flush`. A flush takes the oldest W
tokens of a full window (with all Wq >= W queries the window holds, each aligned with its token, and
those queries' final attention output and log-normalizer), encodes them, writes their codes at
positions n_coded[b] .. n_coded[b] + W - 1, scores them over the window's queries (causal: query i
reads token j <= i), and keeps as anchors the best ``keep[b] = min(n, ceil(anchor_ratio * n))``
(n = n_coded[b] + W) of the old anchors and the newcomers.

Device work: VQ encode and the Anchor Scores are Triton kernels (vq_encode.py, prefill_attention.py);
the selection is ``torch.topk`` over ``A + W`` candidates per (sequence, KV head) plus gathers of A rows,
which is tiny next to the scoring pass (W*W*G*D*8 flops), so it stays in PyTorch. Nothing reads a
length on the host: keep[b] is computed on the device (in float64, like the Python reference) and
applied as a mask over the top-A ranks, so every shape is fixed by the buffers.

Anchor bitmask: anchor_bits [B, Hkv, ceil(N/32)] int32, bit (n % 32) of word n // 32 set = token n is an
anchor. It is rebuilt from anchor_pos after each selection (zero + scatter-add of distinct powers of two,
O(N/32 + A) per head).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.anchor_score import anchor_scores as anchor_scores_ref
from ..numerics.attention import causal_mask
from ..numerics.rope import rotate, unrotate
from ..numerics.vq import Codebook
from ._common import can_launch
from .decode_attention import bits_from_positions
from .prefill_attention import anchor_scores_triton
from .rope_decode import rope_cos_sin
from .vq_encode import vq_encode_triton


def anchors_to_keep(n_total: Tensor, anchor_ratio: float, capacity: int) -> Tensor:
    """Per sequence: min(n, ceil(ratio * n)), at most ``capacity`` (int64, on n_total's device)."""
    n = n_total.long()
    if anchor_ratio <= 0.0 or capacity == 0:
        return torch.zeros_like(n)
    keep = torch.ceil(n.double() * anchor_ratio).long()
    return torch.minimum(torch.minimum(keep, n), torch.full_like(n, capacity))


def select_anchors_(anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor, anchor_score: Tensor,
                    anchor_bits: Tensor, scores: Tensor, k: Tensor, v: Tensor, n_coded: Tensor,
                    anchor_ratio: float) -> None:
    """Merge W scored newcomers (positions n_coded[b] + t) into the anchor set, in place."""
    b, h, a, d = anchor_k.shape
    w = k.shape[2]
    if a == 0 or w == 0:
        return
    n0 = n_coded.to(anchor_pos.device).long()
    keep = anchors_to_keep(n0 + w, anchor_ratio, a)  # [B]
    cand = torch.cat([anchor_score, scores.to(anchor_score.dtype)], dim=2)  # [B, H, A + W]
    top = cand.topk(a, dim=2)
    best = top.indices
    sel = torch.arange(a, device=best.device)[None, None, :] < keep[:, None, None]
    from_old = best < a
    old_idx = best.clamp(max=a - 1)
    new_idx = (best - a).clamp(min=0, max=w - 1)
    pos = torch.where(from_old, anchor_pos.gather(2, old_idx).long(), n0[:, None, None] + new_idx)
    pos = torch.where(sel, pos, torch.full_like(pos, -1))
    score = torch.where(sel, top.values, torch.full_like(top.values, float("-inf")))
    oi = old_idx[..., None].expand(b, h, a, d)
    ni = new_idx[..., None].expand(b, h, a, d)
    fo = from_old[..., None]
    new_k = torch.where(fo, anchor_k.gather(2, oi), k.to(anchor_k.dtype).gather(2, ni))
    new_v = torch.where(fo, anchor_v.gather(2, oi), v.to(anchor_v.dtype).gather(2, ni))
    anchor_k.copy_(new_k)
    anchor_v.copy_(new_v)
    anchor_pos.copy_(pos.to(anchor_pos.dtype))
    anchor_score.copy_(score)
    anchor_bits.copy_(bits_from_positions(anchor_pos, anchor_bits.shape[2] * 32))


def _write_codes_(buf: Tensor, codes: Tensor, n_coded: Tensor) -> None:
    b, h, w, c = codes.shape
    idx = n_coded.to(buf.device).long()[:, None, None, None] + torch.arange(w, device=buf.device)[None, None, :, None]
    buf.scatter_(2, idx.expand(b, h, w, c), codes.to(buf.dtype))


def _scores(kind: str, win_q, win_k, win_v, dk, dv, win_out, win_lse, scale: float, use_triton: bool,
            row_stride: int, band: int) -> Tensor:
    if kind == "ans" and use_triton:
        return anchor_scores_triton(win_q, win_k, win_v, dk, dv, win_out, win_lse, scale, row_stride=row_stride,
                                    band=band)
    pos = torch.arange(win_q.shape[2], device=win_k.device)
    return anchor_scores_ref(win_q, win_k, win_v, win_out, win_lse, scale, kind=kind,
                             k_hat=win_k.float() + dk.float(), v_hat=win_v.float() + dv.float(),
                             mask=causal_mask(pos, pos[:win_k.shape[2]]), row_stride=row_stride, band=band)


def window_flush_(
    codes_k: Tensor, codes_v: Tensor, anchor_k: Tensor, anchor_v: Tensor, anchor_pos: Tensor,
    anchor_score: Tensor, anchor_bits: Tensor, n_coded: Tensor,
    win_q: Tensor, win_k: Tensor, win_v: Tensor, win_out: Tensor, win_lse: Tensor,
    cent_k: Tensor, tr_k: Tensor, inv_k: Tensor, mean_k: Tensor,
    cent_v: Tensor, tr_v: Tensor, inv_v: Tensor, mean_v: Tensor,
    scale: float, anchor_ratio: float, score_kind: str = "ans", row_stride: int = 1, band: int = 256, *,
    use_triton: bool | None = None, rope_inv_freq: Tensor | None = None, rope_scale: float = 1.0,
) -> None:
    """Encode the window into the codes, score it, update the anchors (all in place; n_coded unchanged).

    ``rope_inv_freq`` (pre-RoPE key codebooks): keys are unrotated by their slots n_coded[b] + t before the encode,
    the key residual rotated back (scores and anchors are post-RoPE), as AnTKVLayerStore._flush does."""
    if use_triton is None:
        use_triton = can_launch(win_k)
    keys = win_k
    if rope_inv_freq is not None:
        slots = n_coded.to(win_k.device).long()[:, None] + torch.arange(win_k.shape[2], device=win_k.device)
        cos, sin = rope_cos_sin(slots, rope_inv_freq, rope_scale)  # [B, W, D]
        cos, sin = cos[:, None], sin[:, None]
        keys = unrotate(win_k.float(), cos, sin)
    if use_triton:
        ck, dk = vq_encode_triton(keys, cent_k, tr_k, inv_k, mean_k)
        cv, dv = vq_encode_triton(win_v, cent_v, tr_v, inv_v, mean_v)
        if rope_inv_freq is not None:
            dk = rotate(dk, cos, sin)
    else:  # exactly what the store does: k_hat rounded to the storage dtype
        cbk = Codebook(cent_k.float(), tr_k.float(), inv_k.float(), mean_k.float())
        cbv = Codebook(cent_v.float(), tr_v.float(), inv_v.float(), mean_v.float())
        ck, k_hat = cbk.quantize(keys)
        if rope_inv_freq is not None:
            k_hat = rotate(k_hat.float(), cos, sin).to(win_k.dtype)
        cv, v_hat = cbv.quantize(win_v)
        dk, dv = k_hat.float() - win_k.float(), v_hat.float() - win_v.float()
    _write_codes_(codes_k, ck, n_coded)
    _write_codes_(codes_v, cv, n_coded)
    if anchor_k.shape[2] == 0 or score_kind == "none" or anchor_ratio <= 0.0:
        return
    if score_kind == "random":
        scores = torch.rand(win_k.shape[:3], device=win_k.device)
    else:
        scores = _scores(score_kind, win_q, win_k, win_v, dk, dv, win_out, win_lse, scale, use_triton, row_stride,
                         band)
    select_anchors_(anchor_k, anchor_v, anchor_pos, anchor_score, anchor_bits, scores, win_k, win_v, n_coded,
                    anchor_ratio)
