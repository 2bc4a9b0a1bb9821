"""Full-precision decode attention over a dense static KV cache: split-K flash-decoding (the baseline).

The strong FP16/BF16 baseline of the end-to-end benchmark: it reads every valid byte of the static cache
exactly once per decode step (no grouped-query expansion: the G query heads of a KV head, times the Tq new
tokens, are packed into the rows of one tile), so its floor is ``2 * B * Hkv * len * D * elt`` bytes per layer
and step at HBM bandwidth (NOTES.md, "Dense decode baseline").

Layout:

    q            [B, Hq, Tq, D]     the new queries (query head h reads KV head h // G, G = Hq / Hkv), any strides
    k/v_cache    [B, Hkv, L, D]     fp16 / bf16 / fp32 static cache (last dim contiguous), of which the first
    lengths      [B] int32          lengths[b] positions are valid (clamped to [0, L]); the Tq new tokens are
                                    already written: query t of sequence b sees keys j <= lengths[b] - Tq + t
    -> out [B, Hq, Tq, D] (q.dtype), lse [B, Hq, Tq] float32 (natural log; -inf and out 0 where a row sees
       no key)

Algorithm (one or two launches):

* split kernel, grid (B * Hkv, P): program (bh, s) covers the s-th of P equal chunks of its sequence's
  ``lengths[b]`` keys (chunk = ceil(len / P) rounded up to BLOCK_N, computed on the device: no host sync, so
  the launch is CUDA-graph safe; empty chunks cost one store). K and V tiles are loaded as [BLOCK_N, D] in the
  cache dtype (software-pipelined by Triton, ``num_stages``); logits = q . K^T and p . V are tensor-core
  products in fp16/bf16 with fp32 accumulation, online softmax in base 2. R = G*Tq rows (<= 64) padded to 16.
* P == 1: the split kernel writes the final output itself (one launch).
* P > 1: it writes a normalized partial (R x D floats) and its log2-sum-exp; a small merge kernel, one program
  per (sequence, KV head), combines the P partials by log-sum-exp.

Split count and pipelining (``default_splits``, ``default_stages``), from a sweep on the H100 (132 SMs,
NOTES.md "Dense decode baseline"): the kernel is bandwidth-bound once every multiprocessor holds a program, and
what costs is a partial second wave. So: B*Hkv >= SMs -> one split (no merge launch); otherwise about one program
per SM when B*Hkv <= SMs/8 (B = 1, 2 at Hkv = 8: long splits, deep prefetch) and about two per SM above that,
P = ceil(k * SMs / (B * Hkv)), never a split shorter than MIN_SPLIT_TOKENS of the capacity. K/V tiles are
prefetched 3 deep (~96 KB of shared memory at BLOCK_N = 64, D = 128: about two programs per SM) while the
programs fit two per SM, else 2 deep (about three per SM).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    HAS_TRITON, LOG2E, can_launch, cdiv, dot_dtype, dot_precision, next_pow2, require_triton, sm_count, tl, triton,
)

MAX_ROWS = 64          # G * Tq query rows packed per KV head (one tile)
MIN_SPLIT_TOKENS = 512  # no split shorter than this (of the capacity): partials + pipeline fill stay small
MAX_SPLITS = 256

if HAS_TRITON:

    @triton.jit
    def _dense_split_kernel(
        Q, K, V, LENS, PO, PL, OUT, LSE,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
        s_ob, s_oh, s_ot, s_lb, s_lh,
        HKV, L_CAP, P, qk_scale,
        G: tl.constexpr, TQ: tl.constexpr, R_PAD: tl.constexpr, RM: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, DIRECT: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // HKV
        h = pid_bh % HKV
        length = tl.minimum(tl.maximum(tl.load(LENS + b), 0), L_CAP)
        per = tl.cdiv(tl.cdiv(length, P), BLOCK_N) * BLOCK_N
        start = pid_s * per
        end = tl.minimum(start + per, length)

        rows = tl.arange(0, R_PAD)
        offs_d = tl.arange(0, D)
        offs_b = tl.arange(0, BLOCK_N)
        rg = rows // TQ
        rt = rows % TQ
        rvalid = rows < G * TQ
        q = tl.load(Q + b.to(tl.int64) * s_qb + (h * G + rg)[:, None] * s_qh + rt[:, None] * s_qt + offs_d[None, :],
                    mask=rvalid[:, None], other=0.0).to(DOT)
        last = length - TQ + rt  # last key each row sees (causal over the new tokens)

        k_ptr = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
        v_ptr = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_b
            nmask = offs_n < end
            k = tl.load(k_ptr + offs_n[:, None] * s_kn + offs_d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PREC) * qk_scale  # [R_PAD, BLOCK_N], log2 units
            vis = nmask[None, :] & (offs_n[None, :] <= last[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + offs_n[:, None] * s_vn + offs_d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PREC)
            m_i = m_new

        nonempty = l_i > 0.0
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        if DIRECT:
            hq = h * G + rg
            tl.store(OUT + b.to(tl.int64) * s_ob + hq[:, None] * s_oh + rt[:, None] * s_ot + offs_d[None, :],
                     o.to(OUT.dtype.element_ty), mask=rvalid[:, None])
            tl.store(LSE + b * s_lb + hq * s_lh + rt, lse2 * 0.6931471805599453, mask=rvalid)
        else:
            base = (pid_bh.to(tl.int64) * P + pid_s) * RM
            tl.store(PO + (base + rows[:, None]) * D + offs_d[None, :], o, mask=rvalid[:, None])
            tl.store(PL + base + rows, lse2, mask=rvalid)

    @triton.jit
    def _dense_merge_kernel(
        PO, PL, OUT, LSE, s_ob, s_oh, s_ot, s_lb, s_lh, HKV, P,
        G: tl.constexpr, TQ: tl.constexpr, RM: tl.constexpr, D: tl.constexpr, PB: tl.constexpr,
    ):
        """Log-sum-exp merge of one (sequence, KV head)'s P partials, PB partials per vector load."""
        pid_bh = tl.program_id(0)
        b = pid_bh // HKV
        h = pid_bh % HKV
        rows = tl.arange(0, RM)
        offs_d = tl.arange(0, D)
        offs_p = tl.arange(0, PB)
        rvalid = rows < G * TQ
        m_i = tl.full([RM], float("-inf"), tl.float32)
        l_i = tl.zeros([RM], tl.float32)
        acc = tl.zeros([RM, D], tl.float32)
        for p0 in range(0, P, PB):
            pp = p0 + offs_p
            mask2 = (pp < P)[:, None] & rvalid[None, :]
            base = (pid_bh.to(tl.int64) * P + pp) * RM  # [PB]
            lse2 = tl.load(PL + base[:, None] + rows[None, :], mask=mask2, other=float("-inf"))  # [PB, RM]
            o = tl.load(PO + (base[:, None, None] + rows[None, :, None]) * D + offs_d[None, None, :],
                        mask=mask2[:, :, None], other=0.0)  # [PB, RM, D]
            m_new = tl.maximum(m_i, tl.max(lse2, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            w = tl.exp2(lse2 - m_use[None, :])
            l_i = l_i * alpha + tl.sum(w, axis=0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, axis=0)
            m_i = m_new
        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        rg = rows // TQ
        rt = rows % TQ
        hq = h * G + rg
        tl.store(OUT + b.to(tl.int64) * s_ob + hq[:, None] * s_oh + rt[:, None] * s_ot + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=rvalid[:, None])
        tl.store(LSE + b * s_lb + hq * s_lh + rt, lse, mask=rvalid)


LAST_LAUNCH: dict = {}  # the last compiled split kernel (a benchmark can read registers / spills)


def default_splits(batch: int, kv_heads: int, capacity: int, sms: int, block_n: int = 64, mult: float = 1.0) -> int:
    """Splits P per (sequence, KV head); see the module docstring. ``mult`` scales the target program count."""
    pairs = max(1, batch * kv_heads)
    if pairs >= sms and mult <= 1.0:
        p = 1
    else:
        per_sm = 1 if pairs * 8 <= sms else 2
        p = cdiv(max(1, int(per_sm * sms * mult)), pairs)
    p = min(p, MAX_SPLITS, max(1, cdiv(capacity, max(MIN_SPLIT_TOKENS, block_n))))
    return max(1, p)


def default_stages(programs: int, sms: int) -> int:
    """K/V prefetch depth: 3 while the split programs fit two per SM, else 2."""
    return 3 if programs <= 2 * sms else 2


def dense_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float, *,
                        splits: int | None = None, split_mult: float = 1.0, block_n: int = 64,
                        num_warps: int | None = None, num_stages: int | None = None,
                        out: tuple[Tensor, Tensor] | None = None,
                        poison: bool = False) -> tuple[Tensor, Tensor]:
    """Launch the split (+ merge) kernels; see the module docstring. Returns (out q.dtype, lse float32).

    Options: splits (P, default ``default_splits``) or split_mult, block_n (keys per tile, power of two >= 16),
    num_warps (default 4, 8 for 64 rows), num_stages (software pipelining of the K/V loads, default
    ``default_stages``), out=(out, lse) preallocated, poison=True fills the split partials with NaN first
    (tests)."""
    require_triton()
    b, hq, tq, d = q.shape
    _, hkv, cap, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not match "
                         f"q's head dim {d}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    g = hq // hkv
    rv = g * tq
    if rv > MAX_ROWS:
        raise ValueError(f"dense decode packs G*Tq = {rv} query rows per KV head; at most {MAX_ROWS}")
    if d != next_pow2(d) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    r_pad = max(16, next_pow2(rv))
    rm = next_pow2(rv)
    dev = q.device
    if out is None:
        out = (torch.empty(b, hq, tq, d, dtype=q.dtype, device=dev),
               torch.empty(b, hq, tq, dtype=torch.float32, device=dev))
    o, lse = out
    if b * hkv == 0 or tq == 0:
        return o, lse
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    lengths = lengths.to(device=dev, dtype=torch.int32).contiguous()
    sms = sm_count(q)
    p = splits if splits is not None else default_splits(b, hkv, cap, sms, block_n, split_mult)
    p = max(1, int(p))
    if num_stages is None:
        num_stages = default_stages(b * hkv * p, sms)
    direct = p == 1
    if direct:
        po = pl = lse  # unused
    else:
        po = torch.empty(b * hkv * p * rm * d, dtype=torch.float32, device=dev)
        pl = torch.empty(b * hkv * p * rm, dtype=torch.float32, device=dev)
        if poison:
            po.fill_(float("nan"))
            pl.fill_(float("nan"))
    dt, prec = dot_dtype(k_cache.dtype), dot_precision(k_cache.dtype)
    if num_warps is None:
        num_warps = 4 if r_pad <= 32 else 8
    LAST_LAUNCH["dense_decode"] = _dense_split_kernel[(b * hkv, p)](
        q, k_cache, v_cache, lengths, po, pl, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        hkv, cap, p, float(scale) * LOG2E,
        G=g, TQ=tq, R_PAD=r_pad, RM=rm, D=d, BLOCK_N=block_n, DOT=dt, PREC=prec, DIRECT=direct,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        pb = max(1, min(8, 4096 // (rm * d)))  # rm, d powers of two: pb is one too
        _dense_merge_kernel[(b * hkv,)](
            po, pl, o, lse, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), hkv, p,
            G=g, TQ=tq, RM=rm, D=d, PB=pb, num_warps=4,
        )
    return o, lse


# ---------------------------------------------------------------------------------------------- reference
def dense_decode_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float
                           ) -> tuple[Tensor, Tensor]:
    """Masked softmax attention in float32, GQA by index (query head h reads KV head h // G), no expansion copy.

    Same contract as the kernel: query t of sequence b sees keys j < min(lengths[b], L) with
    j <= lengths[b] - Tq + t; rows that see nothing get out 0 and lse -inf. Returns (out q.dtype, lse float32)."""
    b, hq, tq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    dev = q.device
    qf = q.float().reshape(b, hkv, g, tq, d)
    logits = torch.einsum("bhgtd,bhld->bhgtl", qf, k_cache.float()) * float(scale)
    lens = lengths.to(dev).long().clamp(0, cap)
    jj = torch.arange(cap, device=dev)
    last = lens[:, None] - tq + torch.arange(tq, device=dev)[None, :]  # [B, Tq]
    vis = (jj[None, None, :] <= last[:, :, None]) & (jj[None, None, :] < lens[:, None, None])  # [B, Tq, L]
    logits = logits.masked_fill(~vis[:, None, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is visible
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(logits - safe[..., None])
    out = torch.einsum("bhgtl,bhld->bhgtd", p, v_cache.float())
    return out.reshape(b, hq, tq, d).to(q.dtype), lse.reshape(b, hq, tq)


def dense_decode(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """Triton where it can run on q's device, the reference otherwise (same arguments)."""
    if can_launch(args[0]):
        return dense_decode_triton(*args, **kwargs)
    return dense_decode_reference(*args)


__all__ = ["MAX_ROWS", "default_splits", "default_stages", "dense_decode", "dense_decode_reference",
           "dense_decode_triton"]
